"""Which shards a `ShardStream` reads and how many samples each holds.

Shard specs (brace patterns, globs, lists, URLs) become URLs, local paths made absolute and
``pipe:`` URLs checked; one shard is opened and its members read; samples are counted from the
tar headers (cached); the per-shard plan applies a ``limit``. Damaged or empty shards are
reported with `CorruptDataWarning`.
"""

from __future__ import annotations

import glob
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from localearn.data.shardio import MAX_MEMBER_BYTES, check_url, iter_members, open_url, rewritten
from localearn.errors import UserError

__all__ = ["CorruptDataWarning", "Shard", "count_samples", "expand_shards", "is_url",
           "plan_shards", "shard_members"]

_SCHEMES = ("pipe:", "file:", "http://", "https://", "gs://", "s3://", "ais://", "hf://")


class CorruptDataWarning(UserWarning):
    """A sample or shard was skipped because it could not be read or decoded."""


def is_url(spec: str) -> bool:
    """Whether ``spec`` names a URL (a scheme webdataset opens) rather than a local path."""
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
            if is_url(url):  # checked as webdataset will open it: GOPEN_REWRITE applied
                url = rewritten(url)
            if url.startswith("file:"):
                url = url2pathname(urlparse(url).path)
            elif is_url(url):
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
    if not is_url(url):
        return open(url, "rb")
    return open_url(url)


def _close(stream: Any) -> None:
    if stream is not None:
        stream.close()


def shard_members(url: str, max_bytes: int | None = MAX_MEMBER_BYTES,
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
    local = not is_url(url)
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


@dataclass
class Shard:
    """One shard of a stream's plan."""

    url: str
    count: int  # samples per epoch from this shard (exact when ``exact``)
    exact: bool
    cap: int | None = None  # read no more than this many samples (``limit``)
    damaged: bool = False  # its count stopped at damage: samples after it are not counted


def plan_shards(urls: list[str], samples: int | None, limit: int | None) -> list[Shard]:
    """Per-shard counts (counted, or an even split of ``samples``) and the ``limit`` cut.

    Called by ``ShardStream.__init__`` directly: its warning's stacklevel names the caller."""
    shards: list[Shard] = []
    if samples is None or limit is not None:
        total = 0
        for url in urls:
            if limit is not None and total >= limit:
                break
            n = count_samples(url)
            if n == 0:
                warnings.warn(f"shard {url} holds no samples; it is left out",
                              CorruptDataWarning, stacklevel=3)
            shards.append(Shard(url, n, True, damaged=url in _DAMAGED))
            total += n
    else:
        small, extra = divmod(samples, len(urls))
        shards = [Shard(u, small + (i < extra), False) for i, u in enumerate(urls)]
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
