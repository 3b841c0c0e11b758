"""Smoke runs of the performance benchmark: each section runs and writes every key (no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from conftest import CI_LOG, script_main
from ignite.engine import Engine, Events

from pipeline.benchmarks import cpu, gpu, scale
from pipeline.benchmarks.measure import EpochClock
from pipeline.data.datalist import load_datalist


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_benchmark_writes_every_key(tmp_path, capsys, record_property):
    assert script_main("benchmark")(["--out", str(tmp_path / "bench.json"), "--quick"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(cpu.KEYS) <= set(results)
    for key in cpu.KEYS:
        values = results[key].values() if isinstance(results[key], dict) else [results[key]]
        assert all(_finite_positive(v) for v in values), (key, results[key])
    assert set(results["ab_ratio_vs_plain"]) == {*cpu.QUICK_VARIANTS, "bundle_last_epoch"}
    # the last epoch carries the once-per-training work (the healthy calibration): slower than a steady one
    assert results["ab_ratio_vs_plain"]["bundle_last_epoch"] < results["train_ratio_vs_plain"]
    printed = capsys.readouterr().out
    assert "| `train_ratio_vs_plain` |" in printed
    # into the CI log (conftest's terminal summary; a test worker's own output does not reach it): the speed figures
    # of every run, without a timed assertion
    where = " (in `make test`: one thread, beside another test worker)" if os.environ.get("PYTEST_XDIST_WORKER") else ""
    table = printed[printed.index("| figure |") :]
    record_property(CI_LOG, f"quick benchmark (scripts/benchmark.py --quick){where}:\n{table}")


def test_epoch_clock_times_what_runs_between_its_handlers():
    """An epoch's time includes the handlers attached before the clock (the bundle's per-epoch work) and not the
    EPOCH_STARTED handlers attached before it (the benchmark's interleaved plain epoch)."""
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: time.sleep(0.05))
    clock = EpochClock(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda _: time.sleep(0.2))  # after the clock's start: counted
    engine.run([0], max_epochs=2)
    assert len(clock.seconds) == 2 and all(0.25 <= s < 1.0 for s in clock.seconds)
    before = Engine(lambda e, b: None)
    before.add_event_handler(Events.EPOCH_STARTED, lambda _: time.sleep(0.2))  # before the clock's start: not counted
    late = EpochClock(before)
    before.run([0], max_epochs=1)
    assert late.seconds[0] < 0.1


def test_gpu_section_runs_its_trainer_and_loop_on_any_device():
    """The CUDA section (``--gpu``) on the CPU, tiny: every mode's keys are written and training stays finite."""
    results = gpu.gpu_training([64], epochs=2, modes=("fp32", "bf16"), n_slices=128, device="cpu")
    for mode in ("fp32", "bf16"):
        assert _finite_positive(results[f"gpu_train_slices_per_s_64_{mode}"])
        assert _finite_positive(results[f"gpu_plain_slices_per_s_64_{mode}"])
        assert 0 <= results[f"gpu_data_stall_fraction_64_{mode}"] < 1
        assert math.isfinite(results[f"gpu_last_loss_64_{mode}"]), "finite loss"


def test_scale_section_measures_each_cohort_in_its_own_process(tiny_demo, tmp_path):
    """``--scale``, tiny (one cohort of the tiny demo's training volumes): every key is written; the warm cache is
    faster than the cold one, and slices kept in memory (the negative control) cost memory that the cache does not.
    A cohort larger than the volumes links to each of them in turn under new names."""
    results = scale.scale_benchmark(quick=True, sizes=[4], workers=2, datalist=tiny_demo)
    assert set(scale.SCALE_KEYS) <= set(results)
    assert set(results["scale_rss_mb"]) == set(results["scale_epoch_s"]) == set(results["scale_rss_mb_in_memory"])
    assert all(
        _finite_positive(v)
        for key in ("scale_rss_mb", "scale_epoch_s", "scale_slices_per_s")
        for v in results[key].values()
    )
    assert results["cache_reuse_speedup"] > 1 and _finite_positive(results["preprocess_workers_speedup"])
    entries = load_datalist(tiny_demo, "training")
    linked = json.loads(scale.cohort(entries, 2 * len(entries), tmp_path).read_text())
    assert [Path(s["image"]).resolve() for s in linked] == [Path(e["image"]).resolve() for e in entries] * 2
    assert len({s["image"] for s in linked}) == 2 * len(entries), "each link under its own name"
