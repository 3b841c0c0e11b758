"""Validation on held-out healthy slices: the mean negative ELBO (lower is better)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Average
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import CommonKeys
from torch.utils.data import DataLoader

from pipeline.losses import CeVAELoss
from pipeline.scoring import elbo_terms

__all__ = ["ELBOEvaluator", "SampleMean"]


class SampleMean(Average):
    """Epoch mean of a per-sample output ``engine.state.output[key]`` of shape ``(B,)``, as a float."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(output_transform=self._per_sample)

    def _per_sample(self, output: dict) -> torch.Tensor:
        return output[self.key].detach().reshape(-1, 1)

    def compute(self) -> float:
        return float(super().compute())


class ELBOEvaluator(Evaluator):
    """``monai.engines.Evaluator`` whose iteration computes each slice's ELBO terms (:func:`pipeline.scoring.elbo_terms`).

    ``engine.state.output``: ``image``, ``pred`` (reconstruction from the mean) and ``rec``, ``kl``,
    ``neg_elbo`` of shape ``(B,)``. The key metric ``val_neg_elbo`` (mean over slices, lower is better) is
    added by default together with ``val_rec`` and ``val_kl``.

    Args:
        network: the trained :class:`~pipeline.networks.CeVAE`.
        loss_function: the training loss (:class:`~pipeline.losses.CeVAELoss`), whose ``terms`` give the ELBO
            (same likelihood, current sigma, same KL weight).
        Others: as for ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        loss_function: CeVAELoss,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if key_val_metric is None:
            key_val_metric = {"val_neg_elbo": SampleMean("neg_elbo")}
            additional_metrics = {
                "val_rec": SampleMean("rec"),
                "val_kl": SampleMean("kl"),
                **(additional_metrics or {}),
            }
        device = torch.device(device)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=operator.lt,
            val_handlers=val_handlers,
            amp=amp and device.type == "cuda",
            mode="eval",
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.loss_function = loss_function

    def _iteration(self, engine: ELBOEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        x, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.network.eval()
        with engine.mode(engine.network), torch.no_grad():
            terms = elbo_terms(engine.network, x, engine.loss_function)
        engine.state.output = {CommonKeys.IMAGE: x, CommonKeys.PRED: terms.pop("recon"), **terms}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
