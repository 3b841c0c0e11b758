"""The CUDA section of the benchmark (``scripts/benchmark.py --gpu``): the bundle's trainer in each of
:data:`GPU_MODES` (float32, bfloat16 autocast, ``torch.compile``, CUDA graphs, ``DataLoader`` workers) against the plain
loop with the slices already on the device. Runs on any device (the tests run it tiny on the CPU)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from pipeline.benchmarks.measure import DataWait, EpochClock, plain_epoch
from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.engines import CeVAETrainer
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE

__all__ = ["GPU_MODES", "gpu_training"]

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
