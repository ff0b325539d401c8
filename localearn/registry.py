"""Everything localearn trains comes from entry points, read with `importlib.metadata`.

Groups: ``localearn.rules`` (UpdateRule classes), ``localearn.models`` (backbone factories
``f(num_classes) -> nn.Module``), ``localearn.splitters`` (LocalModuleSplitter classes) and
``localearn.datasets`` (dataset factories returning `localearn.data.DataSplits`). First-party
plugins are registered in pyproject.toml exactly as a third-party package registers its own;
this module imports none of them by name.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from localearn.errors import UserError

GROUPS = {
    "rule": "localearn.rules",
    "model": "localearn.models",
    "splitter": "localearn.splitters",
    "dataset": "localearn.datasets",
}


def available(kind: str) -> dict[str, EntryPoint]:
    """Registered entry points of one kind (``rule``, ``model``, ``splitter``, ``dataset``)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUPS[kind]):
        found.setdefault(ep.name, ep)  # the first distribution on sys.path wins, as for imports
    return dict(sorted(found.items()))


def load(kind: str, name: str) -> Any:
    """The object registered under ``name``; an unknown name is a `UserError` naming the valid."""
    eps = available(kind)
    if name not in eps:
        valid = ", ".join(eps) or "(none registered)"
        raise UserError(f"unknown {kind} {name!r}; registered {kind}s: {valid}")
    return eps[name].load()


def describe(obj: Any) -> str:
    """One line about a registered object: its ``description`` or its docstring's first line."""
    text = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def listing(kind: str) -> list[tuple[str, str]]:
    """``(name, one-line description)`` for everything registered of one kind."""
    rows = []
    for name, ep in available(kind).items():
        try:
            rows.append((name, describe(ep.load())))
        except Exception as exc:  # a broken third-party plugin must not hide the others
            rows.append((name, f"(failed to load: {exc})"))
    return rows
