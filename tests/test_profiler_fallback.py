"""`localearn.measure_bytes`'s CPU peak from the profiler: the private raw results while torch
has them, the public ``prof.events()`` when it does not."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from localearn import measure_bytes
from localearn.measure import cpu_memory_source, cpu_peak, replay_peak

MB = 1_000_000


def allocate() -> torch.Tensor:
    """4 MB made and freed, then 8 MB kept and 2 MB made and freed: a peak of 10 MB."""
    a = torch.ones(MB, dtype=torch.int32)
    del a
    b = torch.ones(2 * MB, dtype=torch.int32)
    c = torch.zeros(MB // 2, dtype=torch.int32)
    del c
    return b


def profiled() -> profile:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        allocate()
    return prof


def test_the_private_kineto_results_still_work_on_this_torch():
    events, source = cpu_memory_source(profiled())
    assert source == "kineto_results", (
        f"torch {torch.__version__}'s private profiler results (prof.profiler.kineto_results) "
        "no longer work: localearn memory's CPU peak now comes from the coarser public "
        "fallback (prof.events()); update cpu_memory_source or drop the private path")
    assert 10 * MB <= replay_peak(events) < 10 * MB + 100_000


def test_without_them_the_public_events_give_the_same_peak(monkeypatch):
    prof = profiled()
    prof.events()  # parsed while this torch can; then the private results are gone
    monkeypatch.delattr(prof.profiler, "kineto_results")
    events, source = cpu_memory_source(prof)
    assert source == "events"
    assert 10 * MB <= replay_peak(events) < 10 * MB + 100_000


def test_cpu_peak_runs_on_the_fallback_when_the_private_path_is_gone(monkeypatch):
    sources = []
    real_exit, real_source = profile.__exit__, measure_bytes.cpu_memory_source

    def exit_without_private(self, *exc):  # a torch that keeps no raw results
        real_exit(self, *exc)
        self.events()  # the public events, parsed while this torch can
        del self.profiler.kineto_results

    def recording(prof):
        events, source = real_source(prof)
        sources.append(source)
        return events, source

    monkeypatch.setattr(profile, "__exit__", exit_without_private)
    monkeypatch.setattr(measure_bytes, "cpu_memory_source", recording)
    kept, peak = cpu_peak(allocate)
    assert sources == ["events"] and kept.numel() == 2 * MB
    assert 10 * MB <= peak < 10 * MB + 100_000
