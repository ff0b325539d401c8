import pytest

from localearn import expr
from localearn.errors import UserError


def test_parse_nested_with_options():
    e = expr.parse("mlaan(infopro(loss=contrast, ixx_1=5), k=3, ema=0.995, debug=true)")
    assert e.name == "mlaan"
    assert e.kwargs == {"k": 3, "ema": 0.995, "debug": True}
    (inner,) = e.args
    assert inner.name == "infopro" and inner.kwargs == {"loss": "contrast", "ixx_1": 5}


def test_negative_numbers_and_strings():
    assert expr.parse("dgl(a=-1.5, b='x')").kwargs == {"a": -1.5, "b": "x"}


@pytest.mark.parametrize("text", ["dgl(", "__import__('os').system('x')", "dgl[0]", "1+2",
                                  "dgl(width=[1])", "a.b", "dgl(**x)", "lambda: 0", ""])
def test_malformed_is_rejected_without_eval(text):
    with pytest.raises(UserError, match="malformed rule expression"):
        expr.parse(text)


def test_build_known_rules():
    assert type(expr.build("dgl")).__name__ == "DGL"
    rule = expr.build("dgl(width=2)")
    assert rule.width == 2.0 and rule.expression == "dgl(width=2)"


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown rule 'nope'; registered rules: .*bp.*dgl"):
        expr.build("nope")


def test_bad_keyword_names_the_valid_options():
    with pytest.raises(UserError, match=r"unknown option 'depth' for rule 'dgl'; valid options: "
                                        r"width"):
        expr.build("dgl(depth=3)")


def test_bad_value_is_reported():
    with pytest.raises(UserError, match=r"bad value 'wide' for option 'width'"):
        expr.build("dgl(width=wide)")
    with pytest.raises(UserError, match="width must be positive"):
        expr.build("dgl(width=-1)")


def test_nested_rule_count_is_checked():
    with pytest.raises(UserError, match="takes 0 nested rule"):
        expr.build("dgl(bp)")
