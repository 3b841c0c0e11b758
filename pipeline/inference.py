"""Inference on new scans: anomaly map, segmentation and scores in the **input's native geometry**.

For an input ``IN.nii.gz`` (and optionally its brain mask) :class:`AnomalyInference` writes to ``output_dir``

* ``<name>_anomaly.nii.gz``: the anomaly map of the chosen option set and score (float32);
* ``<name>_seg.nii.gz``: the segmentation ``anomaly >= threshold`` (uint8), small components removed. By default
  the map, the threshold and the minimum component size are the model's **label-free operating point**, which
  training chose on synthetic lesions in the healthy validation subjects and wrote into ``threshold.json`` next to
  the checkpoint (:mod:`pipeline.operating_point`): no lesion label is used anywhere in it. Each of
  ``option_set``, ``score``, ``healthy_quantile`` overrides its part (the threshold is then that healthy quantile of
  that map, :mod:`pipeline.healthy`), ``calibration`` takes the threshold that a labelled evaluation of that name
  calibrated, ``threshold`` a value. A ``threshold.json`` without an operating point (bundles before 0.8.0) gives
  the ``postprocessed`` ``combined`` map at the healthy 0.99 quantile;
* ``<name>_score.json``: volume score, per-slice scores (the training loss's negative ELBO), the threshold and
  where it came from, model version and checkpoint hash,

all with exactly the input's shape and affine: the preprocessing is inverted with MONAI's invertible transforms
(``Invertd``), so the maps overlay correctly in 3D Slicer or ITK-SNAP whatever the input's orientation and spacing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.datalist import SUBJECT_KEY, load_datalist, subject_name
from pipeline.errors import InputError
from pipeline.io import atomic_save_nifti, atomic_write_json
from pipeline.operating_point import DEFAULT_OPTION_SET, DEFAULT_QUANTILE, DEFAULT_SCORE, OperatingPoint
from pipeline.score_options import ScoreOptions
from pipeline.scoring import SCORE_NAMES, segment

__all__ = ["AnomalyInference", "inference_entries"]

logger = logging.getLogger(__name__)


def inference_entries(
    datalist: str | os.PathLike | None = None,
    key: str = "test",
    image: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """The volumes to score, from the first of these that is given: every entry of ``datalist[key]`` (``image`` and
    optional ``brainmask``); the one ``image`` (with its ``mask``); the data folder ``dataset_dir`` (MONAI's
    ``--dataset_dir``): the ``key`` entries of its ``datalist.json`` if it has one (as training finds its data),
    else every NIfTI image in it, each a skull-stripped volume without a mask (as Model Zoo bundles glob their
    ``dataset_dir``). None given: no volume (a workflow built without input, e.g. by ``monai.bundle.load``)."""
    if datalist:
        return load_datalist(datalist, key)
    if image:
        for flag, path in (("--input_image", image), ("--input_mask", mask)):
            if path is not None and not Path(path).is_file():
                raise InputError(
                    f"{flag} {path}: file not found; check the path (relative paths start at {Path.cwd()})."
                )
        return [{"image": str(image)} if mask is None else {"image": str(image), "brainmask": str(mask)}]
    if not dataset_dir:
        return []
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise InputError(
            f"--dataset_dir {folder}: no such folder; check the path (relative paths start at {Path.cwd()})."
        )
    if (folder / "datalist.json").is_file():
        return load_datalist(folder / "datalist.json", key)
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not images:
        raise InputError(
            f"--dataset_dir {folder} holds neither a datalist.json nor NIfTI images; pass a folder of skull-stripped "
            "scans, or --datalist / --input_image."
        )
    logger.info("--dataset_dir %s: scoring its %d NIfTI images as skull-stripped volumes", folder, len(images))
    return [{"image": str(p)} for p in images]


class AnomalyInference:
    """Score new volumes with a trained ceVAE (see the module docstring): the bundle's inference ``evaluator``.

    ``run(dataset)`` scores every item of a dataset whose transform is ``transform``; calling it with ``(image,
    mask)`` scores one file.

    Args:
        model: the :class:`~pipeline.anomaly_map.AnomalyMap` (network ``CeVAE`` or its ``CeVAEReconstruction`` view,
            and the training loss, whose slice score is its negative ELBO, as in evaluation); it gets its trained
            state from ``checkpoint`` and the ``threshold.json`` beside it.
        checkpoint: ``model.pt`` (``{"model", "loss"}`` of training, or an exported plain state dict).
        transform: the volume chain used in training (its spatial steps are inverted).
        output_dir: where outputs go (created if missing).
        threshold: segmentation threshold; None takes it from ``threshold.json`` next to the checkpoint.
        healthy_quantile: the healthy quantile whose threshold to use (None: the operating point's; see
            :mod:`pipeline.healthy`).
        calibration: instead, the name of a labelled evaluation whose calibrated threshold to use.
        option_set, score: the map to threshold (an option set of ``threshold.json``, or of the model as configured
            when there is no such file); None: the operating point's.
        model_version: written into the score files (e.g. the bundle's metadata version).
        overwrite: replace the outputs of an earlier inference of the same input in ``output_dir`` (else refused,
            as training and evaluation refuse to replace results without ``--overwrite True``).
    """

    options: ScoreOptions  # the scoring options in use, known once the checkpoint is loaded (``_prepare``)

    def __init__(
        self,
        model: AnomalyMap,
        checkpoint: str | os.PathLike,
        transform: Callable,
        output_dir: str | os.PathLike,
        threshold: float | None = None,
        healthy_quantile: float | None = None,
        calibration: str | None = None,
        option_set: str | None = None,
        score: str | None = None,
        model_version: str = "unknown",
        overwrite: bool = False,
    ) -> None:
        if score is not None and score not in SCORE_NAMES:
            raise InputError(f"unknown score {score!r}; choose one of {SCORE_NAMES} (--score).")
        self.model, self.checkpoint, self.transform = model, Path(checkpoint), transform
        self.output_dir = Path(output_dir)
        self.threshold, self.healthy_quantile, self.calibration = threshold, healthy_quantile, calibration
        self.option_set, self.score_name = option_set, score
        self.model_version, self.overwrite = model_version, overwrite
        self.threshold_source = "given (--threshold)"
        self.operating_point: OperatingPoint | None = None
        self._loaded = False

    def _prepare(self) -> None:
        if self._loaded:
            return
        given = self.threshold is not None
        model = self.model.load(self.checkpoint, reference="optional" if given else "required")
        point = model.operating_point
        self.option_set = self.option_set or (point.option_set if point else DEFAULT_OPTION_SET)
        self.score_name = self.score_name or (point.score if point else DEFAULT_SCORE)
        self.healthy_quantile = self.healthy_quantile or (point.quantile if point else DEFAULT_QUANTILE)
        self.options = model.options(self.option_set)
        if not self.options.fitted:
            raise InputError(
                f"option set {self.option_set!r} needs constants of the healthy validation subjects, which the "
                f"threshold.json next to {self.checkpoint} holds, and there is none; re-run the bundle's "
                "'evaluating' with the training datalist to compute it, or choose --option_set paper."
            )
        if not given:
            self.threshold, self.threshold_source = model.threshold(
                self.option_set, self.score_name, self.healthy_quantile, self.calibration
            )
        if point and (self.option_set, self.score_name) == (point.option_set, point.score):
            self.options = point.options(self.options)
            if not given and self.calibration is None and self.threshold == point.threshold:
                self.operating_point = point
                self.threshold_source = f"label-free operating point: {point.describe()}"
        self._loaded = True

    def run(self, dataset: Sequence[Mapping]) -> list[dict[str, str]]:
        """Score every item of ``dataset`` (preprocessed by ``transform``: ``image``, ``brainmask``); returns the
        paths written for each."""
        if not len(dataset):
            raise InputError(
                "nothing to score: pass --input_image IMAGE [--input_mask MASK], --datalist DATALIST or "
                "--dataset_dir FOLDER."
            )
        return [self.score(item) for item in dataset]

    def __call__(self, image: str | os.PathLike, mask: str | os.PathLike | None = None) -> dict[str, str]:
        """Score one volume file; returns the paths written."""
        return self.score(self.transform(inference_entries(image=image, mask=mask)[0]))

    def score(self, pre: Mapping) -> dict[str, str]:
        """Score one preprocessed volume (an item of the transform's output); returns the paths written."""
        self._prepare()
        image = Path(pre["image"].meta["filename_or_obj"])
        mask_file = pre["brainmask"].meta.get("filename_or_obj")
        mask = None if mask_file in (None, str(image)) else str(mask_file)  # a derived mask has the image's name
        name = subject_name({"image": str(image), SUBJECT_KEY: pre.get(SUBJECT_KEY)})
        outputs = {
            "anomaly": self.output_dir / f"{name}_anomaly.nii.gz",
            "seg": self.output_dir / f"{name}_seg.nii.gz",
            "score": self.output_dir / f"{name}_score.json",
        }
        earlier = [str(path) for path in outputs.values() if path.exists()]
        if earlier and not self.overwrite:
            raise InputError(
                f"{earlier[0]} exists (an earlier inference of {image.name}, or another input of the same name in "
                "this run); replace it with --overwrite True, or choose another --output_dir."
            )
        brain = np.asarray(pre["brainmask"][0] > 0)
        terms, maps = self.model(
            pre["image"].as_tensor(), brain, {self.option_set: self.options}, scores=(self.score_name,)
        )
        anomaly = maps[self.option_set][self.score_name]
        seg = segment(anomaly, brain, self.threshold, self.options)
        slice_scores = terms["neg_elbo"].tolist()
        native = self._invert(pre, {"anomaly": anomaly, "seg": seg.astype(np.float32)})
        reference = nib.load(str(image))
        atomic_save_nifti(_like(reference, native["anomaly"].astype(np.float32)), outputs["anomaly"])
        atomic_save_nifti(_like(reference, (native["seg"] > 0.5).astype(np.uint8)), outputs["seg"])
        in_brain = brain.reshape(-1, brain.shape[-1]).any(axis=0)
        brain_scores = np.asarray(slice_scores)[in_brain]
        atomic_write_json(
            {
                "input": str(image),
                "mask": mask,
                "volume_score_mean_neg_elbo": float(brain_scores.mean()),
                "volume_score_max_neg_elbo": float(brain_scores.max()),
                "slice_neg_elbo": slice_scores,
                "slice_axis": "axial slices of the brain box in RAS order (inferior to superior)",
                "option_set": self.option_set,
                "score": self.score_name,
                "threshold": float(self.threshold),
                "threshold_source": self.threshold_source,
                "scoring_options": self.options.summary(),
                "operating_point": None if self.operating_point is None else self.operating_point.to_dict(),
                "segmented_voxels": int((native["seg"] > 0.5).sum()),
                "segmented_brain_fraction": float(seg.sum() / max(brain.sum(), 1)),
                "model_version": self.model_version,
                "checkpoint_sha256": self.model.checkpoint_sha256,
            },
            outputs["score"],
        )
        logger.info("%s -> %s (threshold %.4g, %s)", image, self.output_dir, self.threshold, self.threshold_source)
        return {k: str(v) for k, v in outputs.items()}

    def _invert(self, pre: Mapping[str, torch.Tensor], maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map ``(H, W, D)`` model-space volumes back to the input grid through the inverse of the spatial chain.

        The volumes travel as channels of one tensor, so the chain is inverted once; linear interpolation for all
        (a segmentation is re-thresholded at 0.5): torch's "nearest" shifts by half a voxel.
        """
        reference = pre["image"]
        stacked = MetaTensor(torch.stack([torch.as_tensor(v) for v in maps.values()]), meta=dict(reference.meta))
        inverter = Invertd(
            keys="maps", transform=self.transform, orig_keys="image", nearest_interp=False, to_tensor=True
        )
        inverted = np.asarray(inverter({"image": reference, "maps": stacked})["maps"])
        return dict(zip(maps, inverted))


def _like(reference: nib.Nifti1Image, array: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with ``reference``'s affine and header (data type from ``array``)."""
    if array.shape != reference.shape[:3]:
        raise RuntimeError(f"inverted map has shape {array.shape}, input has {reference.shape[:3]}.")
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(None, None)
    img = nib.Nifti1Image(array, reference.affine, header)
    return img
