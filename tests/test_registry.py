"""The registry: entry points only, a third party's rule trains, the core imports no plugin."""

import subprocess
import sys
import textwrap
from pathlib import Path

from localearn import registry
from localearn.config import make_config
from localearn.engine import fit

ROOT = Path(__file__).resolve().parents[1]


def test_first_party_plugins_come_from_entry_points():
    assert {"bp", "dgl"} <= set(registry.available("rule"))
    assert {"resnet32", "resnet110"} <= set(registry.available("model"))
    assert {"digits", "cifar10", "cifar10-shards"} <= set(registry.available("dataset"))
    assert all(ep.group == "localearn.rules" for ep in registry.available("rule").values())


def test_core_source_never_names_a_plugin_module():
    for path in (ROOT / "localearn").rglob("*.py"):
        assert "localearn_plugins" not in path.read_text(), path


def test_engine_imports_only_the_plugin_it_is_asked_for(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import localearn, localearn.engine, localearn.cli
        assert not [m for m in sys.modules if m.startswith("localearn_plugins")], "eager import"
        from localearn.config import make_config
        from localearn.engine import fit
        fit(make_config(rule="bp", epochs=1, train_limit=64, test_limit=32, batch_size=32,
                        progress=False, output_dir={str(tmp_path)!r}))
        loaded = sorted(m for m in sys.modules if m.startswith("localearn_plugins."))
        assert loaded == ["localearn_plugins.bp"], loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_rule_from_a_throwaway_distribution_trains(tmp_path, monkeypatch):
    # The package is examples/probe_rule; its metadata is a throwaway dist-info in tmp_path.
    site = tmp_path / "site"
    dist = site / "probe_rule-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-rule\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[localearn.rules]\nprobe = probe_rule:Probe\n")
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "probe_rule"))
    monkeypatch.syspath_prepend(str(site))
    assert "probe" in registry.available("rule")
    assert ("probe", "greedy local learning with a linear probe per module (third-party "
                     "example)") in registry.listing("rule")
    cfg = make_config(rule="probe", k=4, epochs=2, train_limit=256, test_limit=100,
                      batch_size=32, lr=0.05, progress=False, output_dir=tmp_path / "run")
    result = fit(cfg)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    # and MLAAN decorates the third party's rule like a first-party one
    cfg = make_config(rule="mlaan(probe, k=2, p=2)", k=4, epochs=2, train_limit=256,
                      test_limit=100, batch_size=32, lr=0.05, progress=False,
                      output_dir=tmp_path / "mlaan")
    result = fit(cfg)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
