"""The docs are complete (every dataset, every preset, the training defaults, the optional
extras), render right (nested lists become nested HTML lists) and do not contradict the paper."""

import os
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from localearn import registry
from localearn.cli import main
from localearn.config import FitConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LIST_ITEM = re.compile(r"^( *)([-*+]|\d+\.) ")


def prose_lines(path: Path):
    """``(number, line)`` of a markdown file outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield n, line


def nested_items(path: Path) -> int:
    """List items indented under another list item (4 spaces or more)."""
    return sum(1 for _, line in prose_lines(path)
               if (m := LIST_ITEM.match(line)) and len(m.group(1)) >= 4)


def test_nested_list_items_are_indented_four_spaces():
    # Python-Markdown (mkdocs) needs 4 spaces: a 2-space item renders as a sibling
    bad = [f"{p.name}:{n}: {line.strip()[:50]}" for p in sorted(DOCS.glob("*.md"))
           for n, line in prose_lines(p)
           if (m := LIST_ITEM.match(line)) and 0 < len(m.group(1)) < 4]
    assert not bad, "nested list items need 4 spaces of indentation:\n" + "\n".join(bad)


def lists_glued_to_a_paragraph(path: Path) -> list[str]:
    """List items that directly follow a paragraph line with no blank line between them:
    Python-Markdown (mkdocs) renders those as part of the paragraph, not as a list."""
    bad, in_list, directive, prev = [], False, False, ""
    for n, line in prose_lines(path):
        if line.startswith(":::"):
            directive = True  # mkdocstrings options below are YAML, not markdown
        elif directive and not line.strip():
            directive = False
        elif not directive:
            if LIST_ITEM.match(line):
                glued = prev.strip() and not in_list and not prev.lstrip().startswith(
                    ("#", "|", "<", "!!!", "```"))
                if glued:
                    bad.append(f"{path.name}:{n}: {line.strip()[:60]}")
                in_list = True
            elif line.strip() and not line.startswith(" ") and not prev.strip():
                in_list = False
        prev = line
    return bad


def test_lists_are_separated_from_the_paragraph_before_them():
    bad = [b for p in sorted(DOCS.glob("*.md")) for b in lists_glued_to_a_paragraph(p)]
    assert not bad, "a list needs a blank line before it to render as a list:\n" + "\n".join(bad)


class ListDepth(HTMLParser):
    """Counts <li> elements inside another <li> (a list nested in a list item)."""

    def __init__(self) -> None:
        super().__init__()
        self.open_items = 0
        self.nested = 0
        self.nested_text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "li":
            if self.open_items:
                self.nested += 1
                self.nested_text.append("")
            self.open_items += 1

    def handle_endtag(self, tag):
        if tag == "li":
            self.open_items -= 1

    def handle_data(self, data):
        if self.open_items > 1 and self.nested_text:
            self.nested_text[-1] += data


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_nested_lists_render_as_nested_html_lists(site):
    for page in sorted(DOCS.glob("*.md")):
        want = nested_items(page)
        if not want:
            continue
        html = site / f"{page.stem}.html"
        parser = ListDepth()
        parser.feed(html.read_text())
        assert parser.nested >= want, f"{page.name}: {want} nested items in the source, " \
                                      f"{parser.nested} nested <li> in {html}"
    parser = ListDepth()
    parser.feed((site / "measure.html").read_text())
    assert any(t.startswith("On CUDA it is") for t in parser.nested_text)


def test_every_preset_file_is_listed_on_the_presets_page():
    text = (DOCS / "presets.md").read_text()
    listed = [re.escape(m).replace(re.escape("<"), "<").replace(re.escape(">"), ">")
              for m in re.findall(r"`([\w<>/.-]+\.(?:toml|yaml|yml))`", text)]
    patterns = [re.compile(re.sub(r"<\w+>", r"[^/]+", p) + "$") for p in listed]
    files = sorted(p.relative_to(ROOT / "examples" / "configs").as_posix()
                   for p in (ROOT / "examples" / "configs").rglob("*")
                   if p.suffix in (".toml", ".yaml", ".yml"))
    assert len(files) > 60
    missing = [f for f in files if not any(p.match(f) for p in patterns)]
    assert not missing, f"presets not listed in docs/presets.md: {missing}"


def test_every_registered_dataset_has_a_section():
    text = (DOCS / "datasets.md").read_text()
    headings = set(re.findall(r"^## (\S+)$", text, re.M))
    first_party = {name for name, dist in registry.providers("dataset").items()
                   if dist == "localearn"}
    assert first_party >= {"digits", "cifar10", "cifar10-shards", "svhn", "stl10",
                           "imagenet-shards"}
    assert first_party <= headings
    for key in ('"urls"', '"samples"', '"shards"', '"num_classes"', '"classes"',
                '"image_size"', '"resize"', "localearn data cifar10-shards"):
        assert key in text, key


def documented_defaults() -> dict[str, str]:
    text = (DOCS / "training.md").read_text()
    return dict(re.findall(r"^\| `--([\w-]+)` \| ([^|]+?) \|", text, re.M))


def test_training_defaults_page_matches_the_config_and_fit_help(capsys):
    rows = documented_defaults()
    core = ["rule", "model", "k", "split", "dataset", "epochs", "batch_size", "lr",
            "momentum", "nesterov", "weight_decay", "warmup_epochs", "warmup_lr", "seed",
            "precision"]
    assert [f for f in core if f.replace("_", "-") not in rows] == []
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, shown in rows.items():
        field = FitConfig.model_fields[flag.replace("-", "_")]
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            assert shown == ("on" if default else "off"), flag
        elif default is None:
            assert not shown.startswith("`"), f"--{flag} has no default value, shown {shown}"
        else:
            assert shown == f"`{default}`", (flag, shown, default)
            assert f"(default: {default})" in help_text, flag


def test_every_extra_named_in_the_docs_exists():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    text = (DOCS / "training.md").read_text()
    for name in re.findall(r"^\| `(\w+)` \| `", text, re.M):
        assert name in extras, name
    assert "tensorboard" in extras and "-e '.[tensorboard]'" in text
    for name in ("docs", "test"):
        assert any(d.startswith("mkdocs-material") for d in extras[name]), name


def test_tensorboard_without_its_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    code = main(["fit", "--tensorboard", "--epochs", "1", "--train-limit", "32",
                 "--test-limit", "16", "--no-progress", "--device", "cpu", "--output-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("localearn: error: --tensorboard needs the tensorboard package")
    assert "pip install tensorboard" in err[0] and "pip install -e '.[tensorboard]'" in err[0]
    assert "pip install 'localearn[" not in err[0]  # localearn is not on PyPI


def test_no_page_contradicts_the_papers_400_epochs():
    pages = [*DOCS.glob("*.md"), ROOT / "README.md", ROOT / "examples" / "configs" / "README.md"]
    bad = [f"{p.name}:{n}" for p in pages for n, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\b160\b", line) and "epoch" in line and "400" not in line]
    assert not bad, bad
    assert "400 epochs" in (DOCS / "training.md").read_text()
