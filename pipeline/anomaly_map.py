"""The trained model as one object: :class:`AnomalyMap`, the network, its likelihood, the option sets and the healthy
reference state, from which every anomaly map, threshold and segmentation of this project comes.

Calibration at the end of training, evaluation, inference (the bundle's ``inferer``), the benchmarks and the MLflow
model all use it; none of them threads the network, the loss, the batch size, the device or the thresholds
separately. ``state_dict()`` is the whole trained model: the network's and the loss's tensors (the likelihood
``sigma``) and, as the module's extra state, the option sets with their healthy normalisation constants and the
healthy reference (thresholds, operating point, labelled calibrations). ``load_state_dict`` of a fresh module of the
same architecture restores all of it.

On disk, a training run keeps the two files it always had: ``model.pt`` (``{"model", "loss"}``) and
``threshold.json`` beside it, the readable form of the extra state (:mod:`pipeline.thresholds`), bound to the weights
by their SHA-256. :meth:`AnomalyMap.load` reads both (also those of earlier versions and of an exported bundle,
whose ``model.pt`` is a bare network state dict) and hashes the weights once; :meth:`AnomalyMap.record` writes
the reference back and refuses to when ``model.pt`` changed since it was loaded (another training replaced it):
thresholds and metrics of one model are never written under another's hash.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.data.slices import volume_to_slices, with_context
from pipeline.errors import InputError
from pipeline.losses import CeVAELoss
from pipeline.operating_point import OperatingPoint
from pipeline.scoring import (
    OPTION_SETS,
    SCORE_NAMES,
    ScoreOptions,
    Unchanged,
    kl_gradient,
    raw_scores,
    score_volume,
)
from pipeline.thresholds import (
    checkpoint_sha256,
    read_thresholds,
    select_threshold,
    threshold_path,
    update_thresholds,
)
from pipeline.weights import load_trained

__all__ = ["AnomalyMap"]

logger = logging.getLogger(__name__)

REFERENCE_SECTIONS = ("healthy", "calibrated")  # the parts of threshold.json that describe the model's reference


class AnomalyMap(torch.nn.Module):
    """Anomaly maps and segmentations of whole preprocessed volumes with one trained ceVAE (the module docstring).

    Args:
        network: the trained network (:class:`~pipeline.networks.CeVAE` or its ``CeVAEReconstruction`` view,
            optionally DDP-wrapped: the inner module is kept).
        loss: the training loss (its ``neg_elbo`` is the slice score); None: the default
            :class:`~pipeline.losses.CeVAELoss` (calibrated sigma, set by the checkpoint's loss state in :meth:`load`).
        option_sets: ``{name: ScoreOptions}`` the maps are computed for (default
            :data:`pipeline.scoring.OPTION_SETS`); :meth:`load` replaces them by those stored with the weights.
        batch_size: slices per network pass.
        device: where the network runs.

    ``model(image, brainmask)`` with ``image`` ``(1, H, W, D)`` (axial slices last) and ``brainmask`` ``(H, W, D)``
    returns ``(terms, maps)``: per-slice ``recon`` ``(D, 1, H, W)``, ``mu`` ``(D, Z)``, ``rec``, ``kl``, ``neg_elbo``
    ``(D,)``, and ``maps[option set][score]``, ``(H, W, D)`` float32 volumes (:func:`pipeline.scoring.score_volume`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        loss: CeVAELoss | None = None,
        option_sets: Mapping[str, ScoreOptions] | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.network = getattr(network, "module", network)
        self.loss = CeVAELoss(ce_weight=0.0) if loss is None else loss
        self.option_sets = dict(OPTION_SETS if option_sets is None else option_sets)
        self.reference: dict = {}
        self.batch_size, self.device = batch_size, torch.device(device)
        self.checkpoint: Path | None = None
        self.checkpoint_sha256: str | None = None
        self.unread_reference: str | None = None  # why load() found no usable threshold.json, if it did not

    # ------------------------------------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        """The option sets (as dicts) and the healthy reference: what ``threshold.json`` holds."""
        return {"options": {c: o.to_dict() for c, o in self.option_sets.items()}, **copy.deepcopy(self.reference)}

    def set_extra_state(self, state: Mapping) -> None:
        self.option_sets = {c: ScoreOptions(**o) for c, o in state["options"].items()}
        self.reference = {k: copy.deepcopy(state[k]) for k in REFERENCE_SECTIONS if k in state}

    @property
    def healthy(self) -> dict | None:
        """The healthy reference (``threshold.json``'s ``healthy`` section), None before calibration."""
        return self.reference.get("healthy")

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The label-free operating point chosen at calibration (None: not calibrated, or before bundle 0.8.0)."""
        stored = (self.healthy or {}).get("synthetic", {}).get("operating_point")
        return None if stored is None else OperatingPoint.from_dict(stored)

    def options(self, option_set: str) -> ScoreOptions:
        """The options of ``option_set``; an :class:`InputError` naming the known ones otherwise."""
        if option_set not in self.option_sets:
            raise InputError(
                f"unknown option set {option_set!r}; choose one of {sorted(self.option_sets)} (--option_set)."
            )
        return self.option_sets[option_set]

    def threshold(
        self, option_set: str, score: str, quantile: float | None = None, calibration: str | None = None
    ) -> tuple[float, str]:
        """``(threshold, where it comes from)``: the healthy ``quantile`` of that map, or with ``calibration`` the
        threshold the labelled evaluation of that name calibrated (:func:`pipeline.thresholds.select_threshold`)."""
        return select_threshold(self.reference, option_set, score, quantile, calibration)

    # -------------------------------------------------------------------------------------------------- files
    def load(self, checkpoint: str | os.PathLike, reference: str = "required") -> AnomalyMap:
        """Load ``checkpoint``'s weights (and likelihood), move to :attr:`device`, eval mode, and with ``reference``
        ``"required"`` or ``"optional"`` the ``threshold.json`` beside it (``"optional"``: a missing or mismatched
        file leaves the option sets as constructed, the reason kept in :attr:`unread_reference` and a mismatched one
        logged;
        ``"none"``: not read). Returns the module."""
        if reference not in ("required", "optional", "none"):
            raise ValueError(f"reference must be 'required', 'optional' or 'none', got {reference!r}.")
        self._load_weights(checkpoint)
        self.to(self.device).eval()
        self.checkpoint, self.checkpoint_sha256 = Path(checkpoint), checkpoint_sha256(checkpoint)
        self.unread_reference = None
        if reference == "none":
            return self
        try:
            self.set_extra_state(read_thresholds(checkpoint, self.checkpoint_sha256))
        except InputError as err:
            if reference == "required":
                raise
            self.unread_reference = str(err)
            if threshold_path(checkpoint).is_file():  # one made for other weights; a missing one is no surprise
                logger.warning("%s; using the option sets as configured", err)
        return self

    def _load_weights(self, checkpoint: str | os.PathLike) -> None:
        load_trained(checkpoint, self.network, self.loss, self.device)

    def record(self, options: Mapping[str, ScoreOptions] | None = None, **sections: dict) -> dict:
        """Adopt ``options`` (fitted option sets, merged into the stored ones) and reference ``sections``
        (``healthy=...`` replaces it, ``calibrated={name: ...}`` adds or replaces that entry) and write them into
        the ``threshold.json`` of the loaded checkpoint, refusing if the checkpoint changed since :meth:`load`.
        Returns the file's new content."""
        if self.checkpoint is None:
            raise RuntimeError("record() needs a loaded checkpoint: call load() first.")
        merged = {c: o.to_dict() for c, o in (options or {}).items()}
        content = update_thresholds(self.checkpoint, merged, expected_sha256=self.checkpoint_sha256, **sections)
        self.set_extra_state(content)
        return content

    # ---------------------------------------------------------------------------------------------- scoring
    def forward(
        self,
        image: torch.Tensor,
        brainmask: np.ndarray,
        configs: Mapping[str, ScoreOptions] | None = None,
        scores: Sequence[str] = SCORE_NAMES,
        unchanged: Unchanged | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, np.ndarray]]]:
        """:func:`pipeline.scoring.score_volume` of one volume for ``configs`` (default: :attr:`option_sets`)."""
        configs = self.option_sets if configs is None else configs
        return score_volume(
            self.raw_scores,
            image,
            brainmask,
            configs,
            self.batch_size,
            scores,
            self.device,
            unchanged,
            self.context_slices,
        )

    @property
    def context_slices(self) -> int:
        """The network's 2.5D input: neighbouring slices on either side (0: 2D slices)."""
        networks = self.network if isinstance(self.network, torch.nn.ModuleList) else [self.network]
        return getattr(networks[0], "context_slices", 0)

    def network_input(self, image: torch.Tensor) -> torch.Tensor:
        """The network's input slices of a ``(1, H, W, D)`` volume: ``(D, 1 + 2k, H, W)``
        (:func:`pipeline.data.slices.with_context`)."""
        return with_context(volume_to_slices(image), self.context_slices)

    def raw_scores(
        self, x: torch.Tensor, inpaint_tiles: Sequence[int] = (), posterior_samples: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """:func:`pipeline.scoring.raw_scores` of the slices ``x`` ``(B, 1 + 2k, H, W)`` (on :attr:`device`)."""
        return raw_scores(self.network, x, self.loss, inpaint_tiles, posterior_samples)

    def kl_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``|dKL/dx|`` ``(B, 1 + 2k, H, W)`` of the slices ``x`` (:func:`pipeline.scoring.kl_gradient`)."""
        return kl_gradient(self.network, x)
