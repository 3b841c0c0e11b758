"""Performance benchmark: the bundle's training and scoring against a plain PyTorch loop and the machine's limit.

    python scripts/benchmark.py --out runs/bench/bench.json [--quick]
    python scripts/benchmark.py --scale --out runs/bench/scale.json [--quick]     # cohort scale (the slice cache)

Everything runs in one process. Scoring is measured first (so that the peak resident memory is the scoring's),
then training: the bundle's trainer (``configs/train.json`` with all its handlers, on the demo data) and a minimal
plain PyTorch loop of the same network, loss and context-encoding noise on the same in-memory slices, one epoch
each, interleaved with a measurement of the CPU's matmul peak, ``--repeats`` times. Ratios and FLOP fractions are
taken within each repeat (same machine load on both sides), then the median over repeats is reported. Writes the
JSON and a markdown summary next to it.

``--scale``: the slice cache (:mod:`pipeline.data.slice_cache`) against the cohort's size. On the distinct demo
training volumes (or ``--scale-datalist``'s): the first, cold-cache data preparation with 0 worker processes against
``--workers`` (``preprocess_workers_speedup``), a second preparation on the warm cache against the first
(``cache_reuse_speedup``) and a shuffled ``DataLoader`` pass over the cached slices (``cache_read_slices_per_s``).
Then cohorts of ``--scale-sizes`` subjects (links to those volumes under new names, so the cache holds each distinct
volume once), each in a fresh process: data preparation, one training epoch, the process's peak resident memory
(``scale_rss_mb``) and epoch time (``scale_epoch_s``), both keyed by the number of subjects; and, as the negative
control, the peak memory of the smallest and largest cohorts with the slices in memory (``scale_rss_mb_in_memory``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.transforms import GaussianSmooth
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.datalist import load_datalist
from pipeline.data.demo import load_template, make_demo_dataset
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import BrainSliceDataset
from pipeline.data.transforms import AntiAlias
from pipeline.engines import CeVAETrainer
from pipeline.inference import AnomalyInference
from pipeline.io import WriteError, atomic_write_json, atomic_write_text, make_output_folder, parallel_gzip
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE, CeVAEReconstruction
from pipeline.scoring import VolumeScorer, kl_gradient

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cevae" / "configs"
KEYS = (
    "train_slices_per_s",
    "plain_slices_per_s",
    "train_ratio_vs_plain",
    "data_stall_fraction",
    "score_volume_s",
    "score_peak_rss_mb",
    "score_ratio_vs_loop",
    "model_gflop_per_slice",
    "train_gflop_per_slice",
    "matmul_gflops",
    "flops_fraction",
    "plain_flops_fraction",
    "epoch_s_by_size",
    "score_s_by_volumes",
    "speedup_latent_matmul",
    "speedup_anti_alias",
    "speedup_parallel_gzip",
)
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
SMALL_NET = {"channels": [8, 16, 32, 64], "z_dim": 16}  # --quick: the scale section's training, cheap


def peak_rss_mb() -> float:
    """This process's peak resident memory: ``VmHWM`` of its address space where Linux gives it (``ru_maxrss``
    of a process started by ``subprocess`` also counts the parent's resident memory at the fork), else
    ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
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
    loss = CeVAELoss(sigma=0.1)  # the state a trained calibrated loss saves
    torch.save({"model": net.state_dict(), "loss": loss.state_dict()}, checkpoint)
    infer = AnomalyInference(VolumeScorer(net), checkpoint, brain_volume_transform(), tmp / "scored", threshold=0.5)
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


def plain_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: CeVAELoss,
    noise: ContextEncodingNoise,
    images: torch.Tensor,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> float:
    """One epoch of the minimal loop on in-memory slices (channels_last, like the bundle; on CUDA optionally under
    autocast to ``autocast``); returns its seconds."""
    start = time.perf_counter()
    order = torch.randperm(images.shape[0], device=images.device)
    for i in range(0, images.shape[0], batch_size):
        x = images[order[i : i + batch_size]].contiguous(memory_format=torch.channels_last)
        x_ce = noise(x)[0]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast) if autocast is not None else nullcontext():
            recon, mu, logvar, recon_ce = net(x, x_ce)
            terms = loss(x, recon.float(), mu.float(), logvar.float(), recon_ce.float())
        terms["loss"].backward()
        optimizer.step()
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bundle_workflow(datalist: Path, output_dir: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(output_dir),
        progress_bar=False,
        epochs=1,
        **overrides,
    )
    workflow.initialize()
    return workflow


class DataWait:
    """Seconds an engine waits for batches (GET_BATCH_STARTED -> GET_BATCH_COMPLETED): ``epochs[i]`` for epoch i."""

    def __init__(self, engine) -> None:
        self.epochs: list[float] = []
        self._start = 0.0
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.epochs.append(0.0))
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.completed)

    def started(self, _engine) -> None:
        self._start = time.perf_counter()

    def completed(self, _engine) -> None:
        self.epochs[-1] += time.perf_counter() - self._start


def training(tmp: Path, datalist: Path, repeats: int, sizes: list[int]) -> dict:
    workflow = bundle_workflow(datalist, tmp / "bundle_run")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    images = workflow.parser.get_parsed_content("train#dataset").stacked("image")
    waits = DataWait(trainer)
    net = CeVAE().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    loss, noise = CeVAELoss(), ContextEncodingNoise()
    x = torch.rand(64, 1, 64, 64)

    def step():
        recon, mu, logvar, recon_ce = net(x, noise(x)[0])
        loss(x, recon, mu, logvar, recon_ce)["loss"].backward()

    n, train_gflop = images.shape[0], flops(step) / 64 / 1e9
    trainer.run()  # first epoch (warm-up); the slices were preprocessed once when the dataset was built
    bundle_times, plain_times, stalls, peaks = [], [], [], []
    for _ in range(repeats):  # the machine's peak is measured next to each epoch pair: both see the same load
        peaks.append(matmul_gflops())
        trainer.state.max_epochs += 1
        trainer.run()
        epoch = trainer.state.times[Events.EPOCH_COMPLETED.name]
        bundle_times.append(epoch)
        stalls.append(waits.epochs[-1] / epoch)
        plain_times.append(plain_epoch(net, optimizer, loss, noise, images, 64))
    workflow.finalize()
    result = {
        "n_train_slices": n,
        "train_slices_per_s": n / statistics.median(bundle_times),
        "plain_slices_per_s": n / statistics.median(plain_times),
        "train_ratio_vs_plain": statistics.median(p / b for b, p in zip(bundle_times, plain_times)),
        "data_stall_fraction": statistics.median(stalls),
        "model_gflop_per_slice": flops(lambda: CeVAEReconstruction()(x[:1])) / 1e9,
        "train_gflop_per_slice": train_gflop,
        "matmul_gflops": statistics.median(peaks),
        "flops_fraction": statistics.median(train_gflop * n / t / peak for t, peak in zip(bundle_times, peaks)),
        "plain_flops_fraction": statistics.median(train_gflop * n / t / peak for t, peak in zip(plain_times, peaks)),
    }
    by_size = {}
    for size in sizes:
        slices = torch.rand(256, 1, size, size)
        sized = CeVAE(image_size=size).to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(sized.parameters(), lr=2e-4)
        plain_epoch(sized, opt, loss, noise, slices[:64], 64)
        by_size[str(size)] = plain_epoch(sized, opt, loss, noise, slices, 64) / 256 * n
    result["epoch_s_by_size"] = by_size
    return result


def interleaved_speedup(old, new, repeats: int) -> float:
    """Median over ``repeats`` of time(old) / time(new), each pair timed back to back (after one warm-up each)."""
    old()  # warm-up
    new()
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        old()
        middle = time.perf_counter()
        new()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return statistics.median(ratios)


def as_plain_convolutions(net: CeVAE) -> CeVAE:
    """A copy of ``net`` whose latent layers are ``nn.Conv2d``/``nn.ConvTranspose2d`` (oneDNN convolutions)."""
    plain = CeVAE()
    plain.load_state_dict(net.state_dict())
    for seq, index, cls in ((plain.encoder, -1, torch.nn.Conv2d), (plain.decoder, 0, torch.nn.ConvTranspose2d)):
        layer = seq[index]
        replacement = cls(layer.in_channels, layer.out_channels, layer.kernel_size)
        replacement.load_state_dict(layer.state_dict())
        seq[index] = replacement
    return plain.to(memory_format=torch.channels_last)


def levers(repeats: int) -> dict:
    """Speed-ups of the changes in docs/performance.md, each against what it replaced, interleaved in this process:
    latent layers as matrix products (a ceVAE training step, 64x64, batch 64), the anti-aliasing Gaussian of a
    BraTS-sized brain box as banded matrix products (vs MONAI's ``GaussianSmooth``), gzip on all cores (36 MB)."""
    loss, noise, images = CeVAELoss(), ContextEncodingNoise(), torch.rand(192, 1, 64, 64)

    def training_steps(net: torch.nn.Module):  # three steps of batch 64
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
        return lambda: plain_epoch(net, optimizer, loss, noise, images, 64)

    net = CeVAE().to(memory_format=torch.channels_last)
    box = torch.rand(1, 200, 200, 155)
    sigma = [(200 / 64 - 1) / 2] * 2 + [0.0]
    data = (torch.rand(9_000_000) * (torch.rand(9_000_000) > 0.5)).numpy().tobytes()
    return {
        "speedup_latent_matmul": interleaved_speedup(
            training_steps(as_plain_convolutions(net)), training_steps(net), repeats
        ),
        "speedup_anti_alias": interleaved_speedup(
            lambda: GaussianSmooth(sigma)(box), lambda: AntiAlias((64, 64, -1))(box), repeats
        ),
        "speedup_parallel_gzip": interleaved_speedup(
            lambda: gzip.compress(data, 1), lambda: parallel_gzip(data), repeats
        ),
    }


class EpochClock:
    """Wall-clock seconds of each epoch of an engine, a CUDA device synchronised at both ends."""

    def __init__(self, engine, device: torch.device) -> None:
        self.seconds: list[float] = []
        self.cuda = device.type == "cuda"
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, _engine) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def completed(self, _engine) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


GPU_MODES = {  # name: (trainer options, DataLoader workers, pinned memory)
    "fp32": ({}, 0, True),
    "fp32_unpinned": ({}, 0, False),
    "fp32_workers2": ({}, 2, True),
    "bf16": ({"amp": True}, 0, True),
    "bf16_compile": ({"amp": True, "compile": True}, 0, True),
    "bf16_compile_cudagraphs": ({"amp": True, "compile": True, "compile_kwargs": {"mode": "reduce-overhead"}}, 0, True),
    "fp32_compile_cudagraphs": ({"compile": True, "compile_kwargs": {"mode": "reduce-overhead"}}, 0, True),
    "fp32_compile_cudagraphs_workers2": ({"compile": True, "compile_kwargs": {"mode": "reduce-overhead"}}, 2, True),
    "bf16_compile_cudagraphs_workers2": (
        {"amp": True, "compile": True, "compile_kwargs": {"mode": "reduce-overhead"}},
        2,
        True,
    ),
}


def gpu_training(
    sizes: list[int], epochs: int, modes: Sequence[str] = tuple(GPU_MODES), n_slices: int = 2560, device: str = "cuda"
) -> dict:
    """The bundle's trainer (``CeVAETrainer``, slices in host memory through a ``DataLoader`` as in the bundle) in
    each of :data:`GPU_MODES`, and the plain loop (slices already on the device) in float32 and bfloat16 autocast;
    slices/s from the median epoch after the first (warm-up, compilation), the trainer's data wait, the last loss
    (finite: the path works)."""
    device = torch.device(device)
    loss, noise = CeVAELoss(), ContextEncodingNoise()
    name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    result: dict = {"gpu": name, "gpu_epochs": epochs, "gpu_slices": n_slices}
    for size in sizes:
        images = torch.rand(n_slices, 1, size, size)
        data = [{"image": image} for image in images]
        for mode in modes:
            options, workers, pinned = GPU_MODES[mode]
            torch.manual_seed(0)
            net = CeVAE(image_size=size).to(device)
            optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
            loader = torch.utils.data.DataLoader(
                data,
                batch_size=64,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                pin_memory=pinned and device.type == "cuda",
            )
            trainer = CeVAETrainer(
                device, epochs, loader, net, optimizer, loss, noise, non_blocking=True, channels_last=True, **options
            )
            clock, waits = EpochClock(trainer, device), DataWait(trainer)
            trainer.run()
            key = f"{size}_{mode}"
            result[f"gpu_train_slices_per_s_{key}"] = n_slices / statistics.median(clock.seconds[1:])
            result[f"gpu_data_stall_fraction_{key}"] = statistics.median(
                w / t for w, t in zip(waits.epochs[1:], clock.seconds[1:])
            )
            result[f"gpu_first_epoch_s_{key}"] = clock.seconds[0]
            result[f"gpu_last_loss_{key}"] = float(trainer.state.output["loss"])
            if mode in ("fp32", "bf16"):  # the plain loop beside the two eager modes
                resident, autocast = images.to(device), torch.bfloat16 if options.get("amp") else None
                plain = [plain_epoch(net, optimizer, loss, noise, resident, 64, autocast) for _ in range(epochs)]
                result[f"gpu_plain_slices_per_s_{key}"] = n_slices / statistics.median(plain[1:])
            print(key, {k: round(v, 3) for k, v in result.items() if k.endswith(key)}, flush=True)
    return result


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
                    __file__,
                    "--out",
                    str(tmp / "unused.json"),
                    "--scale-child",
                    str(cohort(entries, n, tmp / "cohort")),
                    cache,
                    *(["--quick"] if quick else []),
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
        in_memory = {str(n): child(n, "none")["rss_mb"] for n in (sizes[0], sizes[-1])}
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


def summary(results: dict, keys: Sequence[str]) -> str:
    """Markdown table of ``results[key]`` for ``keys``: numbers to 4 digits, dicts of numbers rounded to 3."""
    lines = ["| figure | value |", "|---|---|"]
    for key in keys:
        value = results[key]
        if isinstance(value, dict):
            text = json.dumps({k: round(v, 3) for k, v in value.items()})
        else:
            text = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
        lines.append(f"| `{key}` | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="bench.json to write (a .md summary goes next to it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that writes every key")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved training epochs (default 5, quick 1)")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="only the CUDA section: the trainer and the plain loop at 64 and 192 px, float32, "
        "bfloat16 autocast and torch.compile",
    )
    parser.add_argument(
        "--gpu-modes",
        nargs="+",
        choices=list(GPU_MODES),
        default=list(GPU_MODES),
        help="with --gpu: the trainer configurations to run (default all)",
    )
    parser.add_argument("--scale", action="store_true", help="only the cohort-scale section (the slice cache)")
    parser.add_argument(
        "--scale-sizes",
        type=int,
        nargs="+",
        default=None,
        help="with --scale: cohort sizes in subjects (default 50 200 1000; quick 25 100 200)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="with --scale: preprocessing processes to compare with none (default 2)",
    )
    parser.add_argument(
        "--scale-datalist",
        type=Path,
        default=None,
        help="with --scale: the training volumes of this datalist instead of the demo data's (e.g. real scans)",
    )
    parser.add_argument("--scale-child", nargs=2, metavar=("COHORT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:  # before hours of benchmarking
        make_output_folder(out.parent, "--out folder")
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.scale_child:  # one cohort of --scale, in its own process
        cohort_file, cache = args.scale_child
        print(json.dumps(scale_child(Path(cohort_file), None if cache == "none" else Path(cache), args.quick)))
        return 0
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device, and this torch build sees none; run it on a GPU machine.")
    if args.gpu:
        results = {
            "torch": torch.__version__,
            **gpu_training([64] if args.quick else [64, 192], 3 if args.quick else 6, args.gpu_modes),
        }
        keys: Sequence[str] = list(results)
    elif args.scale:
        sizes = args.scale_sizes or ([25, 100, 200] if args.quick else [50, 200, 1000])
        results = {
            "quick": args.quick,
            "machine": f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "torch": torch.__version__,
            **scale_benchmark(args.quick, sizes, args.workers, args.scale_datalist),
        }
        keys = SCALE_KEYS
    else:
        results, keys = cpu_benchmark(args.quick, args.repeats or (1 if args.quick else 5)), KEYS
    print(summary(results, keys))
    try:
        atomic_write_json(results, out)
        atomic_write_text(summary(results, keys), out.with_suffix(".md"))
    except OSError as err:  # the figures are printed above
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cpu_benchmark(quick: bool, repeats: int) -> dict:
    """Scoring, training against the plain loop, and the levers' speed-ups (the module docstring)."""
    volumes = [1, 2] if quick else [1, 10, 50]
    sizes = [64] if quick else [64, 128, 192]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datalist = make_demo_dataset(tmp / "demo", n_train=3 if quick else 16, n_test=0, seed=0)
        results = {
            "quick": quick,
            "repeats": repeats,
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "torch": torch.__version__,
        }
        results.update(scoring(tmp, volumes))
        results.update(training(tmp, datalist, repeats, sizes))
    results.update(levers(repeats))
    return results


if __name__ == "__main__":
    sys.exit(main())
