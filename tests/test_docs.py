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
