"""The cohort-scale section of the benchmark (``scripts/benchmark.py --scale``): the slice cache
(:mod:`pipeline.data.slice_cache`) against the cohort's size.

On the distinct demo training volumes (or ``datalist``'s): the first, cold-cache data preparation with 0 worker
processes against ``workers`` (``preprocess_workers_speedup``), a second preparation on the warm cache against the
first (``cache_reuse_speedup``) and a shuffled ``DataLoader`` pass over the cached slices (``cache_read_slices_per_s``).
Then cohorts of ``sizes`` subjects (links to those volumes under new names, so the cache holds each distinct volume
once), each in a fresh process (``python -m pipeline.benchmarks.scale``): data preparation, one training epoch, the
process's peak resident memory (``scale_rss_mb``) and epoch time (``scale_epoch_s``), both keyed by the number of
subjects; and, as the negative control, the peak memory of the smallest and largest cohorts with the slices in memory
(``scale_rss_mb_in_memory``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Events

from pipeline.benchmarks.measure import peak_rss_mb
from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.datalist import load_datalist
from pipeline.data.demo import make_demo_dataset
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import BrainSliceDataset
from pipeline.engines import CeVAETrainer
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE

__all__ = ["SCALE_KEYS", "scale_benchmark"]

SCALE_KEYS = (
    "scale_rss_mb",
    "scale_epoch_s",
    "scale_slices",
    "scale_slices_per_s",
    "scale_rss_growth",
    "scale_rss_mb_in_memory",
    "scale_epoch_s_per_slice_spread",
    "cache_first_s",
    "cache_reuse_s",
    "cache_reuse_speedup",
    "cache_read_slices_per_s",
    "cache_volumes",
    "preprocess_workers",
    "preprocess_first_s_by_workers",
    "preprocess_workers_speedup",
)
SMALL_NET = {"channels": [8, 16, 32, 64], "z_dim": 16}  # quick runs: the cohorts' training, cheap


def prepare(entries: list[dict], cache_dir: Path, workers: int) -> tuple[BrainSliceDataset, float]:
    """The training slices of ``entries`` through the slice cache, and the seconds it took."""
    start = time.perf_counter()
    dataset = BrainSliceDataset(
        entries, brain_volume_transform(), keys=("image",), num_workers=workers, progress=False, cache_dir=cache_dir
    )
    return dataset, time.perf_counter() - start


def scale_child(entries_file: Path, cache_dir: Path | None, small: bool) -> dict:
    """One cohort, in this (fresh) process: data preparation, one training epoch, peak resident memory. Without
    ``cache_dir`` (the negative control: slices in memory) only the preparation."""
    dataset, prepared = prepare(json.loads(entries_file.read_text()), cache_dir, 0)
    if cache_dir is None:
        return {"slices": len(dataset), "prepare_s": prepared, "rss_mb": peak_rss_mb()}
    torch.manual_seed(0)
    net = CeVAE(**(SMALL_NET if small else {}))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    trainer = CeVAETrainer(
        "cpu",
        1,
        loader,
        net,
        torch.optim.Adam(net.parameters(), lr=2e-4),
        CeVAELoss(),
        ContextEncodingNoise(),
        channels_last=True,
    )
    trainer.run()
    return {
        "slices": len(dataset),
        "prepare_s": prepared,
        "epoch_s": trainer.state.times[Events.EPOCH_COMPLETED.name],
        "rss_mb": peak_rss_mb(),
    }


def cohort(entries: list[dict], n: int, folder: Path) -> Path:
    """A datalist of ``n`` subjects whose files are links to ``entries``' files under new names."""
    folder.mkdir(parents=True, exist_ok=True)
    subjects = []
    for i in range(n):
        source = entries[i % len(entries)]
        subject = {}
        for key, path in source.items():
            link = folder / f"sub{i:05d}_{key}.nii.gz"
            if not link.exists():
                link.symlink_to(Path(path).resolve())
            subject[key] = str(link)
        subjects.append(subject)
    out = folder / f"cohort_{n}.json"
    out.write_text(json.dumps(subjects))
    return out


def scale_benchmark(quick: bool, sizes: Sequence[int], workers: int, datalist: Path | None = None) -> dict:
    """The ``--scale`` section (the module docstring); ``datalist``: its ``training`` volumes instead of the demo
    volumes."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datalist = datalist or make_demo_dataset(tmp / "demo", n_train=8 if quick else 16, n_test=0, seed=0)
        entries = [
            {key: entry[key] for key in ("image", "brainmask") if key in entry}
            for entry in load_datalist(datalist, "training")
        ]
        prepare(entries[:1], tmp / "warm_up", 0)  # first-call costs (imports, file cache) out of the comparison
        first = {n: prepare(entries, tmp / f"cache_{n}_workers", n)[1] for n in (0, workers)}
        warm, reuse = prepare(entries, tmp / "cache_0_workers", 0)
        loader = torch.utils.data.DataLoader(warm, batch_size=64, shuffle=True)
        start = time.perf_counter()
        read = sum(batch["image"].shape[0] for batch in loader)
        result = {
            "preprocess_workers": workers,
            "preprocess_first_s_by_workers": {str(k): v for k, v in first.items()},
            "preprocess_workers_speedup": first[0] / first[workers],
            "cache_first_s": first[0],
            "cache_reuse_s": reuse,
            "cache_reuse_speedup": first[0] / reuse,
            "cache_read_slices_per_s": read / (time.perf_counter() - start),
            "cache_volumes": len(entries),
        }

        def child(n: int, cache: str) -> dict:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    __name__,
                    str(cohort(entries, n, tmp / "cohort")),
                    cache,
                    *(["--small"] if quick else []),
                ],
                capture_output=True,
                text=True,
            )
            if run.returncode:
                raise RuntimeError(f"the {n}-subject cohort failed: {run.stderr.strip().splitlines()[-1]}")
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{n} subjects, cache {cache}: {figures}", flush=True)
            return figures

        runs = {str(n): child(n, str(tmp / "cache_0_workers")) for n in sizes}
        in_memory = {str(n): child(n, "none")["rss_mb"] for n in dict.fromkeys((sizes[0], sizes[-1]))}
    per_slice = [r["epoch_s"] / r["slices"] for r in runs.values()]
    rss = [r["rss_mb"] for r in runs.values()]
    result.update(
        {
            "scale_rss_mb": {n: r["rss_mb"] for n, r in runs.items()},
            "scale_epoch_s": {n: r["epoch_s"] for n, r in runs.items()},
            "scale_slices": {n: r["slices"] for n, r in runs.items()},
            "scale_slices_per_s": {n: r["slices"] / r["epoch_s"] for n, r in runs.items()},
            "scale_prepare_s": {n: r["prepare_s"] for n, r in runs.items()},
            "scale_rss_growth": rss[-1] / rss[0] - 1,
            "scale_rss_mb_in_memory": in_memory,
            "scale_epoch_s_per_slice_spread": max(per_slice) / min(per_slice),
        }
    )
    return result


if __name__ == "__main__":  # one cohort, in its own process: COHORT_JSON CACHE_DIR|none [--small]
    cohort_file, cache_arg = sys.argv[1:3]
    figures = scale_child(Path(cohort_file), None if cache_arg == "none" else Path(cache_arg), "--small" in sys.argv)
    print(json.dumps(figures))
