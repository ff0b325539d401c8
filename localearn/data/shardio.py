"""Opening and reading one shard: whether ``pipe:`` URLs (shell commands) may be opened;
the URL webdataset would open (its ``GOPEN_REWRITE`` rules applied first, so the ``pipe:``
check sees what will run); the tar members, read one at a time, each at most
`MAX_MEMBER_BYTES` (a larger member is skipped over, never held in memory: a small compressed
shard can claim gigabytes of zeros)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

from localearn.errors import UserError

#: the largest shard member read, by default (an image sample's file is far smaller); the
#: ``max_member_mb`` of a data folder's manifest sets another
MAX_MEMBER_BYTES = 64 << 20
REWRITE_ENV = "GOPEN_REWRITE"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, left out


#: set to 1 to let commands other than ``fit --allow-pipe`` read ``pipe:`` URLs
PIPE_ENV = "LOCALEARN_ALLOW_PIPE"
_PIPES: contextvars.ContextVar[bool | None] = contextvars.ContextVar("localearn_allow_pipe",
                                                                      default=None)


def pipes_from_env() -> bool | None:
    """``LOCALEARN_ALLOW_PIPE``: True for 1/true/yes, False for anything else, None unset."""
    value = os.environ.get(PIPE_ENV)
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def pipes_default() -> bool:
    """Whether a `ShardStream` made now may read ``pipe:`` URLs: the innermost
    `pipes_allowed`, else ``LOCALEARN_ALLOW_PIPE``, else True (Python code names its URLs)."""
    inner = _PIPES.get()
    if inner is not None:
        return inner
    env = pipes_from_env()
    return True if env is None else env


@contextlib.contextmanager
def pipes_allowed(allow: bool) -> Iterator[None]:
    """Streams made inside may (True) or may not (False) read ``pipe:`` URLs."""
    token = _PIPES.set(bool(allow))
    try:
        yield
    finally:
        _PIPES.reset(token)


def check_url(url: str, allow_pipe: bool, original: str | None = None) -> None:
    """Refuse a ``pipe:`` URL unless ``allow_pipe`` (or when webdataset forbids them);
    ``original``: the URL before ``GOPEN_REWRITE`` made ``url`` of it."""
    if not url.startswith("pipe:"):
        return
    if not allow_pipe:
        how = (f" ({REWRITE_ENV} made it of {original[:80]!r})"
               if original is not None and original != url else "")
        raise UserError(f"shard URL {url[:80]!r}{how} would run a shell command; pipe: URLs "
                        "are off unless you pass --allow-pipe (or set LOCALEARN_ALLOW_PIPE=1), "
                        "and only for data you trust")
    from webdataset import utils as wds_utils

    if wds_utils.enforce_security:
        raise UserError(f"webdataset refuses shard URL {url[:80]!r}: WDS_SECURE=1 forbids pipe: "
                        "URLs; unset WDS_SECURE, or name the shards by local path or http(s) URL")


def rewritten(url: str) -> str:
    """``url`` after webdataset's ``GOPEN_REWRITE`` rules (``pattern=replacement;...``): the
    URL that opening it would really open. A rule that cannot be applied is one line."""
    rules = os.environ.get(REWRITE_ENV)
    if rules is None:
        return url
    from webdataset.gopen import rewrite_url

    try:
        return rewrite_url(url)
    except (ValueError, re.error) as exc:
        raise UserError(f"{REWRITE_ENV}={rules[:80]!r} cannot be applied to shard URL "
                        f"{url[:80]!r} ({exc}); valid: rules 'prefix=replacement' separated by "
                        f"';', or unset {REWRITE_ENV}") from None


def open_url(url: str) -> Any:
    """A binary stream of the URL ``url`` through webdataset's handler for its scheme,
    without applying ``GOPEN_REWRITE`` again (`rewritten` did, before the URL was checked);
    webdataset's refusals (``WDS_SECURE``) are one line."""
    from webdataset.gopen import gopen_schemes

    handler = gopen_schemes.get(urlparse(url).scheme, gopen_schemes["__default__"])
    try:
        return handler(url, "rb", 8192)
    except ValueError as exc:
        if "unsafe_gopen" in str(exc) or "security" in str(exc):
            raise UserError(f"webdataset refuses shard URL {url[:80]!r} ({exc}); unset "
                            "WDS_SECURE or name the shards by local path") from None
        raise


def iter_members(stream: Any, max_bytes: int | None = MAX_MEMBER_BYTES,
                 oversized: Callable[[str, int], None] | None = None,
                 split: Callable[[str], tuple[str | None, str | None]] | None = None,
                 ) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of every regular file of the tar ``stream``, in order; a member
    over ``max_bytes`` is skipped without being read into memory and passed to ``oversized``
    (its name and size). ``split``: name -> (key, extension), webdataset's by default."""
    if split is None:
        from webdataset.tariterators import base_plus_ext as split
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for member in tar:
        tar.members = []  # a stream: keep no list of every header read
        name = member.name
        if not member.isreg() or _META.match(name) or (
                "/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        key, ext = split(name)
        if key is None:
            continue
        if max_bytes is not None and member.size > max_bytes:
            if oversized is not None:
                oversized(name, member.size)
            continue  # the tar reader skips its data (seeks, or reads it in small blocks)
        data = tar.extractfile(member).read()
        yield key, (ext or "").lower(), data
