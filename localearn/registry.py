"""Everything localearn trains comes from entry points, read with `importlib.metadata`.

Groups: ``localearn.rules`` (UpdateRule classes), ``localearn.models`` (backbone factories
``f(num_classes) -> nn.Module``), ``localearn.splitters`` (LocalModuleSplitter classes) and
``localearn.datasets`` (dataset factories returning `localearn.data.DataSplits`). First-party
plugins are registered in pyproject.toml exactly as a third-party package registers its own;
this module imports none of them by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from localearn.errors import UserError

GROUPS = {
    "rule": "localearn.rules",
    "model": "localearn.models",
    "splitter": "localearn.splitters",
    "dataset": "localearn.datasets",
}


def distribution(ep: EntryPoint) -> str:
    """The name of the installed distribution that registers ``ep`` ("?" when unknown)."""
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


class SessionEntry:
    """An object registered for this Python session (`register`), shaped like an entry point."""

    dist = type("Session", (), {"name": "(this session)"})()

    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.obj, self.value = name, obj, getattr(obj, "__qualname__", repr(obj))

    def load(self) -> Any:
        return self.obj


#: objects registered in this session by kind; they take precedence over entry points
_SESSION: dict[str, dict[str, SessionEntry]] = {kind: {} for kind in GROUPS}


def register(kind: str, name: str, obj: Any) -> None:
    """Register ``obj`` under ``name`` for this Python session (a notebook, a script), checked
    as an entry point would be; it shadows an installed plugin of the same name."""
    ok, want = _expected(kind)
    if not ok(obj):
        raise UserError(f"cannot register {obj!r} as {kind} {name!r}: expected {want}")
    _SESSION[kind][name] = SessionEntry(name, obj)


def available(kind: str) -> dict[str, EntryPoint]:
    """Registered entry points of one kind (``rule``, ``model``, ``splitter``, ``dataset``),
    with this session's registrations (`register`) in place of any of the same name.

    Two distributions that register one name get a warning naming both; the first on
    ``sys.path`` wins, as for imports."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=GROUPS[kind]):
        first = found.setdefault(ep.name, ep)
        if first is not ep and distribution(first) != distribution(ep):
            warnings.warn(f"{kind} {ep.name!r} is registered by two distributions, "
                          f"{distribution(first)!r} and {distribution(ep)!r}; using "
                          f"{distribution(first)!r}'s", RuntimeWarning, stacklevel=2)
    found.update(_SESSION[kind])
    return dict(sorted(found.items()))


def _expected(kind: str) -> tuple[Callable[[Any], bool], str]:
    """A check that a loaded plugin is of the right kind, and what that kind is, in words."""
    from localearn.interfaces import LocalModuleSplitter, UpdateRule

    if kind == "rule":
        return (lambda o: isinstance(o, type) and issubclass(o, UpdateRule),
                "a subclass of localearn.UpdateRule")
    if kind == "splitter":
        return (lambda o: isinstance(o, type) and issubclass(o, LocalModuleSplitter),
                "a subclass of localearn.LocalModuleSplitter")
    return callable, "a callable factory"


def load(kind: str, name: str) -> Any:
    """The object registered under ``name``. An unknown name, a plugin that fails to import and
    a plugin of the wrong kind are each a one-line `UserError` naming the package."""
    eps = available(kind)
    if name not in eps:
        valid = ", ".join(eps) or "(none registered)"
        raise UserError(f"unknown {kind} {name!r}; registered {kind}s: {valid}")
    ep = eps[name]
    try:
        obj = ep.load()
    except Exception as exc:
        raise UserError(f"{kind} {name!r} of package {distribution(ep)!r} failed to load from "
                        f"{ep.value!r}: {type(exc).__name__}: {exc}") from None
    ok, want = _expected(kind)
    if not ok(obj):
        raise UserError(f"{kind} {name!r} of package {distribution(ep)!r} ({ep.value}) is "
                        f"{obj!r}, not {want}")
    return obj


def describe(obj: Any) -> str:
    """One line about a registered object: its ``description`` or its docstring's first line."""
    text = getattr(obj, "description", "") or (getattr(obj, "__doc__", "") or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def listing(kind: str) -> list[tuple[str, str]]:
    """``(name, one-line description)`` for everything registered of one kind."""
    rows = []
    for name in available(kind):
        try:
            rows.append((name, describe(load(kind, name))))
        except UserError as exc:  # a broken third-party plugin must not hide the others
            rows.append((name, f"(broken: {exc})"))
    return rows


def providers(kind: str) -> dict[str, str]:
    """The distribution that provides each registered name of one kind."""
    return {name: distribution(ep) for name, ep in available(kind).items()}


def plugin_name(obj: Any) -> str:
    """How a plugin object is named in error messages: its class path, and the distribution
    that registers it when an entry point does (``probe_rule.Probe, package 'probe-rule'``)."""
    cls = obj if isinstance(obj, type) else type(obj)
    path = f"{cls.__module__}.{cls.__qualname__}"
    value = f"{cls.__module__}:{cls.__qualname__}"
    for kind in GROUPS:
        for ep in entry_points(group=GROUPS[kind]):
            if ep.value == value:
                return f"{path}, package {distribution(ep)!r}"
    return path
