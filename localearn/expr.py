"""Rule expressions such as ``mlaan(infopro(loss=contrast), k=3)``: parsed, never evaluated.

The text is read with `ast` in eval mode and only names, calls and constants are accepted.
A positional argument is a nested rule; a keyword argument is an option whose value is a
number, a string, a boolean or a bare word (read as a string: ``loss=contrast``).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from localearn import registry
from localearn.errors import UserError
from localearn.interfaces import UpdateRule


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
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise UserError(f"malformed rule expression {text!r}: {hint}") from None
    return _rule(tree.body, text, hint)


def _rule(node: ast.AST, text: str, hint: str) -> RuleExpr:
    if isinstance(node, ast.Name):
        return RuleExpr(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_rule(a, text, hint) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise UserError(f"malformed rule expression {text!r}: ** is not allowed")
            kwargs[kw.arg] = _value(kw.value, text)
        return RuleExpr(node.func.id, args, kwargs)
    raise UserError(f"malformed rule expression {text!r}: {hint}")


def _value(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.Name):
        return {"true": True, "false": False, "none": None}.get(node.id.lower(), node.id)
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))):
        return -node.operand.value
    raise UserError(f"malformed rule expression {text!r}: option values must be numbers, "
                    "strings, true/false or bare words")


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
    try:
        return TypeAdapter(annotation).validate_python(value, strict=False)
    except ValidationError as exc:
        msg = exc.errors()[0]["msg"]
        raise UserError(f"bad value {value!r} for option {key!r} of rule {rule!r}: {msg}") \
            from None
