"""Export a saved run's backbone to safetensors, under the plain backbone's parameter names,
with what a user of the file needs as metadata (model, classes, input shape, normalisation)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from localearn.engine.atomic import atomic_write_bytes, os_problem, short_path
from localearn.engine.checkpoint import SavedRun, check_state, evaluated_weights
from localearn.engine.rundir import resolve
from localearn.errors import UserError


def export_safetensors(path: Path, out: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the backbone weights of a saved run (a checkpoint file or a run folder: its final
    ``checkpoint.pt`` or newest step checkpoint) to safetensors, under the plain backbone's
    parameter names, so ``registry model(num_classes=...)`` loads them for inference. The
    network is built by `localearn.build.build_run`, as for training, in one process whatever
    the run was trained with (pipelined stages included). The file is written atomically; a
    folder, a checkpoint, or (without ``overwrite``) any existing file is refused as the
    target."""
    from safetensors.torch import save

    from localearn.build import build_run

    path = Path(path)
    if path.is_dir():
        final = path / "checkpoint.pt"
        path = final if final.is_file() else resolve("latest", path)[0]
    out = Path(out) if out is not None else path.with_suffix(".safetensors")
    check_export_target(path, out, overwrite)  # before the work: refuse early
    saved = SavedRun.open(path)
    info = saved.info
    net = build_run(saved.fit_config(), info=info).net
    weights = evaluated_weights(saved.state)  # the weight average, when the run kept one
    check_state(net, weights, "model", path)
    net.load_state_dict(weights)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    metadata = export_metadata(saved.config, saved.state, info)
    atomic_write_bytes(out, save(tensors, metadata=metadata))
    return out


def export_metadata(cfg: dict[str, Any], ckpt: dict[str, Any], info: Any) -> dict[str, str]:
    """What a user of an exported file needs besides the weights, as safetensors metadata
    (strings; lists as JSON): the registered model, the number of classes, the input shape
    (C, H, W), the normalisation mean and std, the dataset and its class names in label
    order, and where the weights came from (rule, step)."""
    return {"format": "localearn-backbone", "model": cfg["model"],
            "num_classes": str(info.num_classes),
            "input_shape": json.dumps(list(info.input_shape)),
            "mean": json.dumps(list(info.mean)), "std": json.dumps(list(info.std)),
            "dataset": str(cfg.get("dataset", "")),
            "class_names": json.dumps(list(info.class_names)),
            "rule": cfg["rule"], "step": str(ckpt["step"])}


def read_export_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """`export_metadata` decoded: numbers as int, lists as tuples."""
    out: dict[str, Any] = dict(meta)
    for key in ("num_classes", "step"):
        if key in out:
            out[key] = int(out[key])
    for key in ("input_shape", "mean", "std", "class_names"):
        if key in out:
            out[key] = tuple(json.loads(out[key]))
    return out


def check_export_target(source: Path, out: Path, overwrite: bool = False) -> None:
    """Refuse an export target that is a folder, the checkpoint being read, any checkpoint,
    or (without ``overwrite``) any existing file."""
    try:
        if out.is_dir():
            raise UserError(f"-o {short_path(out)} is a folder; give a file name, e.g. "
                            f"{short_path(out / 'model.safetensors')}")
        exists = out.exists()
        same = exists and source.exists() and out.resolve() == source.resolve()
    except OSError as exc:
        raise UserError(f"-o {short_path(out)} cannot be used: {os_problem(out, exc)}") from None
    if same:
        raise UserError(f"-o {out} is the checkpoint being exported; writing there would "
                        "replace it: pick another file")
    if exists and _is_checkpoint(out):
        raise UserError(f"-o {out} is a checkpoint; exporting there would replace it: pick "
                        "another file")
    if exists and not overwrite:
        raise UserError(f"-o {out} exists; pass --overwrite to replace it, or pick another "
                        "file")


def _is_checkpoint(path: Path) -> bool:
    """A torch.save archive (a zip file holding a ``data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
