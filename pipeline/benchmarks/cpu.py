"""The CPU section of the benchmark (``scripts/benchmark.py``): the bundle's training against a plain PyTorch loop
and the machine's matmul peak, the A/B of what the bundle adds, scoring, and the levers of docs/performance.md.

Training (:func:`training`): each variant of :data:`TRAINING_VARIANTS` (the bundle as configured, the bundle with one
setting changed, its trainer without handlers) runs one epoch per round, the order rotating from round to round.
Inside each of its epochs the plain loop runs one step after each of the trainer's iterations
(:class:`~pipeline.benchmarks.measure.InterleavedPlainLoop`): the two alternate every ~0.1 s and so see the same
load of a shared machine, whose speed moves by tens of percent from one second to the next. A variant's epoch is
timed from its start to the end of its last per-epoch handler (validation, checkpoints, tracking), less the plain
steps in it; its ratio to the plain loop is taken per epoch, then the median over rounds is reported. The work done
once at the end of a training (the healthy calibration at the last epoch, then the figure, the final checkpoint and
the MLflow model) is timed apart (``train_finish_s``): before bundle 0.7.1 the benchmark re-ran a finished trainer for
each repeat, so that every measured epoch was a last epoch and carried one calibration (``ab_ratio_vs_plain``'s
``bundle_last_epoch``, the figure that read as a 0.44x regression).
"""

from __future__ import annotations

import copy
import gzip
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import GaussianSmooth
from scipy import ndimage

from pipeline.anomaly_map import AnomalyMap
from pipeline.benchmarks.measure import (
    DataWait,
    EpochClock,
    InterleavedPlainLoop,
    bundle_workflow,
    flops,
    interleaved_speedup,
    matmul_gflops,
    peak_rss_mb,
    plain_epoch,
)
from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.demo import load_template, make_demo_dataset
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.transforms import AntiAlias
from pipeline.engines import CeVAETrainer
from pipeline.inference import AnomalyInference
from pipeline.io import parallel_gzip
from pipeline.losses import CeVAELoss, kl_divergence
from pipeline.median import median_filter
from pipeline.networks import CeVAE, CeVAEReconstruction
from pipeline.scoring import POSTPROCESSED, kl_gradient
from pipeline.thresholds import update_thresholds

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = ["KEYS", "TRAINING_VARIANTS", "cpu_benchmark"]

KEYS = (
    "train_slices_per_s",
    "plain_slices_per_s",
    "train_ratio_vs_plain",
    "ab_ratio_vs_plain",
    "train_finish_s",
    "data_stall_fraction",
    "score_volume_s",
    "score_flops_fraction",
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
    "speedup_masked_median",
    "cost_context_slices",
)
# the A/B of the bundle's training: name -> overrides of configs/train.json (None: the bundle's trainer alone, no
# handlers, on the default bundle's data loader); "bundle" is the configuration users run
TRAINING_VARIANTS: dict[str, dict | None] = {
    "bundle": {},
    "bundle_adam_unfused": {"optimizer#fused": False},
    "bundle_threaded_loader": {"train#dataloader#_target_": "monai.data.ThreadDataLoader"},
    "bundle_in_memory": {"cache_dir": None},
    "bundle_workers0": {"num_workers": 0},
    "bundle_workers1": {"num_workers": 1},
    "trainer_no_handlers": None,
}
QUICK_VARIANTS = ("bundle", "trainer_no_handlers")
# the smoke run's one healthy validation subject would get all 32 synthetic lesions (a minute of train_finish_s)
QUICK_SETTINGS = {"synthetic_volumes": 1}


def brats_sized_brain() -> np.ndarray:
    """A 240x240x155, 1 mm skull-stripped T2-like brain (the BraTS grid) made from the MNI template."""
    template = load_template(spacing_mm=1.0)
    image = (0.62 * template.gm + 0.42 * template.wm + 1.0 * template.csf) * 1000
    out = np.zeros((240, 240, 155), np.float32)
    crop = [min(s, t) for s, t in zip(image.shape, out.shape)]
    offset = [(t - c) // 2 for t, c in zip(out.shape, crop)]
    out[tuple(slice(o, o + c) for o, c in zip(offset, crop))] = image[tuple(slice(0, c) for c in crop)]
    return out


def brats_sized_volume(path: Path) -> Path:
    """:func:`brats_sized_brain` saved as NIfTI at ``path``."""
    nib.save(nib.Nifti1Image(brats_sized_brain(), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    return path


def _scoring_passes(net: CeVAEReconstruction, x: torch.Tensor) -> None:
    """What the scorer computes per slice batch (:func:`pipeline.scoring.raw_scores`): an encoder pass, the backward
    pass of the KL to the input only, a decoder pass (``autograd.grad`` itself cannot run under the FLOP counter)."""
    frozen = copy.deepcopy(net).requires_grad_(False)
    x = x.clone().requires_grad_(True)
    mu, logvar = frozen.encode(x)
    kl_divergence(mu, logvar).sum().backward()
    frozen.decode(mu.detach())


def scoring(tmp: Path, volumes: list[int], timed: int = 3) -> dict:
    """End-to-end scoring of one BraTS-sized volume (load, preprocess, score, invert, write; median of ``timed``
    runs), its peak memory and its network arithmetic as a fraction of the matmul peak measured beside it, batched
    vs per-slice KL-gradient, growth with the number of volumes."""
    image = brats_sized_volume(tmp / "brats_like.nii.gz")
    net = CeVAEReconstruction()
    checkpoint = tmp / "model.pt"
    loss = CeVAELoss(sigma=0.1)  # the state a trained calibrated loss saves
    torch.save({"model": net.state_dict(), "loss": loss.state_dict()}, checkpoint)
    fitted = replace(POSTPROCESSED, grad_low=0.0, grad_high=1.0)  # what training stores: the healthy constants
    update_thresholds(checkpoint, {"postprocessed": fitted.to_dict()}, healthy={})
    infer = AnomalyInference(
        AnomalyMap(net), checkpoint, brain_volume_transform(), tmp / "scored", threshold=0.5, overwrite=True
    )
    infer(image)  # warm-up (and checkpoint loading)
    times, peaks = [], []
    for _ in range(timed):
        peaks.append(matmul_gflops())
        start = time.perf_counter()
        infer(image)
        times.append(time.perf_counter() - start)
    scored_slices = brain_volume_transform()({"image": str(image)})["image"].shape[-1]
    x = torch.rand(scored_slices, 1, 64, 64)
    network_flop = flops(lambda: _scoring_passes(net, x))
    result = {
        "score_volume_s": statistics.median(times),
        "score_flops_fraction": statistics.median(network_flop / 1e9 / t / p for t, p in zip(times, peaks)),
        "score_peak_rss_mb": peak_rss_mb(),
    }
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


class _OneEpochAtATime:
    """A trainer that :meth:`epoch` runs for one epoch (Ignite's interrupt/resume), with the plain loop interleaved
    step by step (:class:`InterleavedPlainLoop`) and an :class:`EpochClock` attached after every other handler;
    :meth:`finish` runs what is left (the last epoch, then ``COMPLETED``)."""

    def __init__(self, trainer: Engine, images: torch.Tensor) -> None:
        self.trainer, self.clock, self.waits = trainer, EpochClock(trainer), DataWait(trainer)
        self.plain = InterleavedPlainLoop(trainer, images)
        self.own: list[float] = []
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._pause)

    @staticmethod
    def _pause(engine: Engine) -> None:
        if engine.state.epoch < engine.state.max_epochs:
            engine.interrupt()

    def epoch(self) -> None:
        """One epoch: the trainer's own seconds (its clock less the plain steps) go to :attr:`own`."""
        self.trainer.run()
        self.own.append(self.clock.seconds[-1] - self.plain.seconds[-1])

    def finish(self) -> float:
        """Seconds of the last epoch and the closing handlers, less one steady epoch (and the plain steps): the
        once-per-training work."""
        steady = statistics.median(self.own[1:])
        start = time.perf_counter()
        while self.trainer.state.epoch < self.trainer.state.max_epochs - 1:
            self.epoch()
        self.trainer.run()  # the last epoch, not interrupted, then COMPLETED
        return time.perf_counter() - start - self.plain.seconds[-1] - steady


def _variant(
    name: str, tmp: Path, datalist: Path, epochs: int, default_workflow, images: torch.Tensor, settings: dict
) -> tuple[_OneEpochAtATime, ConfigWorkflow | None]:
    overrides = TRAINING_VARIANTS[name]
    if overrides is not None:
        if name == "bundle":
            workflow = default_workflow
        else:
            workflow = bundle_workflow(datalist, tmp / name, epochs, **settings, **overrides)
        return _OneEpochAtATime(workflow.parser.get_parsed_content("train#trainer"), images), workflow
    parser = default_workflow.parser
    net = CeVAE()
    trainer = CeVAETrainer(
        "cpu",
        epochs,
        parser.get_parsed_content("train#dataloader"),
        net,
        torch.optim.Adam(net.parameters(), lr=parser["lr"], fused=True),
        CeVAELoss(),
        ContextEncodingNoise(),
        channels_last=True,
    )
    return _OneEpochAtATime(trainer, images), None


def training(
    tmp: Path, datalist: Path, rounds: int, sizes: list[int], variants: tuple[str, ...], settings: dict
) -> dict:
    """The training A/B (the module docstring) and the plain loop's epoch time by image size; ``settings``: overrides
    of ``configs/train.json`` for every bundle variant."""
    epochs = rounds + 2  # a warm-up epoch, the measured rounds, the last epoch (timed apart)
    default = bundle_workflow(datalist, tmp / "bundle", epochs, **settings)
    images = default.parser.get_parsed_content("train#dataset").stacked("image")
    runs = {name: _variant(name, tmp, datalist, epochs, default, images, settings) for name in variants}
    loss, noise = CeVAELoss(), ContextEncodingNoise()
    net, x = CeVAE(), torch.rand(64, 1, 64, 64)

    def step():
        recon, mu, logvar, recon_ce = net(x, noise(x)[0])
        loss(x, recon, mu, logvar, recon_ce)["loss"].backward()

    n, train_gflop = images.shape[0], flops(step) / 64 / 1e9
    for run, _ in runs.values():  # warm-up
        run.epoch()
    peaks = []
    for r in range(rounds):  # the machine's peak next to each round
        peaks.append(matmul_gflops())
        for name in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotated: none always first
            runs[name][0].epoch()
    bundle = runs["bundle"][0]
    own = {name: run.own[1:] for name, (run, _) in runs.items()}
    plain = {name: run.plain.seconds[1 : rounds + 1] for name, (run, _) in runs.items()}
    stall = statistics.median(w / t for w, t in zip(bundle.waits.epochs[1:], bundle.clock.seconds[1:]))
    finish = bundle.finish()
    for name, (run, workflow) in runs.items():
        if name != "bundle":
            run.finish()
        if workflow is not None:
            workflow.finalize()
    ab = {name: statistics.median(p / t for t, p in zip(own[name], plain[name])) for name in variants}
    steady, plain_s = statistics.median(own["bundle"]), statistics.median(plain["bundle"])
    ab["bundle_last_epoch"] = plain_s / (steady + finish)
    result = {
        "n_train_slices": n,
        "train_slices_per_s": n / steady,
        "plain_slices_per_s": n / plain_s,
        "train_ratio_vs_plain": ab["bundle"],
        "ab_ratio_vs_plain": ab,
        "train_finish_s": finish,
        "data_stall_fraction": stall,
        "model_gflop_per_slice": flops(lambda: CeVAEReconstruction()(x[:1])) / 1e9,
        "train_gflop_per_slice": train_gflop,
        "matmul_gflops": statistics.median(peaks),
        "flops_fraction": statistics.median(train_gflop * n / t / p for t, p in zip(own["bundle"], peaks)),
        "plain_flops_fraction": statistics.median(train_gflop * n / t / p for t, p in zip(plain["bundle"], peaks)),
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


def levers(repeats: int, quick: bool) -> dict:
    """Speed-ups of the changes in docs/performance.md, each against what it replaced, interleaved in this process:
    latent layers as matrix products (three ceVAE training steps, 64x64, batch 64; ``quick``: one), the anti-aliasing
    Gaussian of a BraTS-sized brain box as banded matrix products (vs MONAI's ``GaussianSmooth``), gzip on all cores
    (36 MB), the median filter 5 of a BraTS-sized score map computed inside its eroded brain mask only (vs scipy's
    filter of the whole map, then masked; ``quick``: the 2 mm template's map, 76x94x79); and one cost: the same
    training steps with the 2.5D input of ``--context_slices 1`` against 2D slices (``cost_context_slices``, time
    ratio)."""
    loss, noise, images = CeVAELoss(), ContextEncodingNoise(), torch.rand(64 if quick else 192, 1, 64, 64)

    def training_steps(net: torch.nn.Module, data: torch.Tensor = images) -> Callable[[], float]:  # batches of 64
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
        return lambda: plain_epoch(net, optimizer, loss, noise, data, 64)

    net = CeVAE().to(memory_format=torch.channels_last)
    box = torch.rand(1, 200, 200, 155)
    sigma = [(200 / 64 - 1) / 2] * 2 + [0.0]
    data = (torch.rand(9_000_000) * (torch.rand(9_000_000) > 0.5)).numpy().tobytes()
    brain = load_template(spacing_mm=2.0).mask > 0 if quick else brats_sized_brain() > 0
    mask = ndimage.binary_erosion(brain, iterations=1)
    score_map = np.random.default_rng(0).random(brain.shape, dtype=np.float32) * brain
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
        "speedup_masked_median": interleaved_speedup(
            lambda: ndimage.median_filter(score_map, size=5) * mask, lambda: median_filter(score_map, 5, mask), repeats
        ),
        "cost_context_slices": interleaved_speedup(
            training_steps(CeVAE(context_slices=1).to(memory_format=torch.channels_last), images.repeat(1, 3, 1, 1)),
            training_steps(CeVAE().to(memory_format=torch.channels_last)),
            repeats,
        ),
    }


def cpu_benchmark(quick: bool, repeats: int) -> dict:
    """Scoring, training against the plain loop (with its A/B), and the levers' speed-ups (the module docstring)."""
    volumes = [1] if quick else [1, 10, 50]
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
        results.update(scoring(tmp, volumes, timed=1 if quick else 3))
        variants = QUICK_VARIANTS if quick else tuple(TRAINING_VARIANTS)
        results.update(training(tmp, datalist, repeats, sizes, variants, QUICK_SETTINGS if quick else {}))
    results.update(levers(repeats, quick))
    return results
