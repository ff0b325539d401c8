"""``localearn rules``, ``models``, ``datasets``: the registered plugins, one line each, and
``localearn rules NAME``: one rule's options, their types and defaults.

The listing reads each plugin's one-line description from its source (the class's
``description`` or its docstring's first line) without importing it, so it starts in well
under a second (importing a plugin imports torch); a plugin whose description is not in its
own source (inherited, computed) is imported for it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from collections.abc import Callable
from importlib.machinery import PathFinder
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from localearn.errors import UserError


def _source_of(module: str) -> Path | None:
    """The source file of ``module``, found without importing it or its packages."""
    parts = module.split(".")
    search: list[str] | None = None
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        try:  # a top-level name through every finder (an editable install's too): not imported
            spec = find_spec(name) if i == 0 else PathFinder.find_spec(name, search)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _first_line(text: str | None) -> str:
    text = (text or "").strip()
    return text.splitlines()[0] if text else ""


def static_description(value: str) -> str | None:
    """The one-line description of the object an entry point ``module:Name`` names, read from
    its source; None when the source does not say it (then the object is imported)."""
    module, _, attr = value.partition(":")
    path = _source_of(module.strip()) if attr else None
    if path is None:
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    for node in tree.body:
        if getattr(node, "name", None) != attr.strip():
            continue
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.Assign) and len(item.targets) == 1
                        and getattr(item.targets[0], "id", None) == "description"
                        and isinstance(item.value, ast.Constant)
                        and isinstance(item.value.value, str)):
                    return _first_line(item.value.value)
            return _first_line(ast.get_docstring(node)) or None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return _first_line(ast.get_docstring(node)) or None
    return None


def listing(kind: str) -> list[tuple[str, str, str]]:
    """``(name, package, description)`` for everything registered of one kind."""
    from localearn import registry

    rows = []
    for name, ep in registry.available(kind).items():
        obj = getattr(ep, "obj", None)
        text = registry.describe(obj) if obj is not None else \
            static_description(str(getattr(ep, "value", "")))
        if text is None:
            try:
                text = registry.describe(registry.load(kind, name))
            except UserError as exc:  # a broken third-party plugin must not hide the others
                text = f"(broken: {exc})"
        rows.append((name, registry.distribution(ep), text))
    return rows


def _type_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return str(value)


def rule_options(name: str) -> list[tuple[str, str, str]]:
    """``(option, type, default)`` of a registered rule, from its ``__init__`` signature; a
    nested rule (a parameter without a default) has the default ``(a rule)``."""
    from localearn import registry
    from localearn.expr import _hints

    cls = registry.load("rule", name)
    hints = _hints(cls)
    rows = []
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = _type_text(hints.get(p.name, p.annotation))
        default = "(a rule, required)" if p.default is p.empty else _default_text(p.default)
        rows.append((p.name, kind, default))
    return rows


def show_rule(name: str) -> int:
    from localearn import registry

    cls = registry.load("rule", name)
    print(f"{name}: {registry.describe(cls)}")
    rows = rule_options(name)
    if not rows:
        print("no options")
        return 0
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"options (as in {name}(..., option=value)):")
    for option, kind, default in rows:
        print(f"  {option:<{width[0]}}  {kind:<{width[1]}}  default {default}")
    return 0


def command(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if getattr(args, "name", None):
            return show_rule(args.name)
        rows = listing(kind)
        width = max((len(n) for n, _, _ in rows), default=0)
        dist = max((len(d) for _, d, _ in rows), default=0)
        for name, package, text in rows:
            print(f"{name:<{width}}  {package:<{dist}}  {text}")
        return 0

    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    for kind in ("rule", "model", "dataset"):
        p = sub.add_parser(f"{kind}s", help=f"list the registered {kind}s"
                           + (" (rules NAME: one rule's options)" if kind == "rule" else ""))
        if kind == "rule":
            p.add_argument("name", nargs="?", metavar="NAME",
                           help="show this rule's options, their types and defaults")
        p.set_defaults(func=command(kind))
