"""bp(checkpoint=...): activation checkpointing gives plain bp's step exactly, on every
registered backbone: the same logits, gradients, BatchNorm buffers and updated weights."""

from __future__ import annotations

import copy

import pytest
import torch
from localearn_plugins.bp import BP, segment_bounds

from localearn import expr, registry
from localearn.build import build_run
from localearn.cli import main
from localearn.config import make_config
from localearn.engine.step import Step
from localearn.errors import UserError
from localearn.interfaces import DataInfo

MODES = ["unit", "sqrt", 3]
SIZE = 32  # the smallest input every backbone takes (timm's stems divide it by 4, then 8)
INFO = DataInfo(10, (3, SIZE, SIZE), (0.5,) * 3, (0.25,) * 3)


def _state(run) -> dict[str, torch.Tensor]:
    """Every gradient, parameter and buffer of the run's network (live, not copied)."""
    out = {f"grad:{n}": p.grad for n, p in run.net.named_parameters()}
    out.update({f"value:{n}": t for n, t in run.net.state_dict().items()})
    return out


@pytest.mark.parametrize("model", sorted(registry.available("model")))
def test_one_engine_step_equals_plain_bp_bitwise(model, one_thread):
    run = build_run(make_config(rule="bp", model=model, seed=0, device="cpu", progress=False),
                    info=INFO)
    start = copy.deepcopy(run.net.state_dict()), copy.deepcopy(run.optimizer.state_dict())
    gen = torch.Generator().manual_seed(1)
    images, targets = torch.randn(4, *INFO.input_shape, generator=gen), torch.arange(4) % 10

    def step(rule: str) -> list[float]:
        """One step of the engine from the same weights; the step's loss and accuracy."""
        run.net.load_state_dict(start[0])
        run.optimizer.load_state_dict(copy.deepcopy(start[1]))
        bp = expr.build(rule)
        bp.configure(run.net)
        torch.manual_seed(2)  # the same random draws (Swin: stochastic depth)
        return Step(bp, run.net, run.optimizer, torch.device("cpu"))(images, targets)

    want_stats = step("bp")
    want = {k: t.detach().clone() for k, t in _state(run).items()}
    norms = [m for m in run.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(k.endswith("num_batches_tracked") for k in want) or not norms  # ConvNeXt, ViT
    for mode in MODES:
        stats = step(f"bp(checkpoint={mode})")
        assert stats == want_stats, (model, mode)  # the same loss and accuracy
        got = _state(run)  # gradients, updated weights, BatchNorm buffers
        different = [k for k in want if not torch.equal(want[k], got[k])]
        assert not different, (model, mode, different[:5])


def test_segments_cover_the_units_in_order():
    assert segment_bounds(16, None) == [0, 16]
    assert segment_bounds(16, "sqrt") == [0, 4, 8, 12, 16]
    assert segment_bounds(55, "sqrt") == [0, 7, 15, 23, 31, 39, 47, 55]  # 7 segments
    assert segment_bounds(5, "unit") == [0, 1, 2, 3, 4, 5]
    assert segment_bounds(10, 3) == [0, 3, 6, 10]  # the larger segments last
    assert segment_bounds(2, "sqrt") == [0, 1, 2]
    with pytest.raises(UserError, match="valid segment counts are 2..16"):
        segment_bounds(16, 17)


def test_the_option_is_listed_with_its_type_and_default(capsys):
    assert main(["rules", "bp"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "none|unit|sqrt|N" in out and "default none" in out


@pytest.mark.parametrize("value", ["foo", "1", "0", "-2", "true", "2.5", "'sqrt2'"])
def test_a_bad_value_is_one_line_listing_the_valid_ones(value):
    with pytest.raises(UserError) as err:
        expr.build(f"bp(checkpoint={value})")
    message = str(err.value)
    assert "\n" not in message and "checkpoint" in message
    assert all(word in message for word in ("none", "unit", "sqrt", "N >= 2"))


def test_the_values_read():
    assert expr.build("bp").checkpoint is None
    assert expr.build("bp(checkpoint=none)").checkpoint is None
    assert expr.build("bp(checkpoint=UNIT)").checkpoint == "unit"
    assert expr.build("bp(checkpoint=5)").checkpoint == 5
    assert expr.build("bp(checkpoint='5')").checkpoint == 5
    assert BP(checkpoint="sqrt").checkpoint == "sqrt"
    with pytest.raises(UserError):
        BP(checkpoint=1)


def test_too_many_segments_for_the_model_is_a_user_error():
    with pytest.raises(UserError, match="16 units"):
        build_run(make_config(rule="bp(checkpoint=17)", model="resnet32", device="cpu",
                              progress=False), info=INFO)
