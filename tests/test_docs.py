"""The docs site builds strictly (no broken link, no missing page, no docstring the API
reference cannot render), and the API reference really comes from the docstrings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_with_the_api_reference(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                        str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("StepContext", "train_step", "backward_from", "build_run", "TrainStep",
                 "RunState", "compile_targets"):
        assert name in api, name
    # a docstring sentence, so the page is generated from the code, not written by hand
    assert "the engine reads them on the host" in api
    plugins = (tmp_path / "site" / "plugins" / "index.html").read_text()
    assert "The UpdateRule contract" in plugins


def test_ci_runs_the_readme_test_command_with_the_pinned_torch():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = next(line for line in readme[:8] if "pytest" in line)
    assert test_line.strip() in ci
    assert "-c constraints.txt" in test_line and "-c constraints.txt" in readme[3]
    pins = (ROOT / "constraints.txt").read_text()
    assert "torch==" in pins and "torchvision==" in pins
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch") and "vision" not in d)
    assert "==" not in torch_dep  # the library declares a range; the exact pin is CI's
