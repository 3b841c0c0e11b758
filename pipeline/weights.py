"""Reading a trained ``model.pt`` (``{"model", "loss"?}`` of training, or a bare network state dict) safely:
``weights_only=True``, non-finite weights refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.data.validation import InputError

__all__ = ["load_trained", "split_trained"]


def load_trained(
    checkpoint: str | os.PathLike,
    network: torch.nn.Module,
    loss: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Load a ``model.pt`` (``{"model", "loss"?}``, or a bare state dict) into ``network`` and ``loss`` with
    ``weights_only=True``; returns the loaded dict. A checkpoint without a ``loss`` entry (older runs, or weights
    from elsewhere) leaves ``loss`` as constructed, which is right for a fixed likelihood; a calibrated loss then
    refuses to score (:meth:`pipeline.losses.CeVAELoss.scoring_sigma`)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train first, or pass the path of a trained model.pt."
        )
    state = torch.load(path, map_location=device, weights_only=True)
    weights = state.get("model", state)
    broken = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise InputError(
            f"checkpoint {path} holds non-finite weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}"
            "): it comes from a diverged training; use an earlier checkpoint or train again."
        )
    getattr(network, "module", network).load_state_dict(weights)
    if loss is not None and "loss" in state:
        loss.load_state_dict(state["loss"])
    return state


def split_trained(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float | None]:
    """``(network state dict, likelihood sigma or None)`` of a ``model.pt`` (``{"model", "loss"?}`` or a bare state
    dict), for a plain-state-dict export (MONAI's ``ckpt_export``/``load`` without ``key_in_ckpt``)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" not in state:
        return state, None
    sigma = state.get("loss", {}).get("sigma")
    return state["model"], None if sigma is None else float(sigma)
