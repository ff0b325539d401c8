"""Hostile or mistaken input is one line, never a traceback, a resource bomb or a command run:
config files that would replace runs, YAML alias bombs, huge shard members, GOPEN_REWRITE to
pipe:, a hostile repository's git config, and the small mistakes (a folder for a file, a BOM,
float16 on a CPU, warnings in the errors' style)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localearn.cli import main
from localearn.config import load_config, make_config
from localearn.data.webdata import CorruptDataWarning, ShardStream, expand_shards
from localearn.errors import UserError
from localearn.runlog import git_commit

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ config files
@pytest.mark.parametrize("name, text", [
    ("c.toml", "rule = 'dgl'\noverwrite = true\n"),
    ("c.yaml", "fit:\n  overwrite: true\n"),
    ("c.toml", "allow_pipe = true\n"),
])
def test_a_config_file_cannot_replace_runs_or_allow_pipes(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert main(["fit", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = one_line(capsys.readouterr().err)
    flag = "--overwrite" if "overwrite" in text else "--allow-pipe"
    assert "command-line flag only" in err and f"pass {flag}" in err
    assert not (tmp_path / "r").exists()


BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n"
               for p, c in zip("abcdef", "bcdefg"))
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BOMB + "rule: *g\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400  # a few hundred bytes: 9**7 strings once expanded
    start = time.perf_counter()
    assert main(["fit", "--config", str(path)]) == 2
    assert time.perf_counter() - start < 5
    err = one_line(capsys.readouterr().err)
    assert "uses a YAML anchor or alias (line 1)" in err and len(err) < 300


def test_one_small_alias_is_refused_too(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("base: &b 3\nepochs: *b\n")
    with pytest.raises(UserError, match="anchor or alias"):
        load_config(path)


def test_a_toml_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfrule = 'dgl'\nepochs = 3\n")
    assert make_config(path).epochs == 3
    yaml_path = tmp_path / "bom.yaml"
    yaml_path.write_bytes(b"\xef\xbb\xbfepochs: 4\n")
    assert make_config(yaml_path).epochs == 4


def test_a_folder_for_a_file_and_a_file_for_a_folder_say_so(tmp_path, capsys):
    assert main(["fit", "--config", str(tmp_path)]) == 2
    assert "is a folder; give a TOML or YAML file" in one_line(capsys.readouterr().err)
    afile = tmp_path / "data.bin"
    afile.write_bytes(b"x")
    assert main(["fit", "--data-dir", str(afile)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "is a file, not a folder" in err and "does not exist" not in err


def test_float16_on_a_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert main(["fit", "--precision", "16", "--device", "cpu", "--out",
                 str(tmp_path / "r")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--precision 16 on the CPU" in err and "bf16" in err
    assert not (tmp_path / "r").exists()


def test_warnings_print_in_the_errors_style():
    """A rule's warning (mlaan's k against K) is one ``localearn: warning:`` line, without
    the file, line number and source line Python's format adds."""
    r = subprocess.run([sys.executable, "-m", "localearn", "bench", "--rule", "mlaan(dgl, k=3)",
                        "--k", "2", "--steps", "1", "--warmup", "0", "--vs", "none",
                        "--batch-size", "2", "--device", "cpu"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "mlaan: k=3" in ln or "warn" in ln.lower()]
    assert lines and all(ln.startswith("localearn: warning: ") for ln in lines), r.stderr
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


# ------------------------------------------------------------------------ huge tar members
def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sparse_shard(path: Path, big: int, samples: int = 3) -> None:
    """A tar of ``samples`` samples; sample 1's image claims ``big`` bytes, left as a hole in
    the file (sparse: nothing of it is written to disk)."""
    with open(path, "wb") as f:
        for i in range(samples):
            for ext, data in (("png", _png()), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = big if (i == 1 and ext == "png") else len(data)
                f.write(info.tobuf(tarfile.GNU_FORMAT))
                if info.size == big:
                    f.seek(-(-big // 512) * 512, os.SEEK_CUR)
                else:
                    f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)


def test_a_huge_shard_member_is_skipped_unread_and_counted(tmp_path):
    shard = tmp_path / "train-000000.tar"
    sparse_shard(shard, 200 << 20)
    assert shard.stat().st_blocks * 512 < 1 << 20  # the 200 MiB are a hole
    ds = ShardStream(str(shard), lambda x: x.float(), samples=3)
    tracemalloc.start()
    try:
        with pytest.warns(CorruptDataWarning) as record:
            labels = [y for _, y in ds]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels == [1, 1]  # the sample without its image is skipped
    assert peak < 32 << 20, f"{peak >> 20} MiB held while reading"
    assert ds.skipped["oversized"] == 1
    text = [str(w.message) for w in record]
    line = next(t for t in text if "larger than" in t)
    assert "skipped 1 member(s) larger than 64 MiB" in line and "s1.png, 200 MiB" in line
    assert "\n" not in line


def test_the_member_cap_is_set_in_the_manifest(tmp_path):
    from localearn.data import imagenet_shards

    for split in ("train", "val"):
        sparse_shard(tmp_path / f"{split}-000000.tar", 3 << 20)
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 10,
                                                        "max_member_mb": 2}))
    data = imagenet_shards(tmp_path)
    assert data.train.max_member_bytes == 2 << 20
    with pytest.warns(CorruptDataWarning) as record:
        assert len([y for _, y in data.test]) == 2
    assert any("larger than 2 MiB" in str(w.message) for w in record)
    (tmp_path / "manifest.json").write_text(json.dumps({"max_member_mb": 0}))
    with pytest.raises(UserError, match="max_member_mb must be a positive integer"):
        imagenet_shards(tmp_path)


# ---------------------------------------------------------------------------- pipe: rewrite
def test_gopen_rewrite_to_pipe_is_checked_as_it_will_be_opened(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("GOPEN_REWRITE", f"http://mirror/=pipe:touch {marker} #")
    with pytest.raises(UserError, match="GOPEN_REWRITE made it of 'http://mirror/a.tar'"):
        expand_shards("http://mirror/a.tar", allow_pipe=False)
    with pytest.raises(UserError, match="would run a shell command"):
        ShardStream(["http://mirror/a.tar"], lambda x: x, samples=1, allow_pipe=False)
    assert not marker.exists()
    # allowed, the rewritten URL is what is opened (once, not rewritten again)
    assert expand_shards("http://mirror/a.tar", allow_pipe=True) == [
        f"pipe:touch {marker} #a.tar"]
    monkeypatch.setenv("GOPEN_REWRITE", "no-equals-sign")
    with pytest.raises(UserError, match="GOPEN_REWRITE=.*cannot be applied"):
        expand_shards("http://mirror/a.tar")


def test_a_manifests_http_urls_rewritten_to_pipe_run_nothing(tmp_path):
    marker = tmp_path / "ran"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({
        "num_classes": 10, "train": {"urls": "http://mirror/train-{0..1}.tar", "samples": 8},
        "val": {"urls": "http://mirror/val-0.tar", "samples": 4}}))
    env = {**ENV, "GOPEN_REWRITE": f"http://mirror/=pipe:touch {marker} #"}
    r = subprocess.run([sys.executable, "-m", "localearn", "fit", "--dataset", "imagenet-shards",
                        "--data-dir", str(data), "--epochs", "1", "--device", "cpu",
                        "--no-progress", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    err = one_line(r.stderr)
    assert "would run a shell command" in err and "GOPEN_REWRITE" in err
    assert not marker.exists()


# --------------------------------------------------------------------------- hostile git
def _hostile_repo(root: Path, marker: Path) -> Path:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    root.mkdir()
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    (root / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], cwd=root, check=True)
    hook = root / "monitor.sh"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    hook.chmod(0o755)
    with open(root / ".git" / "config", "a") as f:
        f.write(f"[core]\n\tfsmonitor = {hook}\n")
    return root


def test_a_hostile_repository_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    repo = _hostile_repo(tmp_path / "repo", marker)
    subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True)
    assert marker.exists(), "the test repository's fsmonitor does not run: no test"
    marker.unlink()
    monkeypatch.chdir(repo)  # fit in a hostile working directory records localearn's commit
    got = git_commit()
    assert got is None or got["commit"] != _head(repo)
    assert not marker.exists()
    info = git_commit(repo)  # asked for explicitly: read with the monitor and hooks off
    assert info == {"commit": _head(repo), "dirty": False}
    assert not marker.exists()


def _head(repo: Path) -> str:
    return (repo / ".git" / "refs" / "heads" / "main").read_text().strip()


def test_warnings_in_process_still_reach_a_recorder(capsys):
    """The command line's one-line format leaves ``pytest.warns`` and other recorders be."""
    from localearn.cli import one_line_warning

    assert one_line_warning(UserWarning("a\n  b"), UserWarning, "x.py", 3) == \
        "localearn: warning: a b\n"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["rules"]) == 0
        warnings.warn("after", UserWarning, stacklevel=1)
    assert any("after" in str(w.message) for w in seen)
