"""No tracked file names a development machine's paths or an internal tracker's issue numbers:
the product reads the same on any machine and needs no access to the project's tracker."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: paths of a development machine: its work tree, scratch and home folders at the file system's
#: root, and a folder of mirrored public repositories
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root)/|[.]mirror\b")
#: an internal tracker's issue numbers: the word issue (ticket, bug, PR, pull request) followed
#: by a number, with or without a hash or a hyphen, and a bare hash-number used as a reference
ISSUE_NUMBER = re.compile(
    r"\b(?:issues?|tickets?|bugs?|prs?|pull requests?)[ -]*#?\d+"
    r"|(?:^|[(\[,;]|(?<![:=])\s)#\d+\b(?![\w-])",
    re.IGNORECASE,
)


def tracked_text_files() -> list[Path]:
    """Every file git tracks that reads as UTF-8 text (binary files are skipped)."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    files = []
    for name in r.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def offending_lines(pattern: re.Pattern) -> list[str]:
    found = []
    for path in tracked_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:90]}")
    return found


def test_the_patterns_catch_what_they_should_and_nothing_else():
    # the examples are assembled, so that this file does not itself name what it looks for
    slash, dot, word, hash_ = "/", ".", "issue", "#"
    for text in (f"see {slash}work{slash}main/docs", f"cp {slash}tmp{slash}run .",
                 f"{slash}root{slash}.cache", f"the {dot}mirror folder"):
        assert MACHINE_PATH.search(text), text
    for text in ("$HOME/work/x", "data/tmp/file", "a/root/b", "mirror of the code"):
        assert not MACHINE_PATH.search(text), text
    for text in (f"{word} 15", f"{word.title()} 12's spread", f"{word}s 14, 15 and 17",
                 f"{word} {hash_}3", f"the {word}-15 budget", f"({hash_}14)", f"see {hash_}7",
                 f"PR {hash_}12"):
        assert ISSUE_NUMBER.search(text), text
    for text in ('fill="#333"', "color: #1f77b4", "stroke: #222;", "## Heading", "# comment 15",
                 "#!/bin/sh", f"an {word} with K", f"a known {word}"):
        assert not ISSUE_NUMBER.search(text), text


@pytest.mark.parametrize("what, pattern", [("machine paths", MACHINE_PATH),
                                           ("tracker issue numbers", ISSUE_NUMBER)])
def test_no_tracked_file_names(what, pattern):
    found = offending_lines(pattern)
    assert not found, f"{len(found)} lines name {what}:\n" + "\n".join(found)
