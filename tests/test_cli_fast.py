"""The everyday commands start fast: ``--help``, ``--version`` and the listings import no
torch (a plugin's description is read from its source), and ``rules NAME`` shows a rule's
options from its ``__init__`` signature."""

from __future__ import annotations

import subprocess
import sys

import pytest

from localearn import __version__
from localearn.cli import main

PROBE = """
import sys
from localearn.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
raise SystemExit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["fit", "--help"],
                                  ["analyze", "probe", "--help"], ["rules"], ["models"],
                                  ["datasets"]])
def test_light_commands_do_not_import_torch(argv):
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "NO-TORCH", r.stderr


def test_help_does_not_import_torch_per_importtime():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "localearn", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()]
    assert "localearn.cli" in imported and "torch" not in imported


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"localearn {__version__}\n"


def test_rules_listing_matches_the_plugins_descriptions(capsys):
    from localearn import registry

    assert main(["rules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line.split()[0]: line.split(None, 2)[2] for line in lines}
    assert shown == {name: text for name, text in registry.listing("rule")}


def test_rules_name_shows_options_types_and_defaults(capsys):
    assert main(["rules", "dgl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dgl: Decoupled Greedy Learning")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out[2:]}
    assert rows["width"].split() == ["float", "default", "1.0"]
    assert rows["max_width"].split() == ["int", "default", "128"]
    assert rows["style"].startswith("Literal[")
    assert main(["rules", "mlaan"]) == 0
    text = capsys.readouterr().out
    assert "base" in text and "(a rule, required)" in text and "fuse" in text
    assert main(["rules", "nope"]) == 2
    assert capsys.readouterr().err.startswith("localearn: error: unknown rule 'nope'")


def test_device_help_names_every_device(capsys):
    for argv in (["fit", "--help"], ["analyze", "probe", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for name in ("auto", "cpu", "cuda,", "cuda:N", "mps"):
            assert name in text, (argv, name)
