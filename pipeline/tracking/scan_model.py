"""The trained model as an MLflow pyfunc that takes a scan (:class:`ScanAnomalyModel`; logged by
:class:`pipeline.tracking.model.ModelLogging`, loaded with ``mlflow.pyfunc.load_model("runs:/<run id>/model")``,
served with ``mlflow models serve``).

Its input is one volume with its geometry and brain mask, its output the anomaly map and the segmentation on the
input's own grid: the preprocessing, the :class:`~pipeline.anomaly_map.AnomalyMap` and the label-free operating point
are inside. ``predict`` runs exactly what ``run inference`` runs (:class:`~pipeline.inference.AnomalyInference` on
the same ``model.pt``, ``threshold.json`` and ``config.json``), through NIfTI files in a private temporary folder, so
that the inversion of the preprocessing is the one inference uses and the mask equals ``run inference``'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.errors import InputError
from pipeline.inference import AnomalyInference
from pipeline.losses import CeVAELoss
from pipeline.networks import ARCHITECTURE_KEYS, CeVAEReconstruction
from pipeline.run_record import training_config

__all__ = ["SIGNATURE", "ScanAnomalyModel", "example_scan", "scan_inference"]

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, -1, -1), "image"),
            TensorSpec(np.dtype(np.float64), (4, 4), "affine"),
            TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "brainmask"),
        ]
    ),
    outputs=Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, -1, -1), "anomaly"),
            TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "segmentation"),
        ]
    ),
)


def scan_inference(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> AnomalyInference:
    """``run inference``'s computation for a training's ``model.pt`` (its ``config.json`` and ``threshold.json``
    beside it): the network, likelihood and preprocessing the training recorded, and the stored operating point."""
    config = training_config(checkpoint)
    missing = [k for k in ("image_size", "normalization", "reconstruction", "sigma", "kl_weight") if k not in config]
    if missing:
        raise InputError(
            f"the training config next to {checkpoint} lacks {missing}; log the model of a training of this version."
        )
    network = CeVAEReconstruction(**{k: config[k] for k in ARCHITECTURE_KEYS if k in config})
    loss = CeVAELoss(
        ce_weight=0.0, kl_weight=config["kl_weight"], reconstruction=config["reconstruction"], sigma=config["sigma"]
    )
    transform = brain_volume_transform(image_size=config["image_size"], normalization=config["normalization"])
    return AnomalyInference(AnomalyMap(network, loss), checkpoint, transform, output_dir, overwrite=True)


class ScanAnomalyModel(mlflow.pyfunc.PythonModel):
    """``predict({"image": (X, Y, Z) float32, "affine": (4, 4), "brainmask": (X, Y, Z) uint8})`` ->
    ``{"anomaly": (X, Y, Z) float32, "segmentation": (X, Y, Z) uint8}`` on the input's grid (module docstring)."""

    # MLflow would wrap predict to validate inputs by its type hints, and warns without them; no type hint can
    # describe these volumes, the schema is the explicit SIGNATURE, which MLflow enforces on every call
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="cevae-pyfunc-"))  # emptied after every scan, gone with self
        weakref.finalize(self, shutil.rmtree, self.workdir, ignore_errors=True)
        self.inference = scan_inference(Path(context.artifacts["trained"]) / "model.pt", self.workdir)
        self.lock = threading.Lock()  # one scan at a time through the shared folder and module

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a schema from them
        """The anomaly map and segmentation of one scan (the class docstring)."""
        image = np.asarray(model_input["image"], dtype=np.float32)
        affine = np.asarray(model_input["affine"], dtype=np.float64)
        mask = np.asarray(model_input["brainmask"], dtype=np.uint8)
        if image.ndim != 3 or mask.shape != image.shape or affine.shape != (4, 4):
            raise InputError(
                f"expected a 3D 'image', a 'brainmask' of its shape and a 4x4 'affine', got shapes {image.shape}, "
                f"{mask.shape} and {affine.shape}."
            )
        with self.lock:
            try:
                nib.save(nib.Nifti1Image(image, affine), self.workdir / "scan.nii.gz")
                nib.save(nib.Nifti1Image(mask, affine), self.workdir / "scan_mask.nii.gz")
                written = self.inference(self.workdir / "scan.nii.gz", self.workdir / "scan_mask.nii.gz")
                anomaly = np.asarray(nib.load(written["anomaly"]).dataobj, dtype=np.float32)
                segmentation = np.asarray(nib.load(written["seg"]).dataobj, dtype=np.uint8)
            finally:  # no patient's scan or map stays behind on disk
                for path in self.workdir.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        return {"anomaly": anomaly, "segmentation": segmentation}


def example_scan(size: int = 24) -> dict[str, np.ndarray]:
    """A small brain-like volume (a textured ellipsoid, 2 mm voxels) with its mask: the model's input example."""
    grid = np.mgrid[:size, :size, :size].astype(np.float32)
    radius = ((grid - (size - 1) / 2) / np.array([0.4, 0.45, 0.35])[:, None, None, None] / size) ** 2
    mask = (radius.sum(axis=0) < 1).astype(np.uint8)
    texture = 0.6 + 0.2 * np.sin(grid[0] / 2) * np.cos(grid[1] / 3)
    return {"image": (texture * mask).astype(np.float32), "affine": np.diag([2.0, 2.0, 2.0, 1.0]), "brainmask": mask}
