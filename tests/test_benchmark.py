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
