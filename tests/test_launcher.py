"""``localearn fit --nproc N``: torchrun and its workers never outlive the launching process,
and a bad ``LOCALEARN_TIMEOUT`` is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from localearn import distributed
from localearn.errors import UserError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _marked(marker: str) -> list[int]:
    """The pids of live processes whose environment holds ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            pids.append(int(entry.name))
    return pids


def _workers(marker: str) -> list[int]:
    """The marked processes that torchrun started (their environment names a RANK)."""
    out = []
    for pid in _marked(marker):
        try:
            if b"\0RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def _wait_until_training(runs: list[Path], jobs: list[subprocess.Popen]) -> None:
    """Until one of the run folders logs a training step (every rank is then training)."""
    deadline = time.monotonic() + 180
    while not any((r / "metrics.jsonl").exists() and b'"step"' in (r / "metrics.jsonl")
                  .read_bytes() for r in runs):
        assert all(j.poll() is None for j in jobs), "the job stopped before training"
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.5)


def _kill_marked(marker: str) -> None:
    for pid in _marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_sigkill_of_the_launcher_stops_torchrun_and_its_workers(tmp_path: Path) -> None:
    marker = f"LOCALEARN_TEST_MARK={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALEARN_TIMEOUT="60", **{name: value})
    cmd = [sys.executable, "-m", "localearn", "fit", "--nproc", "2", "--rule", "dgl", "--k",
           "2", "--train-limit", "256", "--test-limit", "64", "--batch-size", "16",
           "--epochs", "50", "--device", "cpu", "--no-progress", "--out",
           str(tmp_path / "run")]
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_workers(marker)) < 2:  # both workers started
            assert parent.poll() is None, "the job ended before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.5)
        time.sleep(3)  # into their imports or training
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 25
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked(marker)
        assert not left, f"processes outlived the killed launcher: {left}"
    finally:
        _kill_marked(marker)  # never leave a runaway job behind


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e300"])
def test_a_bad_timeout_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LOCALEARN_TIMEOUT", value)
    with pytest.raises(UserError, match="LOCALEARN_TIMEOUT=.* valid: a number of seconds"):
        distributed.collective_timeout()


def test_a_good_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALEARN_TIMEOUT", "2.5")
    assert distributed.collective_timeout().total_seconds() == 2.5
    monkeypatch.delenv("LOCALEARN_TIMEOUT")
    assert distributed.collective_timeout().total_seconds() == 1800


def test_a_bad_timeout_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALEARN_TIMEOUT="abc")
    proc = subprocess.run([sys.executable, "-m", "localearn", "fit", "--nproc", "2",
                           "--device", "cpu", "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("localearn: error: LOCALEARN_TIMEOUT='abc'")


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_a_killed_worker_is_named_in_one_line_and_the_job_stops(tmp_path: Path) -> None:
    marker = f"LOCALEARN_TEST_MARK={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALEARN_TIMEOUT="60", **{name: value})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "localearn", "fit", "--nproc", "2", "--rule", "dgl", "--k",
           "2", "--train-limit", "256", "--test-limit", "64", "--batch-size", "16",
           "--epochs", "50", "--device", "cpu", "--no-progress", "--out", str(run)]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        _wait_until_training([run], [job])
        victim = next(p for p in _workers(marker) if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=90)  # prompt: not the collective timeout of 60 s x N
    finally:
        _kill_marked(marker)
    assert job.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert "Traceback" not in err and "[rank" not in err, err[-3000:]
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in err, err[-3000:]
    # the survivor says it in one line too (unless the launcher stopped it first)
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("localearn:") for line in lines), err[-3000:]


def test_lost_peers_are_told_from_other_errors() -> None:
    from types import SimpleNamespace

    from localearn.peers import dead_rank_line, lost_peer, survivor_line

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[127.0.0.1]:1435: Connection reset by peer. This is typically ...")
    assert lost_peer(gloo) == "Read error [127.0.0.1]:1435: Connection reset by peer. This " \
                              "is typically ..."
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert lost_peer(ValueError("Connection reset by peer")) is None  # not a collective
    line = survivor_line(gloo, "0", "2")
    assert line is not None and line.startswith("rank 0 of 2 lost rank 1 of this job")
    line = survivor_line(gloo, "2", "4")
    assert line is not None and line.startswith("rank 2 of 4 lost another process")
    # torchrun's SIGTERM to the survivors is not a death to report; SIGKILL is
    fail = {0: SimpleNamespace(exitcode=-15, pid=10), 1: SimpleNamespace(exitcode=-9, pid=11),
            2: SimpleNamespace(exitcode=1, pid=12)}
    assert dead_rank_line(fail) == ("rank 1 (pid 11) was killed by SIGKILL; the job stopped "
                                    "its other processes")
    assert dead_rank_line({0: SimpleNamespace(exitcode=2, pid=1)}) is None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_dead_second_node_is_one_line_on_the_first(tmp_path: Path) -> None:
    """Two torchrun launchers joined over a c10d rendezvous, as on two machines; the whole
    second node (its launcher and its worker) is killed while both train. The first node's
    worker says in one line which rank it lost and stops at once, not after the timeout."""
    marker = f"LOCALEARN_TEST_MARK={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCALEARN_TIMEOUT="300", **{name: value})
    port = _free_port()
    nodes = []
    for node in ("a", "b"):
        logs = tmp_path / f"logs-{node}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--rdzv-id", value, "--log-dir", str(logs),
               "--redirects", "2", "-m", "localearn", "fit", "--rule", "dgl", "--k", "2",
               "--train-limit", "256", "--test-limit", "64", "--batch-size", "16",
               "--epochs", "50", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path / f"run-{node}")]
        nodes.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL), logs))
    try:
        # rank 0 writes the run (on either node)
        _wait_until_training([tmp_path / f"run-{n}" for n in "ab"], [p for p, _ in nodes])
        workers = {_rank_of(pid): pid for pid in _workers(marker)}
        victim = workers[1]
        dead = next(i for i, (p, _) in enumerate(nodes)
                    if str(p.pid) in Path(f"/proc/{victim}/stat").read_text().split()[3:4])
        killed_at = time.monotonic()
        nodes[dead][0].kill()  # the node goes: its launcher and its worker at once
        os.kill(victim, signal.SIGKILL)
        survivor, logs = nodes[1 - dead]
        survivor.wait(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        _kill_marked(marker)
    assert survivor.returncode != 0
    assert took < 60, f"the survivor took {took:.0f} s to stop"
    err = "".join(f.read_text() for f in logs.rglob("stderr.log"))
    lines = [line for line in err.splitlines() if line.strip()]
    if lines and lines[0].startswith("localearn: SIGTERM:"):
        # the surviving launcher may lose the rendezvous first and ask its worker to stop;
        # the worker says so, then still names the rank it lost
        lines = lines[1:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("localearn: error: rank 0 of 2 lost rank 1 of this job"), err
