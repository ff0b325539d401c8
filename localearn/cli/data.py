"""``localearn data cifar10-shards``: write the CIFAR-10 WebDataset shards that the
``cifar10-shards`` dataset reads, from torchvision's python batches (``cifar-10-batches-py``).

The shards hold ``KEY.jpg`` (the image, JPEG) and ``KEY.cls`` (the class index as ASCII digits)
in gzip-compressed tar files ``cifar10-{train,test}-NNNNNN.tar.gz``, beside a ``manifest.json``
with each split's sample and shard counts and the class names. Images keep the batches' order
(already mixed: every shard holds every class). Shards are written to a hidden folder first and
moved into place when all are complete, the manifest last, so an interrupted run leaves no
half-written shard set behind.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from localearn.cli.common import plural
from localearn.errors import UserError

BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
FOLDER = "cifar-10-batches-py"

if TYPE_CHECKING:
    import numpy as np


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare data sets (cifar10-shards)")
    kinds = data.add_subparsers(dest="data_command", required=True,
                                parser_class=type(data))
    p = kinds.add_parser(
        "cifar10-shards", help="write CIFAR-10 WebDataset shards from torchvision's files",
        description="Write cifar10-{train,test}-NNNNNN.tar.gz (keys jpg and cls) and "
                    "manifest.json, the files the cifar10-shards dataset reads, from "
                    "torchvision's CIFAR-10 python batches.")
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DIR",
                   help=f"the {FOLDER} folder, or the folder holding it")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where the shards and manifest.json go")
    p.add_argument("--download", action="store_true",
                   help=f"let torchvision download {FOLDER} into --from first")
    p.add_argument("--shard-size", type=int, default=5000, metavar="N",
                   help="images per shard (default: 5000)")
    p.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG quality 1..100 (default: 95)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace CIFAR-10 shards already in --out")
    p.set_defaults(func=cifar10_shards_command)


def cifar10_shards_command(args: argparse.Namespace) -> int:
    manifest = write_cifar10_shards(args.source, args.out, shard_size=args.shard_size,
                                    quality=args.quality, overwrite=args.overwrite,
                                    download=args.download)
    for split in ("train", "test"):
        m = manifest[split]
        print(f"{split}: {plural(m['samples'], 'image')} in {plural(m['shards'], 'shard')}")
    print(f"wrote {args.out / 'manifest.json'}; train with: localearn fit --dataset "
          f"cifar10-shards --data-dir {args.out}")
    return 0


def find_batches(source: Path) -> Path:
    """The ``cifar-10-batches-py`` folder at or under ``source``, checked for every batch."""
    folder = source / FOLDER if (source / FOLDER).is_dir() else source
    names = [n for split in BATCHES.values() for n in split] + ["batches.meta"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} is not torchvision's {FOLDER}: missing "
                        f"{', '.join(missing)}; pass the folder holding it with --from (or add "
                        "--download)")
    return folder


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # pickle raises many types for a damaged file
        raise UserError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 3) and int labels of one split, in the batches' order."""
    import numpy as np

    images, labels = [], []
    for name in BATCHES[split]:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise UserError(f"{folder / name}: expected data (N x 3072 bytes) and labels "
                            f"({type(exc).__name__}: {exc})") from None
        if len(data) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise UserError(f"{folder / name}: {len(data)} images and {len(y)} labels, labels "
                            "must be 0..9")
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def class_names(folder: Path) -> list[str]:
    meta = _unpickle(folder / "batches.meta")
    names = meta.get(b"label_names") or meta.get("label_names") or []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_cifar10_shards(source: Path, out: Path, *, shard_size: int = 5000, quality: int = 95,
                         overwrite: bool = False, download: bool = False) -> dict:
    """Write the shards and ``manifest.json`` into ``out``; the manifest's contents."""
    import webdataset as wds

    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 (got {shard_size})")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must lie in 1..100 (got {quality})")
    if download:
        from torchvision.datasets import CIFAR10

        source.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(source), train=True, download=True)
    if not source.is_dir():
        raise UserError(f"--from {source}: no such folder")
    folder = find_batches(source)
    existing = sorted(out.glob("cifar10-*.tar*")) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"{out} holds CIFAR-10 shards already ({existing[0].name}, ...); pick "
                        "another --out, or pass --overwrite to replace them")
    from localearn.outputs import check_output

    check_output(out / "manifest.json", flag="--out", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".cifar10-shards.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest: dict = {}
    for split in ("train", "test"):
        images, labels = read_split(folder, split)
        pattern = str(tmp / f"cifar10-{split}-%06d.tar.gz")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
            for i, (image, label) in enumerate(zip(images, labels)):
                sink.write({"__key__": f"{split}{i:06d}", "jpg": jpeg(image, quality),
                            "cls": str(int(label)).encode()})
        shards = len(list(tmp.glob(f"cifar10-{split}-*.tar.gz")))
        manifest[split] = {"samples": len(labels), "shards": shards}
    manifest["classes"] = class_names(folder)
    for old in existing:
        old.unlink()
    for shard in sorted(tmp.iterdir()):
        shard.replace(out / shard.name)
    tmp.rmdir()
    from localearn.engine.checkpoint import atomic_write_text

    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
