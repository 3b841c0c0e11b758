"""Reading a trained ``model.pt`` (``{"model", "loss"?}`` of training, or a bare network state dict) safely:
``weights_only=True``, non-finite weights refused in one line."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from pipeline.errors import InputError

__all__ = ["load_trained", "read_checkpoint", "split_trained"]


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
    state = read_checkpoint(path, device)
    weights = state.get("model", state)
    broken = [name for name, value in weights.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise InputError(
            f"checkpoint {path} holds non-finite weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}"
            "): it comes from a diverged training; use an earlier checkpoint or train again."
        )
    try:
        getattr(network, "module", network).load_state_dict(weights)
        if loss is not None and "loss" in state:
            loss.load_state_dict(state["loss"])
    except RuntimeError as err:  # missing/unexpected keys or other shapes: another architecture
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err).splitlines()[0]
        raise InputError(
            f"checkpoint {path} does not fit this network ({first.strip()[:200]}): it was trained with other "
            "settings (z_dim, channels, image_size, norm); pass the training's values (its config.json) or use the "
            "matching checkpoint."
        ) from err
    return state


def split_trained(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], float | None]:
    """``(network state dict, likelihood sigma or None)`` of a ``model.pt`` (``{"model", "loss"?}`` or a bare state
    dict), for a plain-state-dict export (MONAI's ``ckpt_export``/``load`` without ``key_in_ckpt``)."""
    state = read_checkpoint(Path(checkpoint))
    if "model" not in state:
        return state, None
    sigma = state.get("loss", {}).get("sigma")
    return state["model"], None if sigma is None else float(sigma)


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a dict; a missing, truncated or foreign file, or one holding Python
    objects beyond tensors (which only an unsafe load could read), is refused in one line naming it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train first, or pass the path of a trained model.pt."
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle of allowed objects: damaged, or not a checkpoint
            raise InputError(
                f"checkpoint {path} is not a readable PyTorch file (truncated or not a checkpoint)."
            ) from err
        raise InputError(
            f"checkpoint {path} holds Python objects besides tensors and was refused (loading them could run code); "
            "use a model.pt written by this project's training or export."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(
            f"checkpoint {path} is not a readable PyTorch file ({str(err).splitlines()[0][:120]}): truncated or not "
            "a checkpoint; use the model.pt a finished training wrote (or its last.pt with --resume)."
        ) from err
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict; use a model.pt.")
    return state
