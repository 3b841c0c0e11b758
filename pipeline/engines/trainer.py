"""Ignite trainer of the ceVAE: one iteration runs the VAE pass on ``x`` and the CE pass on ``x~``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys
from torch.utils.data import DataLoader

from pipeline.data.augmentation import SliceAugmentation
from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.losses import CeVAELoss

__all__ = ["CeVAETrainer"]

logger = logging.getLogger(__name__)


class CeVAETrainer(Trainer):
    """``monai.engines.Trainer`` for Eq. 1 of the paper.

    Each iteration: ``x`` from the batch; if ``loss_function.ce_weight > 0``, ``x~ = context_encoding(x)`` on
    the device, then one network call ``network(x, x~) -> (recon, mu, logvar, recon_ce)`` (see
    :meth:`pipeline.networks.CeVAE.forward`); with ``ce_weight == 0`` (plain VAE) the CE pass is skipped entirely.
    ``engine.state.output`` holds ``image``, ``pred`` and the detached loss terms ``loss``, ``loss_rec``,
    ``loss_kl``, ``loss_ce`` and the likelihood's ``sigma`` (scalars) before ``MODEL_COMPLETED`` fires. AMP
    (``amp=True``) applies on CUDA only: autocast to ``amp_dtype`` (bfloat16 by default: no loss scaling needed;
    float16 adds a ``GradScaler``).

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, prepare_batch, iteration_update,
        postprocessing, key_train_metric, additional_metrics, metric_cmp_fn, train_handlers, amp, event_names,
        event_to_attr, to_kwargs, amp_kwargs: as for ``monai.engines.SupervisedTrainer``.
        network: a :class:`~pipeline.networks.CeVAE` (optionally DDP-wrapped).
        optimizer: its optimizer.
        loss_function: a :class:`~pipeline.losses.CeVAELoss`.
        context_encoding: the CE noise (:class:`~pipeline.data.context_encoding.ContextEncodingNoise`).
        augmentation: the training augmentation applied to every batch on the device before the CE noise
            (:class:`~pipeline.data.augmentation.SliceAugmentation`; None: the slices as they are).
        channels_last: train in the ``channels_last`` memory format (the network is converted here and every batch
            on the device): same arithmetic, about 20 % faster convolutions on CPU (docs/performance.md).
        amp_dtype: ``"bfloat16"`` or ``"float16"``, the autocast type when ``amp`` is on (CUDA).
        compile: run the training forward pass through ``torch.compile(network, **compile_kwargs)``; ``network``
            itself (and so every checkpoint's ``state_dict``) stays the uncompiled module.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: CeVAELoss,
        context_encoding: ContextEncodingNoise | None = None,
        augmentation: SliceAugmentation | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        channels_last: bool = False,
        amp_dtype: str = "bfloat16",
        compile: bool = False,
        compile_kwargs: dict | None = None,
    ) -> None:
        device = torch.device(device)
        if amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {amp_dtype!r}.")
        extra = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=amp and device.type == "cuda",
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs={"dtype": getattr(torch, amp_dtype), **(amp_kwargs or {})},
            **extra,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function.to(device)  # its state (the calibrated sigma) lives with the batches
        self.context_encoding = context_encoding or ContextEncodingNoise()
        self.augmentation = augmentation
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            network.to(memory_format=torch.channels_last)
        self.forward_network = torch.compile(network, **(compile_kwargs or {})) if compile else network

    def run(self) -> None:
        """Train up to ``max_epochs``. An engine that has already reached them (restored by ``--resume`` from the
        checkpoint of a training that finished its epochs and was killed while closing) does not start over, as
        ignite would with the trained weights; it fires only ``STARTED`` and ``COMPLETED``, so that the closing
        handlers (the final ``last.pt``, the figure, the tracking run) do what the kill left undone."""
        if 0 < self.state.max_epochs <= self.state.epoch:
            logger.info("training had finished its %d epochs; completing the run without training", self.state.epoch)
            self.fire_event(Events.STARTED)
            self.fire_event(Events.COMPLETED)
            return
        super().run()

    @property
    def uses_context_encoding(self) -> bool:
        return self.loss_function.ce_weight > 0

    @property
    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """MONAI's ``GradScaler`` for float16 autocast; None otherwise (bfloat16 has float32's exponent range)."""
        return self.scaler if self.amp and self.amp_kwargs["dtype"] == torch.float16 else None

    def _iteration(self, engine: CeVAETrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        x, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if engine.augmentation is not None:
            x = engine.augmentation(x)
        x = x.contiguous(memory_format=engine.memory_format)
        x_ce = engine.context_encoding(x)[0] if engine.uses_context_encoding else None
        engine.state.output = {CommonKeys.IMAGE: x}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)

        with torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else nullcontext():
            recon, mu, logvar, recon_ce = engine.forward_network(x, x_ce)
            engine.state.output[CommonKeys.PRED] = recon
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function(
                x, recon.float(), mu.float(), logvar.float(), None if recon_ce is None else recon_ce.float()
            )
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        scaler = engine.loss_scaler
        if scaler is not None:
            scaler.scale(terms["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            terms["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.state.output.update({k: v.detach() for k, v in terms.items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
