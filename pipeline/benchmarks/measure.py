"""Timing tools shared by the benchmarks: the machine's matmul peak, FLOP counts, interleaved A/B ratios, per-epoch
clocks of an Ignite engine, and the minimal plain PyTorch training loop that the bundle's trainer is measured
against."""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch.utils.flop_counter import FlopCounterMode

from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE

__all__ = [
    "BUNDLE_CONFIGS",
    "DataWait",
    "EpochClock",
    "InterleavedPlainLoop",
    "bundle_workflow",
    "flops",
    "interleaved_speedup",
    "matmul_gflops",
    "peak_rss_mb",
    "plain_epoch",
    "plain_step",
    "summary",
]

BUNDLE_CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "cevae" / "configs"


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


def flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``fn`` (``torch.utils.flop_counter``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def interleaved_speedup(old: Callable[[], object], new: Callable[[], object], repeats: int) -> float:
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


def plain_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: CeVAELoss,
    noise: ContextEncodingNoise,
    x: torch.Tensor,
    autocast: torch.dtype | None = None,
) -> None:
    """One step of the minimal loop on a batch ``x`` ``(B, 1, H, W)`` (channels_last, like the bundle; on CUDA
    optionally under autocast to ``autocast``)."""
    x = x.contiguous(memory_format=torch.channels_last)
    x_ce = noise(x)[0]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=autocast) if autocast is not None else nullcontext():
        recon, mu, logvar, recon_ce = net(x, x_ce)
        terms = loss(x, recon.float(), mu.float(), logvar.float(), recon_ce.float())
    terms["loss"].backward()
    optimizer.step()


def plain_epoch(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: CeVAELoss,
    noise: ContextEncodingNoise,
    images: torch.Tensor,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> float:
    """One epoch of :func:`plain_step` over in-memory slices ``(N, 1, H, W)`` in random order; returns its seconds."""
    start = time.perf_counter()
    order = torch.randperm(images.shape[0], device=images.device)
    for i in range(0, images.shape[0], batch_size):
        plain_step(net, optimizer, loss, noise, images[order[i : i + batch_size]], autocast)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class InterleavedPlainLoop:
    """The plain loop run **inside** an engine's epochs, one :func:`plain_step` after each of its iterations, over
    its own network, optimizer and shuffled in-memory ``images`` (an epoch of the same length as the engine's).
    ``seconds[i]`` is the plain loop's time in the engine's epoch i: the two alternate every ~0.1 s, so both see
    the same load of a shared machine, and the engine's own time in that epoch is its clock's time minus this.
    Attach it after the engine's other handlers."""

    def __init__(self, engine: Engine, images: torch.Tensor, batch_size: int = 64) -> None:
        self.images, self.batch_size = images, batch_size
        self.net = CeVAE().to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=2e-4)
        self.loss, self.noise = CeVAELoss(), ContextEncodingNoise()
        self.seconds: list[float] = []
        self._order, self._next = torch.randperm(images.shape[0]), 0
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.step)

    def epoch_started(self, _engine: Engine) -> None:
        self.seconds.append(0.0)
        self._order, self._next = torch.randperm(self.images.shape[0]), 0

    def step(self, _engine: Engine) -> None:
        batch = self._order[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        if len(batch):
            start = time.perf_counter()
            plain_step(self.net, self.optimizer, self.loss, self.noise, self.images[batch])
            self.seconds[-1] += time.perf_counter() - start


class DataWait:
    """Seconds an engine waits for batches (GET_BATCH_STARTED -> GET_BATCH_COMPLETED): ``epochs[i]`` for epoch i."""

    def __init__(self, engine: Engine) -> None:
        self.epochs: list[float] = []
        self._start = 0.0
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.epochs.append(0.0))
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.completed)

    def started(self, _engine: Engine) -> None:
        self._start = time.perf_counter()

    def completed(self, _engine: Engine) -> None:
        self.epochs[-1] += time.perf_counter() - self._start


class EpochClock:
    """Wall-clock seconds of each epoch of an engine: from the end of the ``EPOCH_STARTED`` handlers attached before
    it to the end of the ``EPOCH_COMPLETED`` handlers attached before it (so, attached last, an epoch with all of
    the bundle's per-epoch work: validation, checkpoints, tracking); a CUDA device synchronised at both ends."""

    def __init__(self, engine: Engine, device: torch.device | str = "cpu") -> None:
        self.seconds: list[float] = []
        self.cuda = torch.device(device).type == "cuda"
        self._start = 0.0
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, _engine: Engine) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def completed(self, _engine: Engine) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def bundle_workflow(datalist: Path, output_dir: Path, epochs: int = 1, **overrides):
    """The bundle's training (``configs/train.json``, all its handlers), initialised on ``datalist``, quiet."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(output_dir),
        progress_bar=False,
        epochs=epochs,
        **overrides,
    )
    workflow.initialize()
    return workflow


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
