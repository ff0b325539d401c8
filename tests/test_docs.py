"""The docs site builds strictly with its theme (no broken link, no missing page, no docstring the
API reference cannot render, nothing loaded from a CDN), the API reference really comes from the
docstrings, and the install instructions are one set that works without PyPI."""

import html
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NAV_GROUPS = ["Start", "Rules", "Training at scale", "Analysis", "Reference", "Results"]


def build_site(out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def page(site: Path, stem: str) -> Path:
    """The built page of ``docs/<stem>.md`` (plain .html files: the site reads from file://)."""
    return site / f"{stem}.html"


def text_of(path: Path) -> str:
    """A page's text without tags, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", path.read_text())).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


def test_site_builds_strict_with_the_api_reference(site):
    api = text_of(page(site, "api"))
    for name in ("StepContext", "train_step", "backward_from", "compile_targets", "FitConfig",
                 "Trainer", "FitResult", "check_isolation", "register_rule", "load_backbone",
                 "SplitNetwork", "linear_cka"):
        assert name in api, name
    # a docstring sentence, so the page is generated from the code, not written by hand
    assert "the engine reads them on the host" in api
    # signatures carry their type annotations
    compact = "".join(api.split())
    assert "reach:int=1" in compact
    assert "register_rule(name:str,rule:type[UpdateRule])->None" in compact
    plugins = text_of(page(site, "plugins"))
    assert "The UpdateRule contract" in plugins


def test_engine_internals_stay_off_the_api_page(site):
    raw = page(site, "api").read_text()
    for module in ("localearn.engine.step", "localearn.engine.state", "localearn.engine.pipeline",
                   "localearn.engine.parallel", "localearn.engine.checkpoint", "localearn.build"):
        assert f'id="{module}' not in raw, module


def test_the_theme_highlights_code_and_loads_nothing_from_a_cdn(site):
    quickstart = page(site, "quickstart").read_text()
    assert "material" in quickstart.lower()
    assert 'class="language-bash highlight"' in quickstart  # pygments, at build time
    assert '<span class="nv">OMP_NUM_THREADS</span>' in quickstart
    external = []
    for p in sorted(site.glob("*.html")):
        for tag, url in re.findall(r'<(script|link)\b[^>]*?(?:src|href)="((?:https?:)?//[^"]+)"',
                                   p.read_text()):
            external.append(f"{p.name}: <{tag}> {url}")
    assert not external, "pages load from the network:\n" + "\n".join(external)


def test_navigation_is_grouped_and_lists_every_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = config["nav"]
    assert [next(iter(group)) for group in nav] == NAV_GROUPS
    listed = {path for group in nav for entries in group.values()
              for entry in entries for path in entry.values()}
    assert listed == {p.name for p in DOCS.glob("*.md")}
    assert config["theme"]["name"] == "material"
    assert config["use_directory_urls"] is False


def test_the_built_site_is_not_tracked():
    r = subprocess.run(["git", "check-ignore", "-q", "site/index.html"], cwd=ROOT)
    assert r.returncode == 0, "site/ must be git-ignored"


def test_ci_runs_the_readme_test_command_with_the_pinned_torch():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = next(line for line in readme[:8] if "pytest" in line)
    assert test_line.strip() in ci
    assert "-c constraints.txt" in test_line and "-c constraints.txt" in readme[3]
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==" in pins and "torchvision==" in pins
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch") and "vision" not in d)
    assert "==" not in torch_dep  # the library declares a range; the exact pin is CI's


def setup_block(path: Path) -> str:
    """The first fenced block under a page's ``## Install`` heading."""
    text = path.read_text()
    section = text[text.index("## Install"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_and_quickstart_give_one_set_of_set_up_commands():
    block = setup_block(ROOT / "README.md")
    assert block == setup_block(DOCS / "quickstart.md")
    assert "-c constraints.txt -e ." in block and "python3.11 -m venv .venv" in block


def test_install_instructions_do_not_assume_pypi():
    # localearn is not on PyPI: no page or message may tell users to `pip install localearn`
    files = [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "localearn").rglob("*.py"),
             *(ROOT / "examples").rglob("*.toml")]
    bad = re.compile(r"pip install (-U |--upgrade )?['\"]?localearn(\[[\w,]+\])?['\"]?"
                     r"(?!\s*@)(\s|$|[`),])")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not found, found
    text = (ROOT / "README.md").read_text() + (DOCS / "training.md").read_text()
    for needed in ("not on PyPI", "pip install -c constraints.txt -e .", "@ git+",
                   "-e '.[tensorboard]'", "--index-url https://download.pytorch.org/whl/cpu"):
        assert needed in text, needed


def test_quickstart_output_matches_the_command_above_it():
    text = (DOCS / "quickstart.md").read_text()
    section = text[text.index("## A first run"):]
    command, output = re.findall(r"```\w*\n(.*?)```", section, re.S)[:2]
    command = command.replace("\\\n", " ")
    epochs = int(re.search(r"--epochs (\d+)", command).group(1))
    rule = re.search(r"--rule (\S+)", command).group(1)
    lines = output.splitlines()
    assert lines[0].startswith(f"training {rule} on resnet32 (K=16) with digits")
    assert sum(line.startswith("epoch ") for line in lines) == epochs
    assert f"epoch {epochs}/{epochs}" in output and f"{epochs} epochs" in output


def test_the_plugin_template_installs_once_localearn_is_installed(tmp_path):
    # localearn is not on PyPI: with localearn installed, pip must satisfy the template's
    # requirement without any package index
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                        "--no-build-isolation", "--no-cache-dir", "-e",
                        str(ROOT / "examples" / "probe_rule")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "localearn-probe-rule" in r.stdout
    plugins = (DOCS / "plugins.md").read_text()
    assert "Install localearn first" in plugins
    shown = re.search(r"```toml\n(.*?)```", plugins, re.S).group(1)
    assert shown == (ROOT / "examples" / "probe_rule" / "pyproject.toml").read_text()
