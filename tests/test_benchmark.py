"""A smoke run of the performance benchmark: it runs and writes every key (no timing is asserted)."""

from __future__ import annotations

import json
import runpy

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quick_benchmark_writes_every_key(tmp_path):
    benchmark = runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")
    assert benchmark["main"](["--out", str(tmp_path / "bench.json"), "--quick"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(benchmark["KEYS"]) <= set(results)
    assert all(results[k] > 0 for k in benchmark["KEYS"] if not isinstance(results[k], dict)), "every figure measured"
    assert all(v > 0 for k in ("epoch_s_by_size", "score_s_by_volumes") for v in results[k].values())
    assert "| `train_ratio_vs_plain` |" in (tmp_path / "bench.md").read_text()


def test_gpu_section_runs_its_trainer_and_loop_on_any_device():
    """The CUDA section (``--gpu``) on the CPU, tiny: every mode's keys are written and training stays finite."""
    benchmark = runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")
    results = benchmark["gpu_training"]([64], epochs=2, modes=("fp32", "bf16"), n_slices=128, device="cpu")
    for mode in ("fp32", "bf16"):
        assert results[f"gpu_train_slices_per_s_64_{mode}"] > 0 and results[f"gpu_plain_slices_per_s_64_{mode}"] > 0
        assert 0 <= results[f"gpu_data_stall_fraction_64_{mode}"] < 1
        assert results[f"gpu_last_loss_64_{mode}"] == results[f"gpu_last_loss_64_{mode}"], "finite loss"


def test_scale_section_measures_each_cohort_in_its_own_process():
    """``--scale``, tiny: every key is written; the warm cache is faster than the cold one, and slices kept in
    memory (the negative control) cost memory that the cache does not."""
    benchmark = runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")
    results = benchmark["scale_benchmark"](quick=True, sizes=[8, 16], workers=2)
    assert set(benchmark["SCALE_KEYS"]) <= set(results)
    assert set(results["scale_rss_mb"]) == set(results["scale_epoch_s"]) == {"8", "16"}
    assert results["scale_slices"]["16"] == 2 * results["scale_slices"]["8"], "the 8 demo volumes, twice"
    assert all(v > 0 for key in ("scale_rss_mb", "scale_epoch_s", "scale_slices_per_s") for v in results[key].values())
    assert results["cache_reuse_speedup"] > 1 and results["preprocess_workers_speedup"] > 0
