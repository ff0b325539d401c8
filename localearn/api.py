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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from localearn import registry
from localearn.config import FitConfig, make_config
from localearn.errors import UserError
from localearn.interfaces import UpdateRule

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


def describe_rule(rule: UpdateRule) -> str:
    """A rule object's expression: the one it was built from, else its class name with its
    base's (``MLAAN(MyRule())`` reads ``mlaan(myrule)``)."""
    given = getattr(rule, "_expression", None)
    if given:
        return given
    name = type(rule).__name__.lower()
    base = getattr(rule, "base", None)
    return f"{name}({describe_rule(base)})" if isinstance(base, UpdateRule) else name


def _rule_object(rule: UpdateRule | type[UpdateRule]) -> UpdateRule:
    if isinstance(rule, type) and issubclass(rule, UpdateRule):
        try:
            rule = rule()
        except TypeError as exc:
            raise UserError(f"rule class {rule.__name__} cannot be built with no arguments "
                            f"({exc}); pass an object, e.g. {rule.__name__}(...)") from None
    if not isinstance(rule, UpdateRule):
        raise UserError(f"rule must be an expression, a localearn.UpdateRule subclass or an "
                        f"object of one, not {type(rule).__name__} {rule!r:.60}")
    rule.expression = describe_rule(rule)
    return rule


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
    if isinstance(rule, str):
        settings["rule"] = rule
    elif rule is not None:
        made = _rule_object(rule)
        settings["rule"] = made.expression
    cfg = make_config(file, **{**base, **settings})
    if cfg.seeds:
        proto = made
        return fit_repeats(cfg, make_rule=None if proto is None else
                           (lambda: copy.deepcopy(proto)))
    return engine_fit(cfg, rule=made)


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The plain backbone of an exported file (``localearn export``), weights loaded, in eval
    mode, and the file's metadata decoded: ``model``, ``num_classes``, ``input_shape``,
    ``mean``, ``std``, ``dataset``, ``class_names`` (see
    `localearn.engine.checkpoint.export_metadata`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from localearn.engine.checkpoint import read_export_metadata

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
    model = registry.load("model", info["model"])(num_classes=info["num_classes"])
    model.load_state_dict(weights)
    return model.eval(), info
