"""Where a dataset's files are: the folders looked in for a dataset name (`data_dirs`,
`find_data_dir`), and a shard folder's manifest (``manifest.json`` or ``.toml``): its
settings, checked, and the shard files or URLs of each split."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from localearn.errors import UserError

__all__ = ["DATA_ROOTS", "MANIFESTS", "SPLIT_ALIASES", "data_dirs", "find_data_dir",
           "max_member_bytes", "positive_int", "read_manifest", "split_entry", "split_shards"]

#: where a dataset NAME is looked for when --data-dir is not given; LOCALEARN_DATA is the root
#: that holds one folder per dataset (``$LOCALEARN_DATA/cifar10``, ``$LOCALEARN_DATA/svhn``...)
DATA_ROOTS = ("{env}", "data", "../shared/data")
MANIFESTS = ("manifest.json", "manifest.toml")
SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val", "validation")}


def data_dirs(data_dir: Path | None, name: str) -> list[Path]:
    """The folders to look in for dataset ``name``: ``data_dir`` (and ``data_dir/name``) when
    given; else ``NAME`` under ``$LOCALEARN_DATA``, ``data/`` and ``../shared/data/``."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    env = os.environ.get("LOCALEARN_DATA")
    return [Path(r.format(env=env)) / name for r in DATA_ROOTS if env or "{env}" not in r]


def find_data_dir(data_dir: Path | None, name: str, holds: Callable[[Path], bool],
                  what: str, title: str) -> Path:
    """The first of `data_dirs` for which ``holds(folder)`` is true; else a `UserError` that
    names the data set (``title``), lists where it looked and says what the folder must hold
    (``what``)."""
    candidates = data_dirs(data_dir, name)
    for c in candidates:
        if c.is_dir() and holds(c):
            return c
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise UserError(f"{title} not found: looked for it in {looked}; pass --data-dir DIR "
                    f"holding {what}")


# ----------------------------------------------------------------------------- manifests
def read_manifest(root: Path) -> dict:
    """``manifest.json`` or ``manifest.toml`` in a shard folder ({} when there is none)."""
    import json
    import tomllib

    for name in MANIFESTS:
        path = root / name
        if path.is_file():
            try:
                data = (json.loads(path.read_text()) if name.endswith(".json")
                        else tomllib.loads(path.read_text()))
            except (ValueError, tomllib.TOMLDecodeError) as exc:
                raise UserError(f"{path} is not valid: {str(exc).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise UserError(f"{path} must hold a table of settings")
            return data
    return {}


def split_entry(manifest: dict, split: str) -> dict:
    """The manifest's table for ``split`` (``train``; ``test``, ``val`` or ``validation``)."""
    for name in SPLIT_ALIASES[split]:
        entry = manifest.get(name)
        if isinstance(entry, dict):
            return entry
    return {}


def positive_int(value: object, what: str, where: Path) -> int | None:
    """``value`` (None when absent); anything but a positive integer is a `UserError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {what} must be a positive integer (got {value!r})")
    return value


def max_member_bytes(manifest: dict, root: Path) -> int:
    """The largest shard member read, in bytes: the manifest's ``max_member_mb`` (MiB), else
    64 MiB; larger members are skipped unread and reported."""
    from localearn.data.shardio import MAX_MEMBER_BYTES

    mb = positive_int(manifest.get("max_member_mb"), "max_member_mb", root / "manifest")
    return MAX_MEMBER_BYTES if mb is None else mb << 20


def split_shards(root: Path, manifest: dict,
                 split: str) -> tuple[list[Path] | list[str] | str, int | None]:
    """Shard specs and sample count of one split: the manifest's ``urls``, or the local files
    named ``*{split}-*.tar*`` (``val``/``validation`` also serve as the test split)."""
    entry = split_entry(manifest, split)
    where = root / "manifest"
    samples = positive_int(entry.get("samples"), f"{split}.samples", where)
    urls = entry.get("urls")
    if urls is not None:
        if not (isinstance(urls, str) or (isinstance(urls, list)
                                          and all(isinstance(u, str) for u in urls))):
            raise UserError(f"{where}: {split}.urls must be a string or a list of strings")
        return urls, samples
    for name in SPLIT_ALIASES[split]:
        found = sorted(root.absolute().glob(f"*{name}-*.tar*"))  # local paths, never URLs
        if found:
            expected = entry.get("shards")
            if isinstance(expected, int) and expected != len(found):
                raise UserError(f"{root}: the manifest lists {expected} {split} shards but "
                                f"{len(found)} are there")
            return found, samples
    raise UserError(f"no {split} shards in {root}: expected files named "
                    f"'{'val' if split == 'test' else 'train'}-000000.tar' and so on"
                    f", or '{split}.urls' in {root / MANIFESTS[0]}")
