"""``localearn predict RUN IMAGES...``: the top classes of image files under a trained run.

Each file is opened with PIL, converted to the run's channels (RGB, or grayscale for one
channel), resized to the run's input size and normalised with the run's own mean and std, all
read from the checkpoint's data info; the backbone's classifier gives the probabilities. Class
names are the run's when it has them, else the class indices. A file that cannot be read as an
image is one line on stderr; the others are still classified.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localearn.errors import UserError

#: the largest image file read (a decompression bomb or a stray video is refused unread)
MAX_BYTES = 64 * 2**20


@dataclass
class Prediction:
    """One file's top classes: ``(name, probability)``, most probable first."""

    path: Path
    top: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path),
                "top": [{"class": n, "probability": p} for n, p in self.top]}


def load_image(path: Path, shape: tuple[int, int, int], mean: tuple[float, ...],
               std: tuple[float, ...]) -> Any:
    """The image file as the run's input: a (C, H, W) float tensor, normalised. A file that
    is not a readable image is a one-line `UserError`."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path}: larger than {MAX_BYTES // 2**20} MiB; not read")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None
    x = torch.from_numpy(array)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    if mean and std:
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        x = (x - m) / s
    return x


def predict(run: Any, paths: list[Path], top: int = 3) -> tuple[list[Prediction], list[str]]:
    """The top ``top`` classes of each readable file under ``run`` (a loaded
    `localearn.analysis.runs.TrainedRun`), and one message per file that could not be read."""
    import torch

    info = run.info
    names = list(info.class_names) or [str(i) for i in range(info.num_classes)]
    top = max(1, min(top, info.num_classes))
    results, problems = [], []
    for path in paths:
        try:
            x = load_image(Path(path), tuple(info.input_shape), tuple(info.mean),
                           tuple(info.std))
        except UserError as exc:
            problems.append(str(exc))
            continue
        with torch.no_grad():
            probs = torch.softmax(run.net(x.unsqueeze(0).to(run.device)).float(), dim=1)[0]
        values, indices = probs.topk(top)
        results.append(Prediction(Path(path), [(names[int(i)], float(v))
                                               for v, i in zip(values, indices)]))
    return results, problems


def run_predict(run_path: str | Path, images: list[str | Path], *, top: int = 3,
                device: str = "cpu", as_json: bool = False) -> int:
    """``localearn predict``: print each file's top classes (or JSON), one line per bad file on
    stderr; exit code 2 when any file was bad."""
    from localearn.analysis.runs import load_run

    if top < 1:
        raise UserError(f"--top must be at least 1 (got {top})")
    run = load_run(run_path, device)
    results, problems = predict(run, [Path(p) for p in images], top=top)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.path}: " + ", ".join(f"{name} {p:.2%}" for name, p in r.top))
    for line in problems:
        print(f"localearn: error: {line}", file=sys.stderr)
    return 2 if problems else 0
