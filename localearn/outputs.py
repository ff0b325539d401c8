"""Where a command may write a file: one check for every output (``plot``, ``analyze``,
``evaluate``, ``export``, ``table``, ``data``).

An output is never a folder, never under a file, never one of a run's own files (its
checkpoint, settings, metrics, step log or summary, a repeats' ``seeds.json``, anything in its
``checkpoints/`` folder) nor any checkpoint, and replaces an existing file only with
``--overwrite``. Every refusal is one `UserError` line naming the flag and the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

from localearn.errors import UserError

#: what a run writes in its folder (`localearn.engine.rundir.RUN_FILES`), by role
RUN_FILES = {"checkpoint.pt": "final checkpoint", "config.json": "settings",
             "metrics.jsonl": "metrics", "metrics.csv": "metrics", "steps.jsonl": "step log",
             "summary.json": "summary", "log.txt": "console log", "best.pt": "best checkpoint"}
#: what a set of repeats (``fit --seeds``, ``table``) writes beside its seed folders
SET_FILES = {"seeds.json": "summary of seeds"}
CHECKPOINTS = "checkpoints"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_run_folder(folder: Path) -> bool:
    """A folder holding a run's files, its checkpoints, or a set of repeats' summary."""
    try:
        return any((folder / n).exists() for n in (*RUN_FILES, *SET_FILES)) \
            or (folder / CHECKPOINTS).is_dir()
    except OSError:
        return False


def is_checkpoint(path: Path) -> bool:
    """A torch.save archive (a zip file holding a ``data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def run_file_role(out: Path) -> str | None:
    """What ``out`` is to a run, in words (``"a run's settings file"``, ``"a checkpoint"``...),
    None for a file no run owns. Symbolic links are followed: a link to a run's file is
    that file."""
    seen = [Path(out).absolute()]
    try:
        real = Path(out).resolve()
    except (OSError, RuntimeError):
        real = seen[0]
    if real != seen[0]:
        seen.append(real)
    for path in seen:
        folder = path.parent
        roles = {**RUN_FILES, **SET_FILES}
        if path.name in roles and is_run_folder(folder):
            return f"a run's {roles[path.name]} file"
        if folder.name == CHECKPOINTS and (is_run_folder(folder.parent)
                                           or any(folder.glob("step-*.pt"))):
            return "in a run's checkpoints folder"
    if is_checkpoint(real):
        return "a checkpoint"
    return None


def protect(out: Path, flag: str = "-o") -> None:
    """Refuse ``out`` if it is a run's own file or a checkpoint (``--overwrite`` or not)."""
    role = run_file_role(out)
    if role is not None:
        raise UserError(f"{flag} {out} is {role}; localearn never writes there, not even "
                        "with --overwrite: pick another file")


def check_output(out: Path, *, flag: str = "-o", overwrite: bool = False,
                 png: bool = False) -> None:
    """Refuse the output file ``out`` in one line: a folder, a path under a file, a run's own
    file or a checkpoint, an existing file without ``overwrite``, and with ``png`` an
    existing file that is not a PNG (never replaced)."""
    out = Path(out)
    try:
        if out.is_dir():
            raise UserError(f"{flag} {out} is a folder; give a file name, e.g. "
                            f"{out / ('plot.png' if png else 'out.json')}")
        for parent in out.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"{flag} {out} cannot be written: {parent} is a file, not "
                                    "a folder")
                break
        protect(out, flag)
        exists = out.exists() or out.is_symlink()
        if exists and png:
            with open(out, "rb") as f:
                if f.read(8) != PNG_MAGIC:
                    raise UserError(f"{flag} {out} exists and is not a PNG; refusing to "
                                    "replace it: pick another file")
    except OSError as exc:
        raise UserError(f"{flag} {out} cannot be used: {exc.strerror or exc}") from None
    if exists and not overwrite:
        raise UserError(f"{flag} {out} exists; pass --overwrite to replace it, or pick another "
                        "file")


def check_outputs(targets: Sequence[tuple[str, Path, bool]], *,
                  overwrite: bool = False) -> None:
    """`check_output` for each ``(flag, path, png)`` of one command, and no two of them on one
    file."""
    seen: dict[Path, str] = {}
    for flag, path, png in targets:
        key = Path(path).absolute()
        if key in seen:
            raise UserError(f"{flag} {path} is also the {seen[key]} output; give them different "
                            "files")
        seen[key] = flag
        check_output(Path(path), flag=flag, overwrite=overwrite, png=png)
