"""Rule expressions such as ``mlaan(infopro(loss=contrast), k=3)``: parsed, never evaluated.

The text is read with `ast` in eval mode and only names, calls and constants are accepted.
A positional argument is a nested rule; a keyword argument is an option whose value is a
number, a string, a boolean or a bare word (read as a string: ``loss=contrast``).

Values are checked strictly against the rule's annotations: an integer option refuses 1e9 or
true, a number option refuses true, NaN and infinity; an option given twice is an error, and so
is an expression longer than `MAX_LENGTH` characters.
"""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from localearn import registry
from localearn.errors import UserError
from localearn.interfaces import UpdateRule

#: the longest rule expression read (a long MLAAN leap table fits many times over)
MAX_LENGTH = 4096


@dataclass
class RuleExpr:
    name: str
    args: list[RuleExpr] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [str(a) for a in self.args] + [f"{k}={v}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


def parse(text: str) -> RuleExpr:
    """Parse a rule expression; malformed text is a `UserError`."""
    hint = "expected a rule name or a call such as mlaan(dgl, k=3)"
    if len(text) > MAX_LENGTH:
        raise UserError(f"malformed rule expression {text[:40]!r}...: {len(text)} characters, "
                        f"the longest read is {MAX_LENGTH}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return _rule(tree.body, text, hint)
    except (SyntaxError, MemoryError, RecursionError, ValueError):
        # ValueError: a NUL byte; MemoryError/RecursionError: absurd nesting
        raise UserError(f"malformed rule expression {text[:200]!r}: {hint}") from None


def _rule(node: ast.AST, text: str, hint: str) -> RuleExpr:
    if isinstance(node, ast.Name):
        return RuleExpr(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_rule(a, text, hint) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise UserError(f"malformed rule expression {text!r}: ** is not allowed")
            if kw.arg in kwargs:
                raise UserError(f"malformed rule expression {text!r}: option {kw.arg!r} is "
                                "given twice")
            kwargs[kw.arg] = _value(kw.value, text)
        return RuleExpr(node.func.id, args, kwargs)
    raise UserError(f"malformed rule expression {text!r}: {hint}")


def _value(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return _finite(node.value, text)
    if isinstance(node, ast.Name):
        return {"true": True, "false": False, "none": None}.get(node.id.lower(), node.id)
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)):
        return _finite(-node.operand.value, text)
    raise UserError(f"malformed rule expression {text!r}: option values must be numbers, "
                    "strings, true/false or bare words")


def _finite(value: Any, text: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"malformed rule expression {text!r}: option values must be finite "
                        f"numbers (got {value})")
    return value


def build(spec: str | RuleExpr) -> UpdateRule:
    """Instantiate the rule an expression names, nested rules first."""
    expr = parse(spec) if isinstance(spec, str) else spec
    cls = registry.load("rule", expr.name)
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    positional = [p for p in params if p.default is p.empty and p.kind != p.KEYWORD_ONLY]
    options = {p.name: p for p in params if p.name not in {q.name for q in positional}}
    if len(expr.args) != len(positional):
        want = ", ".join(p.name for p in positional) or "no nested rule"
        raise UserError(f"rule {expr.name!r} takes {len(positional)} nested rule(s) ({want}), "
                        f"got {len(expr.args)} in {expr}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in expr.kwargs.items():
        if key not in options:
            valid = ", ".join(options) or "none"
            raise UserError(f"unknown option {key!r} for rule {expr.name!r}; valid options: "
                            f"{valid}")
        kwargs[key] = _check(expr.name, key, value, hints.get(key))
    nested = [build(a) for a in expr.args]
    try:
        rule = cls(*nested, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad options for rule {expr.name!r}: {exc}") from None
    rule.expression = str(expr)
    return rule


def _hints(cls: type) -> dict[str, Any]:
    try:
        return inspect.get_annotations(cls.__init__, eval_str=True)
    except Exception:
        return {}


def _check(rule: str, key: str, value: Any, annotation: Any) -> Any:
    if annotation is None:
        return value
    try:  # strict: no 1e9 for an integer, no true for a number, no 'nan' string for a float
        return TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise UserError(f"bad value {value!r} for option {key!r} of rule {rule!r}: {msg}") \
            from None
