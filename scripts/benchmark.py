"""Performance benchmark: the bundle's training and scoring against a plain PyTorch loop and the machine's limit.

    python scripts/benchmark.py --out runs/bench/bench.json [--quick]

Everything runs in one process. Scoring is measured first (so that the peak resident memory is the scoring's),
then training: the bundle's trainer (``configs/train.json`` with all its handlers, on the demo data) and a minimal
plain PyTorch loop of the same network, loss and context-encoding noise on the same in-memory slices, one epoch
each, interleaved, ``--repeats`` times; medians are reported. Writes the JSON and a markdown summary next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.demo import load_template, make_demo_dataset
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.inference import AnomalyInference
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE, CeVAEReconstruction
from pipeline.scoring import kl_gradient

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cevae" / "configs"
KEYS = ("train_slices_per_s", "plain_slices_per_s", "train_ratio_vs_plain", "data_stall_fraction", "score_volume_s",
        "score_peak_rss_mb", "score_ratio_vs_loop", "model_gflop_per_slice", "train_gflop_per_slice",
        "matmul_gflops", "flops_fraction", "epoch_s_by_size", "score_s_by_volumes")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The CPU's dense float32 matmul throughput (GFLOP/s), median of ``repeats`` large ``torch.mm``."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def brats_sized_volume(path: Path) -> Path:
    """A 240x240x155, 1 mm skull-stripped T2-like volume (the BraTS grid) made from the MNI template."""
    template = load_template(spacing_mm=1.0)
    image = (0.62 * template.gm + 0.42 * template.wm + 1.0 * template.csf) * 1000
    out = np.zeros((240, 240, 155), np.float32)
    crop = [min(s, t) for s, t in zip(image.shape, out.shape)]
    offset = [(t - c) // 2 for t, c in zip(out.shape, crop)]
    out[tuple(slice(o, o + c) for o, c in zip(offset, crop))] = image[tuple(slice(0, c) for c in crop)]
    nib.save(nib.Nifti1Image(out, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    return path


def scoring(tmp: Path, volumes: list[int]) -> dict:
    """End-to-end scoring of one BraTS-sized volume, its peak memory, batched vs per-slice KL-gradient, growth."""
    image = brats_sized_volume(tmp / "brats_like.nii.gz")
    net = CeVAEReconstruction()
    checkpoint = tmp / "model.pt"
    torch.save({"model": net.state_dict()}, checkpoint)
    infer = AnomalyInference(net, checkpoint, brain_volume_transform(), tmp / "scored", threshold=0.5)
    infer(image)  # warm-up (and checkpoint loading)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        infer(image)
        times.append(time.perf_counter() - start)
    result = {"score_volume_s": statistics.median(times), "score_peak_rss_mb": peak_rss_mb()}
    x = torch.rand(155, 1, 64, 64)
    start = time.perf_counter()
    kl_gradient(net, x)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(x.shape[0]):
        kl_gradient(net, x[i : i + 1])
    result["score_ratio_vs_loop"] = (time.perf_counter() - start) / batched
    growth = {}
    for n in volumes:
        start = time.perf_counter()
        for _ in range(n):
            infer(image)
        growth[str(n)] = time.perf_counter() - start
    result["score_s_by_volumes"] = growth
    return result


def plain_epoch(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: CeVAELoss, noise: ContextEncodingNoise,
                images: torch.Tensor, batch_size: int) -> float:
    """One epoch of the minimal loop on in-memory slices (channels_last, like the bundle); returns its seconds."""
    start = time.perf_counter()
    order = torch.randperm(images.shape[0])
    for i in range(0, images.shape[0], batch_size):
        x = images[order[i : i + batch_size]].contiguous(memory_format=torch.channels_last)
        x_ce = noise(x)[0]
        optimizer.zero_grad(set_to_none=True)
        recon, mu, logvar, recon_ce = net(x, x_ce)
        loss(x, recon, mu, logvar, recon_ce)["loss"].backward()
        optimizer.step()
    return time.perf_counter() - start


def bundle_workflow(datalist: Path, output_dir: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"),
                              logging_file=False, workflow_type="train", datalist=str(datalist),
                              output_dir=str(output_dir), progress_bar=False, epochs=1, **overrides)
    workflow.initialize()
    return workflow


class DataWait:
    """Seconds an engine waits for batches (GET_BATCH_STARTED -> GET_BATCH_COMPLETED), per epoch."""

    def __init__(self, engine) -> None:
        self.wait, self._start = 0.0, 0.0
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.completed)

    def reset(self, _engine) -> None:
        self.wait = 0.0

    def started(self, _engine) -> None:
        self._start = time.perf_counter()

    def completed(self, _engine) -> None:
        self.wait += time.perf_counter() - self._start


def training(tmp: Path, datalist: Path, repeats: int, sizes: list[int]) -> dict:
    workflow = bundle_workflow(datalist, tmp / "bundle_run")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    images = workflow.parser.get_parsed_content("train#dataset").tensors["image"]
    waits = DataWait(trainer)
    net = CeVAE().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    loss, noise = CeVAELoss(), ContextEncodingNoise()
    trainer.run()  # first epoch (warm-up); the slices were preprocessed once when the dataset was built
    bundle_times, plain_times, stalls = [], [], []
    for _ in range(repeats):
        trainer.state.max_epochs += 1
        trainer.run()
        epoch = trainer.state.times[Events.EPOCH_COMPLETED.name]
        bundle_times.append(epoch)
        stalls.append(waits.wait / epoch)
        plain_times.append(plain_epoch(net, optimizer, loss, noise, images, 64))
    workflow.finalize()
    n = images.shape[0]
    result = {
        "n_train_slices": n,
        "train_slices_per_s": n / statistics.median(bundle_times),
        "plain_slices_per_s": n / statistics.median(plain_times),
        "data_stall_fraction": statistics.median(stalls),
    }
    result["train_ratio_vs_plain"] = result["train_slices_per_s"] / result["plain_slices_per_s"]
    x = torch.rand(64, 1, 64, 64)
    result["model_gflop_per_slice"] = flops(lambda: CeVAEReconstruction()(x[:1])) / 1e9

    def step():
        recon, mu, logvar, recon_ce = net(x, noise(x)[0])
        loss(x, recon, mu, logvar, recon_ce)["loss"].backward()

    result["train_gflop_per_slice"] = flops(step) / 64 / 1e9
    by_size = {}
    for size in sizes:
        slices = torch.rand(256, 1, size, size)
        sized = CeVAE(image_size=size).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(sized.parameters(), lr=2e-4)
        plain_epoch(sized, opt, loss, noise, slices[:64], 64)
        by_size[str(size)] = plain_epoch(sized, opt, loss, noise, slices, 64) / 256 * n
    result["epoch_s_by_size"] = by_size
    return result


def summary(results: dict) -> str:
    rows = [(k, results[k]) for k in KEYS]
    lines = ["| figure | value |", "|---|---|"]
    for key, value in rows:
        text = json.dumps({k: round(v, 3) for k, v in value.items()}) if isinstance(value, dict) else f"{value:.4g}"
        lines.append(f"| `{key}` | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="bench.json to write (a .md summary goes next to it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that writes every key")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved training epochs (default 5, quick 1)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    volumes = [1, 2] if args.quick else [1, 10, 50]
    sizes = [64] if args.quick else [64, 128, 192]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datalist = make_demo_dataset(tmp / "demo", n_train=3 if args.quick else 16, n_test=0, seed=0)
        results = {"quick": args.quick, "repeats": repeats, "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", "torch": torch.__version__}
        results.update(scoring(tmp, volumes))
        results.update(training(tmp, datalist, repeats, sizes))
    results["matmul_gflops"] = matmul_gflops()
    results["flops_fraction"] = results["train_gflop_per_slice"] * results["train_slices_per_s"] / results["matmul_gflops"]
    out = Path(args.out)
    atomic_write_json(results, out)
    atomic_write_text(summary(results), out.with_suffix(".md"))
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
