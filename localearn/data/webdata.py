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
"""

from __future__ import annotations

import glob
import io
import multiprocessing
import random
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2.functional import pil_to_tensor
from webdataset.filters import shuffle as shuffle_stage
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

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
from localearn.errors import UserError

__all__ = ["CorruptDataWarning", "PIPE_ENV", "ShardStream", "count_samples", "decode_rgb",
           "expand_shards", "pipes_allowed"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_SCHEMES = ("pipe:", "file:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")
# after this many raw samples (or shards) in a row without one usable sample, a resampled
# stream stops with an error instead of spinning forever on broken data
_MAX_FAILURES_IN_A_ROW = 10_000


class CorruptDataWarning(UserWarning):
    """A sample or shard was skipped because it could not be read or decoded."""


def _warn(msg: str) -> None:
    """A `CorruptDataWarning` in the main process; a plain stderr line in a data-loader
    worker, whose warning filters (a test's capture, say) were inherited and may hide it."""
    if get_worker_info() is None:
        warnings.warn(msg, CorruptDataWarning, stacklevel=3)
    else:
        print(f"localearn: warning: {msg}", file=sys.stderr, flush=True)


def _is_url(spec: str) -> bool:
    return spec.startswith(_SCHEMES)


def expand_shards(spec: str | Path | Sequence[str | Path], base: Path | None = None, *,
                  allow_pipe: bool = True) -> list[str]:
    """Shard URLs from brace patterns (``a-{000..009}.tar``), globs (local paths only), lists
    and ``pipe:``/``http`` URLs; relative local paths are taken relative to ``base`` and
    every local path is made absolute (so no file name is ever read as a URL). A ``pipe:`` URL
    is a `UserError` unless ``allow_pipe``; a ``Path`` is always a local path. URLs are
    returned (and checked) after webdataset's ``GOPEN_REWRITE`` rules, and opened as such."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[str] = []
    for s in specs:
        if isinstance(s, Path):  # a path found on disk: never a URL, never a pattern
            out.append(str(s.expanduser().absolute()))
            continue
        for url in expand_urls(s):
            given = url
            if _is_url(url):  # checked as webdataset will open it: GOPEN_REWRITE applied
                url = rewritten(url)
            if url.startswith("file:"):
                url = url2pathname(urlparse(url).path)
            elif _is_url(url):
                check_url(url, allow_pipe, given)
                out.append(url)
                continue
            path = Path(url).expanduser()
            if base is not None and not path.is_absolute():
                path = Path(base) / path
            path = path.absolute()
            if glob.has_magic(str(path)):
                out.extend(sorted(glob.glob(str(path))))
            else:
                out.append(str(path))
    return out


def _open(url: str) -> Any:
    """A binary stream of one shard: a local path as a plain file (never through a URL
    handler), a URL (from `expand_shards`: rewritten already) through webdataset's handler,
    whose refusals become one `UserError` line."""
    if not _is_url(url):
        return open(url, "rb")
    return open_url(url)


def _close(stream: Any) -> None:
    if stream is not None:
        stream.close()


def _iter_members(url: str, max_bytes: int | None = MAX_MEMBER_BYTES,
                  oversized: Callable[[str, int], None] | None = None,
                  ) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) for every regular file of one shard, in tar order; members over
    ``max_bytes`` are skipped unread and passed to ``oversized``."""
    stream = _open(url)
    finished = False
    try:
        yield from iter_members(stream, max_bytes, oversized, base_plus_ext)
        finished = True
    finally:
        try:
            _close(stream)
        except Exception:
            if finished:  # a pipe that exits with an error after its last byte: a bad shard
                raise


_COUNT_CACHE: dict[tuple, int] = {}
#: shards whose count stopped at damage (their true size is unknown: it is at least the count)
_DAMAGED: set[str] = set()


def count_samples(url: str) -> int:
    """Number of samples (distinct keys) in one shard, read from the tar headers only.

    Local files are cached by path, size and modification time. A shard that breaks part way
    counts the samples before the break (with a warning)."""
    local = not _is_url(url)
    if local:
        p = Path(url)
        if not p.is_file():
            raise UserError(f"shard {url!r} does not exist")
        st = p.stat()
        cache_key: tuple = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    else:
        cache_key = (url,)
    if cache_key in _COUNT_CACHE:
        return _COUNT_CACHE[cache_key]
    keys: set[str] = set()

    def add(tar: tarfile.TarFile) -> None:
        for m in tar:
            key, _ = base_plus_ext(m.name)
            if m.isreg() and key is not None and not Path(m.name).name.startswith("__"):
                keys.add(key)

    try:
        if local and not url.endswith((".gz", ".bz2", ".xz", ".zst")):
            with tarfile.open(url, mode="r:") as tar:  # seekable: skips over the data
                add(tar)
        else:
            stream = _open(url)
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    add(tar)
            finally:
                try:
                    _close(stream)
                except Exception:
                    pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        warnings.warn(f"shard {url} is damaged ({exc}); counting {len(keys)} samples before "
                      "the damage (it held at least that many)", CorruptDataWarning,
                      stacklevel=2)
        _DAMAGED.add(url)
    _COUNT_CACHE[cache_key] = len(keys)
    return len(keys)


class _Oversized(str):
    """A report of shard members skipped for their size (counted apart from damage)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


def decode_rgb(data: bytes) -> Tensor:
    """An encoded image (any format PIL reads) as a uint8 (3, H, W) RGB tensor; truncated or
    unreadable data raises. (PIL, not torchvision.io, whose decoders are deprecated.)"""
    with Image.open(io.BytesIO(data)) as img:
        return pil_to_tensor(img.convert("RGB"))


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A uint8 (3, H, W) image resized (bilinear, antialiased) to ``size``."""
    out = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


@dataclass
class _Shard:
    url: str
    count: int  # samples per epoch from this shard (exact when ``exact``)
    exact: bool
    cap: int | None = None  # read no more than this many samples (``limit``)
    damaged: bool = False  # its count stopped at damage: samples after it are not counted


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
        self.shards = self._plan(urls, samples, limit)
        # skipped samples, unreadable shards, samples lost in them, usable samples delivered,
        # images resized to image_size, members over max_member_bytes skipped
        self._stats = multiprocessing.get_context().Array("q", 6)
        self._reported = (0, 0, 0)

    # ----------------------------------------------------------------------------- planning
    @staticmethod
    def _plan(urls: list[str], samples: int | None, limit: int | None) -> list[_Shard]:
        """Per-shard counts (counted, or an even split of ``samples``) and the ``limit`` cut."""
        shards: list[_Shard] = []
        if samples is None or limit is not None:
            total = 0
            for url in urls:
                if limit is not None and total >= limit:
                    break
                n = count_samples(url)
                if n == 0:
                    warnings.warn(f"shard {url} holds no samples; it is left out",
                                  CorruptDataWarning, stacklevel=3)
                shards.append(_Shard(url, n, True, damaged=url in _DAMAGED))
                total += n
        else:
            small, extra = divmod(samples, len(urls))
            shards = [_Shard(u, small + (i < extra), False) for i, u in enumerate(urls)]
        if limit is not None:
            kept, total = [], 0
            for s in shards:
                if total >= limit:
                    break
                if total + s.count > limit:
                    s.cap = s.count = limit - total
                kept.append(s)
                total += s.count
            shards = kept
        shards = [s for s in shards if s.count > 0]
        if not shards:
            raise UserError(f"no samples found in {len(urls)} shard(s) starting with "
                            f"{urls[0]!r}")
        return shards

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
            return sum(s.count for s in self.shards) // world
        return sum(s.count for s in self.shards[rank::world])

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
    def _read_shard(self, shard: _Shard, log: Callable[[str], None]) -> Iterator[dict]:
        """The raw samples of one shard; stops at ``cap`` or at the first unreadable byte."""
        seen = 0
        current: dict[str, Any] | None = None
        big: list[tuple[str, int]] = []
        members = _iter_members(shard.url, self.max_member_bytes,
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
                cap = self.max_member_bytes or 0
                log(_Oversized(f"shard {shard.url}: skipped {len(big)} member(s) larger than "
                               f"{_mib(cap)} without reading them (e.g. {big[0][0]}, "
                               f"{_mib(big[0][1])}); raise max_member_mb in the data's "
                               "manifest to read them"))

    def _decode(self, sample: dict[str, Any]) -> tuple[Tensor, int, bool]:
        """The transformed image, its label, and whether it was resized to ``image_size``."""
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"no image ({'/'.join(IMAGE_KEYS)}) among {sorted(sample)}")
        if "cls" not in sample:
            raise ValueError("no cls label")
        label = int(sample["cls"].decode("ascii").strip())
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} is outside 0..{(self.num_classes or 1) - 1}")
        image = decode_rgb(sample[image_key])
        resized = self.image_size is not None and tuple(image.shape[-2:]) != self.image_size
        if resized:
            image = _resize(image, self.image_size)
        return self.transform(image), label, resized

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
            big_here += isinstance(msg, _Oversized)
            if warned <= self.max_warnings:
                _warn(msg)
            elif warned == self.max_warnings + 1:
                _warn("further corrupt-data warnings from this worker are suppressed this "
                      "epoch; totals follow")

        raw = self._raw(rank, world, worker, workers, log)
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
