"""The Python API, for notebooks and scripts: `fit` trains a run in-process and returns the
trained network, auxiliary networks and history; `register_rule`, `register_model` and
`register_dataset` make objects defined in the caller's own code usable by name for the rest
of the session; `load_backbone` reads an exported safetensors file back into the plain model.

A rule may be given as an expression (``"mlaan(dgl, k=3)"``), a rule class defined anywhere
(built with no arguments) or a rule object, composed as the caller likes
(``MLAAN(MyRule(), k=2)``). Console output goes through the ``localearn`` logger.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from localearn import expr, registry
from localearn.config import FitConfig, make_config
from localearn.errors import UserError
from localearn.interfaces import UpdateRule
from localearn.runlog import plural

__all__ = ["fit", "load_backbone", "register_dataset", "register_model", "register_rule"]

RuleLike = str | UpdateRule | type[UpdateRule]


def register_rule(name: str, rule: type[UpdateRule]) -> None:
    """Make ``rule`` (an `UpdateRule` subclass) usable as ``name`` in rule expressions for this
    session: ``register_rule("mine", MyRule)`` lets ``fit(rule="mlaan(mine, k=2)")`` train
    it, its ``__init__`` keyword parameters becoming options as for an installed plugin."""
    registry.register("rule", name, rule)


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory(num_classes=N) -> nn.Module`` usable as ``model=name`` for this session
    (a registered splitter must accept the model it returns)."""
    registry.register("model", name, factory)


def register_dataset(name: str, factory: Callable[..., Any]) -> None:
    """Make a dataset factory usable as ``dataset=name`` for this session: called as
    ``factory(data_dir, download=..., train_limit=..., test_limit=..., seed=...)``, it returns
    `localearn.data.DataSplits` (as the installed datasets do)."""
    registry.register("dataset", name, factory)


#: settings a resumed run does not take from its checkpoint: where it writes (the checkpoint's
#: own folder unless an output folder is given), whether it may replace a run, whether its data
#: may run shell commands (a checkpoint from elsewhere must not switch that on)
NOT_RESUMED = ("output_dir", "overwrite", "allow_pipe", "resume", "seeds")


def resumed_settings(resume: str, given: dict[str, Any]) -> dict[str, Any]:
    """The settings of a resumed run: those stored in the checkpoint ``resume`` names, then
    ``given`` (flags, keywords) over them. ``fit --resume`` and ``fit(resume=...)`` both start
    here."""
    from localearn.engine import checkpoint

    path, previous = checkpoint.resolve(str(resume), given.get("output_dir"))
    saved = {k: v for k, v in checkpoint.saved_config(path, previous).items()
             if k not in NOT_RESUMED and k in FitConfig.model_fields}
    return {**saved, **given}


def refuse_finished(cfg: FitConfig) -> None:
    """A one-line `UserError` when ``cfg`` resumes a finished run (its folder holds
    ``summary.json`` and a final ``checkpoint.pt`` with every epoch of ``cfg`` done): resuming
    it would only rewrite its summary."""
    from localearn.engine import checkpoint

    if not cfg.resume:
        return
    path, previous = checkpoint.resolve(str(cfg.resume), cfg.output_dir)
    run = checkpoint.run_dir_of(path)
    if path.name != "checkpoint.pt" or not (run / "summary.json").is_file():
        return
    state = checkpoint.read(path, previous)
    done = int(state["epoch"]) if state.get("epoch_done") else int(state["epoch"]) - 1
    if done >= cfg.epochs:
        raise UserError(f"run {run} is finished ({plural(done, 'epoch')} of {cfg.epochs} "
                        f"done); nothing to resume (more epochs: --epochs {done + 1} or more)")


def missing_rules(expression: str) -> list[str]:
    """The rule names in ``expression`` that are not registered in this session."""
    known = registry.available("rule")
    todo, missing = [expr.parse(expression)], []
    while todo:
        node = todo.pop()
        if node.name not in known:
            missing.append(node.name)
        todo.extend(node.args)
    return missing


def unregistered_rule_message(expression: str, missing: list[str]) -> str:
    """One line: the rule of ``expression`` is not registered, and how to register it."""
    names = ", ".join(repr(n) for n in missing)
    known = ", ".join(registry.available("rule"))
    return (f"rule {names} of {expression!r} is not registered (registered rules: {known}); "
            f"a rule defined in a notebook or script: register its class with "
            f"localearn.register_rule({missing[0]!r}, ItsClass) and use it from Python "
            f"(localearn.fit(resume=...)), or install it as a plugin")


def _registered_name(cls: type) -> str | None:
    """The name ``cls`` is registered under (this session's registrations first, then entry
    points, matched by their target without importing them)."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, entry in registry.available("rule").items():
        obj = getattr(entry, "obj", None)
        if obj is cls or (obj is None and getattr(entry, "value", None) == target):
            return name
    return None


def _option_text(value: Any) -> str | None:
    """An option value as an expression writes it; None for a value it cannot hold."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value.isidentifier() and value.lower() not in (
            "true", "false", "none") else repr(value)
    return None


def rule_expression(rule: UpdateRule) -> tuple[str, list[str]]:
    """An expression that rebuilds ``rule`` and what keeps it from doing so exactly (empty
    when it does): its registered name, each nested rule, every option whose stored attribute
    differs from its ``__init__`` default. ``MLAAN(Probe(), k=2)`` with ``probe`` registered
    reads ``mlaan(probe, k=2)``."""
    given = getattr(rule, "_expression", None)
    if given:
        return given, []
    cls = type(rule)
    problems: list[str] = []
    name = _registered_name(cls)
    if name is None:
        name = cls.__name__.lower()
        problems.append(f"class {cls.__qualname__} is not registered (localearn.register_rule)")
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        params = []
    parts: list[str] = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(rule, p.name):
            problems.append(f"{name}'s option {p.name!r} is not stored as an attribute")
            continue
        value = getattr(rule, p.name)
        if isinstance(value, UpdateRule):
            text, inner = rule_expression(value)
            parts.append(text if p.default is p.empty else f"{p.name}={text}")
            problems.extend(inner)
            continue
        try:
            same = p.default is not p.empty and bool(value == p.default)
        except Exception:
            same = False
        if same:
            continue
        shown = _option_text(value)
        if shown is None:
            problems.append(f"{name}'s option {p.name}={value!r:.40} has no expression form")
            continue
        parts.append(f"{p.name}={shown}")
    return (f"{name}({', '.join(parts)})" if parts else name), problems


def describe_rule(rule: UpdateRule) -> str:
    """A rule object's expression (see `rule_expression`)."""
    return rule_expression(rule)[0]


def _rule_object(rule: UpdateRule | type[UpdateRule]) -> tuple[UpdateRule, str | None]:
    """The rule object to train and, when its expression cannot rebuild it exactly, a line
    saying why."""
    if isinstance(rule, type) and issubclass(rule, UpdateRule):
        try:
            rule = rule()
        except TypeError as exc:
            raise UserError(f"rule class {rule.__name__} cannot be built with no arguments "
                            f"({exc}); pass an object, e.g. {rule.__name__}(...)") from None
    if not isinstance(rule, UpdateRule):
        raise UserError(f"rule must be an expression, a localearn.UpdateRule subclass or an "
                        f"object of one, not {type(rule).__name__} {rule!r:.60}")
    text, problems = rule_expression(rule)
    rule.expression = text
    note = None
    if problems:
        note = (f"rule recorded as {text!r}, which does not rebuild it exactly: "
                f"{'; '.join(problems)}")
    return rule, note


def fit(config: FitConfig | dict[str, Any] | str | Path | None = None, *,
        rule: RuleLike | None = None, **settings: Any) -> Any:
    """Train one run in this process and return its `localearn.engine.FitResult`: test
    accuracy (last, best and its epoch), ``history`` (one row per epoch, as in
    ``metrics.jsonl``), the trained ``net`` (``net.backbone`` is the plain model), the
    auxiliary networks ``aux``, the ``rule``, ``run_dir`` and ``summary``.

    ``config``: a `FitConfig`, a dict of settings, or a TOML/YAML file; ``settings`` (the
    `FitConfig` fields: ``epochs=2``, ``k=4``, ``output_dir=...``) override it. ``rule``: an
    expression, a rule class or a rule object. Without ``output_dir`` the run writes to a new
    folder under ``runs/``. With ``seeds=[...]`` the run is repeated once per seed (a fresh
    copy of the rule object each time) and a `localearn.engine.RepeatsResult` is returned.
    """
    from localearn.engine import fit as engine_fit
    from localearn.engine import fit_repeats

    if isinstance(config, FitConfig):
        base: dict[str, Any] = config.model_dump(exclude_unset=True)
        file = None
    elif isinstance(config, dict):
        base, file = dict(config), None
    elif isinstance(config, (str, Path)):
        base, file = {}, Path(config)
    elif config is None:
        base, file = {}, None
    else:
        raise UserError(f"config must be a FitConfig, a dict or a file path, not "
                        f"{type(config).__name__}")
    made: UpdateRule | None = None
    note = None
    if isinstance(rule, str):
        settings["rule"] = rule
    elif rule is not None:
        made, note = _rule_object(rule)
        settings["rule"] = made.expression
    given = {k: v for k, v in {**base, **settings}.items() if v is not None}
    if given.get("resume") and file is None:
        # as fit --resume: the checkpoint's settings, the ones given now over them
        given = resumed_settings(given["resume"], given)
    cfg = make_config(file, **given)
    refuse_finished(cfg)
    if note:
        from localearn.runlog import LOGGER, console_logging

        console_logging()
        LOGGER.warning(note)
    if cfg.seeds:
        proto = made
        return fit_repeats(cfg, make_rule=None if proto is None else
                           (lambda: copy.deepcopy(proto)))
    result = engine_fit(cfg, rule=made)
    if note:
        _note_in_summary(result, note)
    return result


def _note_in_summary(result: Any, note: str) -> None:
    """Record in the run's summary that its rule expression does not rebuild it exactly."""
    import json

    from localearn import distributed
    from localearn.engine.checkpoint import atomic_write_text

    result.summary["rule_exact"] = False
    result.summary["rule_note"] = note
    path = Path(result.run_dir) / "summary.json"
    if distributed.current_env().is_main and path.is_file():
        atomic_write_text(path, json.dumps(result.summary, indent=2))


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The plain backbone of an exported file (``localearn export``), weights loaded, in eval
    mode, and the file's metadata decoded: ``model``, ``num_classes``, ``input_shape``,
    ``mean``, ``std``, ``dataset``, ``class_names`` (see
    `localearn.export.export_metadata`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from localearn.export import read_export_metadata

    path = Path(path)
    if not path.is_file():
        raise UserError(f"exported file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise UserError(f"{path} is not a safetensors file: {exc}") from None
    if "model" not in meta or "num_classes" not in meta:
        raise UserError(f"{path} lacks the model and num_classes metadata of a localearn "
                        "export; load it with safetensors.torch.load_file")
    info = read_export_metadata(meta)
    model = registry.make_model(info["model"], info["num_classes"], info.get("input_shape"))
    model.load_state_dict(weights)
    return model.eval(), info
