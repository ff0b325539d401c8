"""Streaming image classification data from WebDataset shards.

`ShardStream` reads tar shards (``.tar``, ``.tar.gz``) whose samples hold an image (``jpg``,
``jpeg``, ``png`` or ``webp``) and a class index (``cls``, ASCII digits). Shards are named by
local paths, glob or brace patterns (``train-{000000..001023}.tar``) or any URL the
``webdataset`` library opens. A local path is always opened as a file, never as a URL.

``pipe:`` URLs (``pipe:curl -s https://.../x.tar``) run a shell command, so they are opt-in:
`localearn fit` refuses them unless ``--allow-pipe`` is given on its command line, the other
commands unless ``LOCALEARN_ALLOW_PIPE=1`` is set; Python code decides with
``ShardStream(allow_pipe=...)`` or `pipes_allowed` (allowed by default there: the code names
the URLs itself). Only allow them for data folders and manifests you trust.

How an epoch is made, per rank and data-loader worker:

- **finite** (the default): rank r reads the shards ``r::world_size``; their order is shuffled
  per epoch (seeded), then the workers share them out (``worker::num_workers``), so every
  sample of the rank is read exactly once per epoch;
- **resampled** (``resample=True``; ``"auto"`` picks it for training on several ranks): every
  worker draws shards at random with replacement, an endless stream cut at a fixed quota, so
  each rank sees exactly ``len(dataset)`` samples per epoch and all ranks take the same number
  of steps, whatever the shard sizes.

Samples pass a seeded shuffle buffer (raw bytes, before decoding), then are decoded and
augmented on the worker. ``len(dataset)`` is the number of samples per epoch for this rank,
taken from a given total or counted once from the shards, so a schedule can be computed before
training. ``limit`` keeps only the first N samples in shard order (a fixed subset).

A sample that cannot be used (undecodable image, no label, label out of range) is skipped; a
shard that cannot be opened or read to its end is abandoned at that point. Both are counted,
in counters shared by all workers (`ShardStream.skipped`), and reported with a
`CorruptDataWarning`; training goes on. A shard cut short loses the samples after the damage;
since their tar headers are gone too, the count of those (``lost``) is a lower bound. An
empty shard is reported too. With ``image_size``, an image of another size is resized to it
(and counted), so one odd sample cannot break a batch.

Shard lists and counts are in `localearn.data.shardlist`, sample decoding in
`localearn.data.decoding`; both names are importable from here too.
"""

from __future__ import annotations

import copy
import multiprocessing
import random
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as shuffle_stage

from localearn.data.decoding import (  # noqa: F401  (IMAGE_KEYS: importable from here too)
    IMAGE_KEYS,
    Oversized,
    decode_rgb,
    decode_sample,
    oversized_report,
)
from localearn.data.shardio import (  # noqa: F401  (the pipe policy's public names)
    MAX_MEMBER_BYTES,
    PIPE_ENV,
    check_url,
    iter_members,
    open_url,
    pipes_allowed,
    pipes_default,
    pipes_from_env,
    rewritten,
)
from localearn.data.shardlist import (
    CorruptDataWarning,
    Shard,
    count_samples,
    expand_shards,
    plan_shards,
    shard_members,
)
from localearn.errors import UserError

__all__ = ["CorruptDataWarning", "PIPE_ENV", "ShardStream", "count_samples", "decode_rgb",
           "expand_shards", "pipes_allowed"]

# after this many raw samples (or shards) in a row without one usable sample, a resampled
# stream stops with an error instead of spinning forever on broken data
_MAX_FAILURES_IN_A_ROW = 10_000


def _warn(msg: str) -> None:
    """A `CorruptDataWarning` in the main process; a plain stderr line in a data-loader
    worker, whose warning filters (a test's capture, say) were inherited and may hide it."""
    if get_worker_info() is None:
        warnings.warn(msg, CorruptDataWarning, stacklevel=3)
    else:
        print(f"localearn: warning: {msg}", file=sys.stderr, flush=True)


class ShardStream(IterableDataset):
    """An image-classification stream over WebDataset shards; see the module docs.

    ``transform`` maps a decoded uint8 RGB image (3, H, W) to the tensor the network sees.
    ``samples`` is the total sample count of ``shards`` (counted from the shards when None);
    ``limit`` keeps the first N samples in shard order. ``shuffle`` is the shuffle buffer size
    (0: no shuffling of samples or shards; default 1000 for training, 0 otherwise).
    ``resample``: True, False, or ``"auto"`` (resampled when training on several ranks).
    ``allow_pipe``: whether ``pipe:`` URLs (shell commands) may be read (default:
    `pipes_default`). ``image_size`` (``(H, W)`` or one side): decoded images of another size
    are resized to it and counted (``skipped["resized"]``). ``max_member_bytes``: a shard
    member larger than this is skipped without being read (counted, ``skipped["oversized"]``,
    and reported in one line per shard); None reads members of any size.
    """

    def __init__(
        self,
        shards: str | Path | Sequence[str | Path],
        transform: Callable[[Tensor], Tensor],
        *,
        samples: int | None = None,
        limit: int | None = None,
        num_classes: int | None = None,
        train: bool = False,
        shuffle: int | None = None,
        resample: bool | Literal["auto"] = "auto",
        seed: int = 0,
        base_dir: Path | None = None,
        max_warnings: int = 5,
        allow_pipe: bool | None = None,
        image_size: int | tuple[int, int] | None = None,
        max_member_bytes: int | None = MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        if max_member_bytes is not None and max_member_bytes < 1:
            raise UserError(f"the largest shard member must be at least 1 byte (got "
                            f"{max_member_bytes})")
        self.max_member_bytes = max_member_bytes
        self.allow_pipe = pipes_default() if allow_pipe is None else bool(allow_pipe)
        urls = expand_shards(shards, base_dir, allow_pipe=self.allow_pipe)
        if not urls:
            raise UserError(f"no shards match {shards!r}")
        if samples is not None and samples < 1:
            raise UserError(f"the sample count of {shards!r} must be positive (got {samples})")
        self.urls = urls
        self.transform = transform
        self.num_classes = num_classes
        self.train = train
        self.shuffle = (1000 if train else 0) if shuffle is None else shuffle
        self.resample = resample
        self.seed = seed
        self.max_warnings = max_warnings
        self.image_size = ((image_size, image_size) if isinstance(image_size, int)
                           else tuple(image_size) if image_size is not None else None)
        self.epoch = 0
        self._rank: tuple[int, int] | None = None
        self.shards = plan_shards(urls, samples, limit)
        # skipped samples, unreadable shards, samples lost in them, usable samples delivered,
        # images resized to image_size, members over max_member_bytes skipped
        self._stats = multiprocessing.get_context().Array("q", 6)
        self._reported = (0, 0, 0)
        self.held_out: tuple[str, float] | None = None  # see `part`

    # ---------------------------------------------------------------- a validation split
    def part(self, which: Literal["train", "val"], share: float,
             transform: Callable[[Tensor], Tensor] | None = None) -> ShardStream:
        """This stream's training part or its held-out validation part (``share`` of the
        samples, chosen by a hash of their keys; see `localearn.data.holdout`); the
        validation part is read in order, with ``transform``."""
        view = copy.copy(self)
        view.held_out = (which, share)
        view._stats = multiprocessing.get_context().Array("q", 6)
        view._reported = (0, 0, 0)
        if which == "val":
            view.train, view.shuffle, view.resample = False, 0, False
            view.transform = transform or self.transform
        return view

    def _kept(self, key: str) -> bool:
        if self.held_out is None:
            return True
        which, share = self.held_out
        return (zlib.crc32(f"val-{key}".encode()) / 2**32 < share) == (which == "val")

    # ---------------------------------------------------------------------- epochs and ranks
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (it seeds the shard order and shuffle); reports skips so far."""
        self.report()
        self.epoch = epoch

    def set_rank(self, rank: int, world_size: int) -> None:
        """Read this rank's part of the data (called by `localearn.data.make_loader`)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self._rank = (rank, world_size)

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def resampled(self) -> bool:
        if self.resample == "auto":
            return self.train and self._rank_world()[1] > 1
        return bool(self.resample)

    def __len__(self) -> int:
        rank, world = self._rank_world()
        if self.resampled():
            n = sum(s.count for s in self.shards) // world
        else:
            n = sum(s.count for s in self.shards[rank::world])
        if self.held_out is not None:  # the expected size of this part
            which, share = self.held_out
            n = int(n * (share if which == "val" else 1 - share))
        return n

    # ---------------------------------------------------------------------------- reporting
    @property
    def skipped(self) -> dict[str, int]:
        """Totals over all workers so far: skipped samples, unreadable shards, the samples
        known to be lost in those shards (a lower bound: a cut shard hides what followed the
        cut), usable samples delivered, images resized to ``image_size`` and shard members
        over ``max_member_bytes`` skipped."""
        with self._stats.get_lock():
            s, b, lost, ok, resized, big = self._stats[:]
        return {"samples": s, "shards": b, "lost": lost, "delivered": ok, "resized": resized,
                "oversized": big}

    def report(self) -> str | None:
        """Warn about skips since the last report; returns the message (None if none)."""
        now = self.skipped
        cur = (now["samples"], now["shards"], now["lost"])
        if cur == self._reported:
            return None
        ds, dsh, dl = (a - b for a, b in zip(cur, self._reported))
        self._reported = cur
        msg = (f"skipped {ds + dl} corrupt or unreadable samples ({ds} undecodable, {dl} in "
               f"{dsh} unreadable shards, at least) since the last report; {cur[0] + cur[2]} "
               "in total")
        warnings.warn(msg, CorruptDataWarning, stacklevel=2)
        return msg

    def _add(self, index: int, n: int = 1) -> None:
        with self._stats.get_lock():
            self._stats[index] += n

    # ---------------------------------------------------------------------------- iteration
    def _read_shard(self, shard: Shard, log: Callable[[str], None]) -> Iterator[dict]:
        """The raw samples of one shard; stops at ``cap`` or at the first unreadable byte."""
        seen = 0
        current: dict[str, Any] | None = None
        big: list[tuple[str, int]] = []
        members = shard_members(shard.url, self.max_member_bytes,
                               lambda name, size: big.append((name, size)))
        try:
            for key, ext, data in members:
                if current is not None and key != current["__key__"]:
                    seen += 1
                    yield current
                    current = None
                    if shard.cap is not None and seen >= shard.cap:
                        return
                if current is None:
                    current = {"__key__": key, "__url__": shard.url}
                current[ext] = data
            if current is not None:
                seen += 1
                yield current
            if seen == 0:
                log(f"shard {shard.url} holds no samples")
        except UserError:
            raise
        except Exception as exc:  # a truncated, missing or non-tar shard
            if current is not None:  # its complete members may still make a sample
                seen += 1
                yield current
            lost = max(0, shard.count - seen) if shard.exact else 0
            self._add(1)
            self._add(2, lost)
            if not shard.exact:
                what = " (how many samples it held is unknown: its count is an even share)"
            elif shard.damaged or lost:
                what = (f" (at least {lost} sample{'s' * (lost != 1)}: the samples after the "
                        "damage cannot be counted)")
            else:
                what = ""
            log(f"shard {shard.url} is unreadable after {seen} samples "
                f"({type(exc).__name__}: {exc}); skipped the rest{what}")
        finally:
            members.close()  # closes the file or pipe at once when stopping at ``cap``
            if big:
                self._add(5, len(big))
                log(oversized_report(shard.url, big, self.max_member_bytes or 0))

    def _decode(self, sample: dict[str, Any]) -> tuple[Tensor, int, bool]:
        """The transformed image, its label, and whether it was resized to ``image_size``."""
        return decode_sample(sample, self.transform, self.num_classes, self.image_size)

    def _raw(self, rank: int, world: int, worker: int, workers: int,
             log: Callable[[str], None]) -> Iterator[dict]:
        if self.resampled():
            rng = random.Random(f"resample-{self.seed}-{self.epoch}-{rank}-{worker}")
            empty = 0
            while True:
                got = False
                for sample in self._read_shard(rng.choice(self.shards), log):
                    got = True
                    yield sample
                empty = 0 if got else empty + 1
                if empty >= min(_MAX_FAILURES_IN_A_ROW, 10 * len(self.shards)):
                    raise RuntimeError(f"no readable samples in {empty} shards in a row, "
                                       f"e.g. {self.shards[0].url}")
        shards = self.shards[rank::world]
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.epoch}-{rank}").shuffle(shards)
        for shard in shards[worker::workers]:
            yield from self._read_shard(shard, log)

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = None
        if self.resampled():
            n = len(self)
            quota = n // workers + (worker < n % workers)
            if quota == 0:
                return
        warned = 0
        skipped_here = big_here = 0

        def log(msg: str) -> None:
            nonlocal warned, big_here
            warned += 1
            big_here += isinstance(msg, Oversized)
            if warned <= self.max_warnings:
                _warn(msg)
            elif warned == self.max_warnings + 1:
                _warn("further corrupt-data warnings from this worker are suppressed this "
                      "epoch; totals follow")

        raw = self._raw(rank, world, worker, workers, log)
        if self.held_out is not None:
            raw = (sample for sample in raw if self._kept(sample["__key__"]))
        if self.shuffle > 1:
            rng = random.Random(f"samples-{self.seed}-{self.epoch}-{rank}-{worker}")
            raw = shuffle_stage(self.shuffle, self.shuffle, rng=rng)(raw)
        delivered = failures = resized = 0
        try:
            for sample in raw:
                try:
                    image, label, odd = self._decode(sample)
                except Exception as exc:
                    self._add(0)
                    skipped_here += 1
                    failures += 1
                    log(f"skipped sample {sample['__key__']!r} of {sample['__url__']}: "
                        f"{type(exc).__name__}: {exc}")
                    if quota is not None and failures >= _MAX_FAILURES_IN_A_ROW:
                        raise RuntimeError(f"{failures} samples in a row could not be decoded; "
                                           f"last: {exc}") from exc
                    continue
                failures = 0
                delivered += 1
                if odd:
                    resized += 1
                    self._add(4)
                yield image, label
                if quota is not None and delivered >= quota:
                    break
        finally:
            self._add(3, delivered)
            if warned:
                big = f" and oversized members in {big_here} shards" if big_here else ""
                _warn(f"epoch {self.epoch}, rank {rank}, worker {worker}: skipped "
                      f"{skipped_here} undecodable samples and {warned - skipped_here - big_here}"
                      f" unreadable or empty shards{big}")
            if resized and self.image_size is not None:
                _warn(f"epoch {self.epoch}, rank {rank}, worker {worker}: resized {resized} "
                      f"image(s) of another size to {self.image_size[0]}x{self.image_size[1]}")
