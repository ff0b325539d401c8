"""Everything localearn trains comes from entry points, read with `importlib.metadata`.

Groups: ``localearn.rules`` (UpdateRule classes), ``localearn.models`` (backbone factories
``f(num_classes) -> nn.Module``), ``localearn.splitters`` (LocalModuleSplitter classes) and
``localearn.datasets`` (dataset factories returning `localearn.data.DataSplits`). First-party
plugins are registered in pyproject.toml exactly as a third-party package registers its own;
this module imports none of them by name.

Model families (``localearn.model_families``): a model named ``family:NAME`` is the family's
factory given ``name=NAME`` (``timm:vit_small_patch16_224``). `make_model` passes a model
factory the data's input shape when it has an ``input_shape`` parameter.
"""

from __future__ import annotations

import functools
import inspect
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
    "family": "localearn.model_families",
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
    if kind == "model" and ":" in name:  # family:NAME, the family's factory given NAME
        family, _, arg = name.partition(":")
        if family not in available("family"):
            raise UserError(f"unknown model {name!r}: no model family {family!r}; "
                            f"families: {families() or '(none registered)'}")
        return functools.partial(load("family", family), name=arg)
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


def _takes(factory: Any, parameter: str) -> bool:
    """True when ``factory``'s signature names ``parameter`` (not only ``**kwargs``)."""
    try:
        return parameter in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a readable signature
        return False


def families() -> str:
    """The registered model families as they are used: ``timm:NAME, ...``."""
    return ", ".join(f"{family}:NAME" for family in available("family"))


def known(kind: str, name: str) -> bool:
    """True when ``name`` is registered; a model named ``family:NAME`` when its family is."""
    if kind == "model" and ":" in name:
        return name.partition(":")[0] in available("family")
    return name in available(kind)


def make_model(name: str, num_classes: int,
               input_shape: tuple[int, int, int] | None = None) -> Any:
    """The model registered as ``name``, built for ``num_classes`` classes and, when its
    factory has an ``input_shape`` parameter, for inputs of that shape (C, H, W)."""
    factory = load("model", name)
    if input_shape is not None and _takes(factory, "input_shape"):
        return factory(num_classes=num_classes, input_shape=tuple(input_shape))
    return factory(num_classes=num_classes)


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
