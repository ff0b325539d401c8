"""Data-parallel training with torch.distributed, shaped for local learning.

A local-learning step runs one backward pass per module, so DDP's single-backward hooks do not
fit. Instead the engine hands `GradReducer.announce` to the rule as `UpdateRule.grads_ready`:
when a module (and its head) has its final gradient, the rule announces it and the reducer
starts an asynchronous all-reduce of those gradients in flat buckets, which runs while the next
module computes. Before the optimizer step `GradReducer.finish` reduces whatever was never
announced, waits for every bucket and writes the averaged gradients back. All ranks then take
the same step from the same gradients, so their parameters stay bitwise identical.

Launch with ``torchrun --nproc-per-node N -m localearn fit ...`` (multi-node: torchrun's usual
``--nnodes``/``--rdzv-*`` flags) or ``localearn fit --nproc N`` on one machine. NCCL is used on
GPUs, Gloo on CPUs. BatchNorm statistics are per rank unless ``--sync-bn`` (GPUs only); their
running averages are averaged across ranks before evaluation and checkpoints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from localearn.errors import UserError

#: launcher variables torchrun sets in every worker
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: rank, world size, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a worker started by torchrun (or anything that sets its variables)."""
    return all(v in os.environ for v in LAUNCH_VARS)


def current_env() -> DistEnv:
    """The job layout: from an initialised process group, else torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    if launched():
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                       int(os.environ["LOCAL_RANK"]))
    return DistEnv()


def pick_device(name: str, env: DistEnv) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` on GPUs, else CPU."""
    if not env.enabled:
        raise ValueError("pick_device is for multi-process runs")
    if name.startswith("cuda:"):
        raise UserError(f"--device {name} names one GPU, but this is a {env.world_size}-process "
                        "run: each rank takes the GPU of its local rank; use --device cuda")
    if name == "mps":
        raise UserError("multi-process training does not support --device mps; use cuda or "
                        "cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {env.local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; start fewer processes per node")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        return device
    if name == "cuda":
        raise UserError("device 'cuda' asked for, but CUDA is not available here; use "
                        "--device cpu")
    return torch.device("cpu")


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the job's process group (NCCL on GPUs, Gloo on CPUs); True if this call made it."""
    if not env.enabled or dist.is_initialized():
        return False
    timeout = collective_timeout()
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def average_buffers(module: nn.Module, world_size: int, group: Any = None) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) across ranks.

    The running mean is linear in the batch means, so averaging it at any time gives what
    synchronised updates would have given; integer buffers (batch counts) are equal already.
    """
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs or world_size == 1:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat, group=group)
    flat /= world_size
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def all_sum(values: Sequence[float], device: torch.device, env: DistEnv) -> list[float]:
    """Sum a few numbers over ranks (float64, one collective); as is on one process."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def check_replicas(named: Sequence[tuple[str, nn.Parameter]], device: torch.device,
                   env: DistEnv) -> None:
    """Raise if any rank's parameters differ from rank 0's (compared by per-tensor float64
    sums, one small collective): a rule whose steps are not deterministic across ranks."""
    if not env.enabled:
        return
    digest = torch.stack([p.detach().double().sum() for _, p in named]).to(device)
    all_digests = [torch.empty_like(digest) for _ in range(env.world_size)]
    dist.all_gather(all_digests, digest)
    for rank, other in enumerate(all_digests[1:], start=1):
        if not torch.equal(other, all_digests[0]):
            first = int((other != all_digests[0]).nonzero()[0])
            raise RuntimeError(f"the ranks diverged: rank {rank}'s parameter {named[first][0]} "
                               "differs from rank 0's; the rule must compute the same update on "
                               "every rank from the averaged gradients")


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that also refreshes a `SplitNetwork`'s
    ``units`` list (its plain references would otherwise keep the replaced modules)."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ranges = getattr(converted, "unit_ranges", None)
    if ranges is not None and hasattr(converted, "local_modules"):
        converted.units = [converted.local_modules[i][pos]
                           for i, r in enumerate(ranges) for pos in range(len(r))]
    return converted


class GradReducer:
    """Averages gradients over ranks, module by module, overlapping with later modules.

    Use one per training run: `start` before the rule's step, `announce` as the rule's
    ``grads_ready`` hook, `finish` before the optimizer step. Every rank must announce the same
    parameters in the same order (true for any deterministic rule), since buckets are matched
    by position. A parameter whose gradient is None on every rank is skipped (the optimizer
    skips it too).
    """

    def __init__(self, params: Iterable[nn.Parameter], world_size: int,
                 bucket_mb: float = 25.0, group: Any = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        self.group = group  # None: every process (a pipelined run: the stage's replicas)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._pending: list[tuple[Any, Tensor, list[nn.Parameter], list[tuple[Tensor, int]]]] = []
        self._done: set[int] = set()

    def start(self) -> None:
        self._pending.clear()
        self._done.clear()

    def announce(self, params: Iterable[nn.Parameter]) -> None:
        """Start reducing ``params``' gradients (those not reduced yet in this step)."""
        ready = []
        for p in params:
            if p.requires_grad and p.grad is not None and id(p) not in self._done:
                self._done.add(id(p))
                ready.append(p)
        self._launch(ready)

    def _launch(self, params: list[nn.Parameter]) -> None:
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
        for group in groups.values():
            bucket: list[nn.Parameter] = []
            size = 0
            for p in group:
                bucket.append(p)
                size += p.grad.numel() * p.grad.element_size()
                if size >= self.bucket_bytes:
                    self._send(bucket)
                    bucket, size = [], 0
            if bucket:
                self._send(bucket)

    def _send(self, bucket: list[nn.Parameter]) -> None:
        grads = [p.grad for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        handle = dist.all_reduce(flat, async_op=True, group=self.group)
        # remember which gradient tensor and version was sent, to catch a rule that changes a
        # gradient after announcing it
        self._pending.append((handle, flat, bucket, [(g, g._version) for g in grads]))

    def finish(self) -> None:
        """Reduce the gradients never announced, wait for all, write the averages back."""
        self._launch([p for p in self.params
                      if id(p) not in self._done and p.grad is not None])
        for handle, flat, bucket, sent in self._pending:
            handle.wait()
            flat.div_(self.world_size)
            offset = 0
            for p, (g, version) in zip(bucket, sent):
                if p.grad is not g or g._version != version:
                    raise RuntimeError(
                        "a rule changed a gradient after announcing it with "
                        "notify_grads_ready(); announce parameters only once their gradient "
                        "is final for the step")
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
        self._pending.clear()
        self._done.clear()


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` (torchrun's own parser would take it for an
    abbreviation of its ``--nproc-per-node``); the workers learn the count from torchrun."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun(argv: list[str]) -> int:
    """torchrun's ``main(argv)``, quiet about a worker that failed: the worker has said why in
    one line already, so torchrun's own error log and traceback are left out; the exit status
    is the first failed worker's (128 + N for a signal N)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as run

    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the workers die with this process
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(argv)
    except ChildFailedError as exc:
        from localearn.peers import dead_rank_line

        line = dead_rank_line(exc.failures)
        if line:
            print(f"localearn: error: {line}", file=sys.stderr, flush=True)
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as exc:  # SIGTERM/SIGINT: the workers were stopped (and saved)
        return 128 + int(exc.sigval)
    return 0


#: a process that stops leaves the others waiting at most this long, in seconds
TIMEOUT_ENV = "LOCALEARN_TIMEOUT"
#: the largest LOCALEARN_TIMEOUT (about 31 years): larger values overflow torch's timers
TIMEOUT_MAX = 1e9
#: set by `torchrun` for its workers: the launcher's pid, so a worker dies with it
LAUNCHER_ENV = "LOCALEARN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def collective_timeout() -> timedelta:
    """How long a collective waits for a stopped process (``LOCALEARN_TIMEOUT`` seconds,
    default 1800); a value that is not a positive number is a one-line error."""
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= TIMEOUT_MAX:  # also refuses nan
        from localearn.errors import SameOnEveryRank

        raise SameOnEveryRank(f"{TIMEOUT_ENV}={text!r} is not a timeout; valid: a number of "
                              f"seconds above 0 and at most {TIMEOUT_MAX:.0e} (default 1800)")
    return timedelta(seconds=seconds)


def _prctl() -> Any:
    """libc's ``prctl``, or None off Linux (or without a usable libc)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent: int, sig: int = signal.SIGTERM, prctl: Any = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``PR_SET_PDEATHSIG``);
    if the parent ``parent`` (a pid) is gone already, send it now. False where this is not
    available. ``prctl``: libc's, looked up beforehand (in a ``preexec_fn``)."""
    prctl = prctl or _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def die_with_launcher() -> None:
    """In a worker that `relaunch` started: stop (SIGTERM: finish the step, checkpoint) when
    torchrun dies, even by SIGKILL; its workers run in sessions of their own and would
    otherwise train on, unseen. Workers of a torchrun started by hand are left as they are."""
    pid = os.environ.get(LAUNCHER_ENV, "")
    if pid.isdigit() and launched():
        die_with_parent(int(pid))


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``localearn ARGV`` as ``nproc`` processes under torchrun on this machine; the exit
    status of the job. Neither torchrun nor its workers outlive this process: a SIGKILL of it
    stops them too (Linux)."""
    collective_timeout()  # a bad LOCALEARN_TIMEOUT: one line here, not one per worker
    cmd = [sys.executable, "-c",
           "import sys; from localearn.distributed import torchrun; "
           "sys.exit(torchrun(sys.argv[1:]))",
           "--standalone", f"--nproc-per-node={nproc}", "-m", "localearn", *strip_nproc(argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # its own session: a signal reaches the workers once, through this process and torchrun
    # (which stops them with SIGTERM: each finishes its step and the job writes a checkpoint)
    # and it gets SIGTERM when this process dies, even by SIGKILL (its workers die with it)
    prctl, me = _prctl(), os.getpid()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=(lambda: die_with_parent(me, prctl=prctl))
                            if prctl is not None else None)
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
