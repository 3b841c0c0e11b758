"""Inference on new scans: anomaly map, segmentation and scores in the **input's native geometry**.

For an input ``IN.nii.gz`` (and optionally its brain mask) :class:`AnomalyInference` writes to ``output_dir``

* ``<name>_anomaly.nii.gz``: the combined pixel score (float32);
* ``<name>_seg.nii.gz``: the segmentation ``anomaly >= threshold`` (uint8), with the threshold calibrated by the
  evaluation (``threshold.json`` next to the checkpoint) or given explicitly;
* ``<name>_score.json``: volume score, per-slice scores, threshold used and model version,

all with exactly the input's shape and affine: the preprocessing is inverted with MONAI's invertible transforms
(``Invertd``), so the maps overlay correctly in 3D Slicer or ITK-SNAP whatever the input's orientation and spacing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from pipeline.data.datalist import load_datalist
from pipeline.io import atomic_save_nifti, atomic_write_json
from pipeline.scoring import PAPER, ScoreOptions, score_volume, segment

__all__ = ["AnomalyInference", "load_threshold"]

logger = logging.getLogger(__name__)


def load_threshold(path: str | os.PathLike) -> tuple[float, str, ScoreOptions]:
    """``(threshold, score name, options)`` of the default entry of an evaluation's ``threshold.json``."""
    content = json.loads(Path(path).read_text())
    default = content["default"]
    options = ScoreOptions(**content["options"][default["postprocessing"]])
    return float(default["threshold"]), default["score"], options


class AnomalyInference:
    """Score new volumes with a trained ceVAE (see the module docstring).

    Args:
        network: the network (``CeVAE`` or its ``CeVAEReconstruction`` view: both have ``encode``/``decode``).
        checkpoint: ``model.pt``.
        transform: the volume chain used in training (its spatial steps are inverted).
        output_dir: where outputs go.
        threshold: segmentation threshold; None reads ``threshold.json`` next to the checkpoint.
        options: scoring options when ``threshold`` is given (else those stored with the threshold).
        model_version: written into the score files (e.g. the bundle's metadata version).
    """

    def __init__(self, network: torch.nn.Module, checkpoint: str | os.PathLike, transform: Callable,
                 output_dir: str | os.PathLike, device: str | torch.device = "cpu", threshold: float | None = None,
                 options: ScoreOptions = PAPER, reconstruction: str = "l2", batch_size: int = 64,
                 model_version: str = "unknown") -> None:
        self.network, self.checkpoint, self.transform = network, Path(checkpoint), transform
        self.output_dir, self.device = Path(output_dir), torch.device(device)
        self.threshold, self.options, self.score_name = threshold, options, "combined"
        self.reconstruction, self.batch_size, self.model_version = reconstruction, batch_size, model_version
        self._loaded = False

    def _prepare(self) -> None:
        if self._loaded:
            return
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist; pass --ckpt with a trained model.pt.")
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state.get("model", state))
        self.network.to(self.device).eval()
        if self.threshold is None:
            calibration = self.checkpoint.parent / "threshold.json"
            if not calibration.is_file():
                raise FileNotFoundError(
                    f"no segmentation threshold: {calibration} does not exist. Run the bundle's 'evaluating' on a "
                    "labelled datalist to calibrate one, or pass --threshold VALUE.")
            self.threshold, self.score_name, self.options = load_threshold(calibration)
        self.checkpoint_sha256 = hashlib.sha256(self.checkpoint.read_bytes()).hexdigest()[:16]
        self._loaded = True

    def __call__(self, image: str | os.PathLike, mask: str | os.PathLike | None = None) -> dict[str, str]:
        """Score one volume; returns the paths written."""
        self._prepare()
        image = Path(image)
        name = image.name.split(".nii")[0]
        data = {"image": str(image)} if mask is None else {"image": str(image), "brainmask": str(mask)}
        pre = self.transform(data)
        brain = np.asarray(pre["brainmask"][0] > 0)
        terms, maps = score_volume(self.network, pre["image"].as_tensor(), brain, {"inference": self.options},
                                   self.reconstruction, self.batch_size, scores=(self.score_name,), device=self.device)
        anomaly = maps["inference"][self.score_name]
        seg = segment(anomaly, brain, self.threshold, self.options)
        slice_scores = terms["neg_elbo"].tolist()
        native = self._invert(pre, {"anomaly": anomaly, "seg": seg.astype(np.float32)})
        reference = nib.load(str(image))
        outputs = {"anomaly": self.output_dir / f"{name}_anomaly.nii.gz", "seg": self.output_dir / f"{name}_seg.nii.gz",
                   "score": self.output_dir / f"{name}_score.json"}
        atomic_save_nifti(_like(reference, native["anomaly"].astype(np.float32)), outputs["anomaly"])
        atomic_save_nifti(_like(reference, (native["seg"] > 0.5).astype(np.uint8)), outputs["seg"])
        in_brain = brain.reshape(-1, brain.shape[-1]).any(axis=0)
        brain_scores = np.asarray(slice_scores)[in_brain]
        atomic_write_json({
            "input": str(image),
            "mask": None if mask is None else str(mask),
            "volume_score_mean_neg_elbo": float(brain_scores.mean()),
            "volume_score_max_neg_elbo": float(brain_scores.max()),
            "slice_neg_elbo": slice_scores,
            "slice_axis": "axial slices of the brain box in RAS order (inferior to superior)",
            "score": self.score_name,
            "threshold": float(self.threshold),
            "scoring_options": self.options.to_dict(),
            "segmented_voxels": int((native["seg"] > 0.5).sum()),
            "model_version": self.model_version,
            "checkpoint_sha256": self.checkpoint_sha256,
        }, outputs["score"])
        logger.info("%s -> %s", image, self.output_dir)
        return {k: str(v) for k, v in outputs.items()}

    def _invert(self, pre: Mapping[str, torch.Tensor], maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map ``(H, W, D)`` model-space volumes back to the input grid through the inverse of the spatial chain.

        The volumes travel as channels of one tensor, so the chain is inverted once; linear interpolation for all
        (a segmentation is re-thresholded at 0.5): torch's "nearest" shifts by half a voxel.
        """
        reference = pre["image"]
        stacked = MetaTensor(torch.stack([torch.as_tensor(v) for v in maps.values()]), meta=dict(reference.meta))
        inverter = Invertd(keys="maps", transform=self.transform, orig_keys="image", nearest_interp=False,
                           to_tensor=True)
        inverted = np.asarray(inverter({"image": reference, "maps": stacked})["maps"])
        return dict(zip(maps, inverted))

    def run_datalist(self, datalist: str | os.PathLike, key: str = "test") -> list[dict[str, str]]:
        """Batch mode: every entry of ``datalist[key]`` (``image`` and optional ``brainmask``)."""
        return [self(entry["image"], entry.get("brainmask")) for entry in load_datalist(datalist, key)]


def _like(reference: nib.Nifti1Image, array: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with ``reference``'s affine and header (data type from ``array``)."""
    if array.shape != reference.shape[:3]:
        raise RuntimeError(f"inverted map has shape {array.shape}, input has {reference.shape[:3]}.")
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(None, None)
    img = nib.Nifti1Image(array, reference.affine, header)
    return img
