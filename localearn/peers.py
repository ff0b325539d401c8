"""What a multi-process job says when one of its processes dies: each survivor recognises the
failed collective or transfer (`lost_peer`) and says so in one line; the launcher names the
rank that died and how (`dead_rank_line`)."""

from __future__ import annotations

import re
import signal
from typing import Any

# what Gloo, NCCL and the TCP store say when the process at the other end is gone
_PEER_GONE = re.compile(
    r"connection (reset|closed|refused)|broken pipe|socket timeout|timed out|"
    r"end of file|peer|communicator was aborted|nccl error|watchdog|"
    r"failed to recv|failed to send|read error|write error", re.IGNORECASE)


def lost_peer(exc: BaseException) -> str | None:
    """The first line of ``exc`` (without Gloo's source position) when it says that another
    process of the job went away during a collective or a transfer; None otherwise."""
    import torch.distributed as dist

    if not isinstance(exc, (RuntimeError, dist.DistError)):
        return None
    text = re.sub(r"\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if not isinstance(exc, dist.DistError) and not _PEER_GONE.search(first):
        return None
    return first[:200]


def survivor_line(exc: BaseException, rank: str, world: str) -> str | None:
    """The one line a surviving worker prints for ``exc``, or None if it is not a lost peer."""
    what = lost_peer(exc)
    if what is None:
        return None
    # in a job of two the lost process can only be the other rank; beyond that Gloo and NCCL
    # name an address, not a rank
    other = "another process"
    if world == "2" and rank in ("0", "1"):
        other = f"rank {1 - int(rank)}"
    return (f"rank {rank} of {world} lost {other} of this job ({what}): it stopped "
            "or was killed; this process stops too (resume from the last checkpoint)")


def dead_rank_line(failures: dict[int, Any]) -> str | None:
    """The launcher's line for the workers that died by a signal (torchrun's ``failures``:
    rank -> failure with ``exitcode`` and ``pid``); None when every failed worker exited by
    itself (it has said why). SIGTERM is left out: it is how torchrun stops the survivors (a
    worker given SIGTERM by a person checkpoints and exits with 143 itself)."""
    killed = []
    for rank, failure in sorted(failures.items()):
        code = getattr(failure, "exitcode", 0)
        if code < 0 and code != -signal.SIGTERM:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            killed.append(f"rank {rank} (pid {getattr(failure, 'pid', '?')}) was killed by "
                          f"{name}")
    if not killed:
        return None
    return "; ".join(killed) + "; the job stopped its other processes"
