"""Datalist preparers for the folder layouts of public brain MRI sets.

Each layout knows where its images, brain masks and labels lie, which sequences it has (``--modality``, case-
insensitive; default first) and whether it is a healthy training set or a labelled test set:

- ``hcp`` (training; T2, T1): ``**/T2w_acpc_dc_restore_brain.nii.gz`` (skull-stripped)
- ``ixi`` (training; T1, T2, PD): ``images/*_T1.nii.gz`` + ``segmentations/<subject>_*`` (mask = label > 0)
- ``brats2017`` (test; T2, FLAIR, T1, T1c): ``**/<case>_t2.nii.gz`` + ``<case>_seg.nii.gz``
- ``isles2015`` (test; T2, FLAIR, T1, DWI): ``<case>/**/VSD.Brain.XX.O.MR_T2.*.nii`` + ``VSD.Brain.XX.O.OT.*.nii``
- ``brats2013-deepmedic`` (test; T1c, FLAIR): ``<case>/T1c_subtrMeanDivStd.nii.gz`` + ``OTMultiClass`` +
  ``brainmask``
- ``open-ms`` (test; T1, T2, FLAIR, T1c): ``<case>/T1.nii.gz`` + ``lesion_gt.nii.gz`` (T1c = ``T1POST``)
- ``brats-toolkit`` (test; T1c, T1, T2, FLAIR): ``<case>/t1c_bet.nii.gz`` + ``fusion_mav_pseudolabel.nii.gz``

``brats-toolkit`` (BrainLesion tutorial cases) carries **model-made pseudo-labels**, not expert ground truth: use
it for development (choosing options), not to report results.

:func:`prepare_entries` finds the entries, then checks every one (files readable as 3D NIfTI, mask/label present,
same shape and affine as the image) and raises one :class:`~pipeline.errors.InputError` listing every
problem. Every entry carries the ``subject`` id of its layout (the case folder, or the IXI subject), which the
outputs about it are named by.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.validation import check_nifti_header
from pipeline.errors import InputError

__all__ = ["LAYOUTS", "Layout", "check_entry", "prepare_entries"]

logger = logging.getLogger(__name__)

Finder = Callable[[Path, str], tuple[list[dict], list[str]]]


@dataclass(frozen=True)
class Layout:
    """A folder layout: ``modalities`` maps the user's name (upper case) to the layout's file token."""

    name: str
    role: str
    modalities: dict[str, str]
    find: Finder

    @property
    def default_modality(self) -> str:
        return next(iter(self.modalities))

    def token(self, modality: str | None) -> str:
        name = (modality or self.default_modality).upper()
        if name not in self.modalities:
            raise InputError(
                f"layout '{self.name}' has no modality {modality!r}; choose one of " f"{list(self.modalities)}."
            )
        return self.modalities[name]


def _one(folder: Path, pattern: str) -> Path | None:
    hits = sorted(p for p in folder.glob(pattern) if p.is_file())
    return hits[0] if hits else None


def _find_hcp(root: Path, token: str) -> tuple[list[dict], list[str]]:
    images = sorted(root.rglob(f"{token}_acpc_dc_restore_brain.nii.gz"))
    return [{"subject": p.relative_to(root).parts[0], "image": str(p)} for p in images], []


def _find_ixi(root: Path, token: str) -> tuple[list[dict], list[str]]:
    entries, problems = [], []
    for image in sorted((root / "images").glob(f"*_{token}.nii.gz")):
        subject = image.name[: -len(f"_{token}.nii.gz")]
        mask = _one(root / "segmentations", f"{subject}_{token}_*") or _one(root / "segmentations", f"{subject}_*")
        if mask is None:
            problems.append(f"{image}: no mask or segmentation '{subject}_*' in {root / 'segmentations'}")
            continue
        entries.append({"subject": subject, "image": str(image), "brainmask": str(mask)})
    return entries, problems


def _find_brats2017(root: Path, token: str) -> tuple[list[dict], list[str]]:
    entries, problems = [], []
    for image in sorted(root.rglob(f"*_{token}.nii.gz")):
        case = image.name[: -len(f"_{token}.nii.gz")]
        label = image.parent / f"{case}_seg.nii.gz"
        if not label.is_file():
            problems.append(f"{image}: label {label.name} is missing")
            continue
        entries.append({"subject": case, "image": str(image), "label": str(label)})
    return entries, problems


def _find_isles2015(root: Path, token: str) -> tuple[list[dict], list[str]]:
    entries, problems = [], []
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        image = _one(case, f"**/VSD.Brain.XX.O.MR_{token}.*.nii*")
        if image is None:
            continue
        label = _one(case, "**/VSD.Brain.XX.O.OT.*.nii*")
        if label is None:
            problems.append(f"{image}: no label VSD.Brain.XX.O.OT.* in {case}")
            continue
        entries.append({"subject": case.name, "image": str(image), "label": str(label)})
    return entries, problems


def _find_brats2013(root: Path, token: str) -> tuple[list[dict], list[str]]:
    entries, problems = [], []
    for image in sorted(root.glob(f"*/{token}_subtrMeanDivStd.nii.gz")):
        found = {"label": image.parent / "OTMultiClass.nii.gz", "brainmask": image.parent / "brainmask.nii.gz"}
        missing = [p.name for p in found.values() if not p.is_file()]
        if missing:
            problems.append(f"{image}: {missing} missing in {image.parent}")
            continue
        entries.append(
            {
                "subject": image.parent.name,
                "image": str(image),
                "brainmask": str(found["brainmask"]),
                "label": str(found["label"]),
            }
        )
    return entries, problems


def _images_with_label(root: Path, pattern: str, label_name: str) -> tuple[list[dict], list[str]]:
    """Images matching ``pattern`` whose folder holds the label file ``label_name``."""
    entries, problems = [], []
    for image in sorted(root.glob(pattern)):
        label = image.parent / label_name
        if not label.is_file():
            problems.append(f"{image}: {label_name} is missing in {image.parent}")
            continue
        entries.append({"subject": image.parent.name, "image": str(image), "label": str(label)})
    return entries, problems


def _find_open_ms(root: Path, token: str) -> tuple[list[dict], list[str]]:
    return _images_with_label(root, f"*/{token}.nii.gz", "lesion_gt.nii.gz")


def _find_brats_toolkit(root: Path, token: str) -> tuple[list[dict], list[str]]:
    return _images_with_label(root, f"*/{token}_bet.nii.gz", "fusion_mav_pseudolabel.nii.gz")


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("hcp", "training", {"T2": "T2w", "T1": "T1w"}, _find_hcp),
        Layout("ixi", "training", {"T1": "T1", "T2": "T2", "PD": "PD"}, _find_ixi),
        Layout("brats2017", "test", {"T2": "t2", "FLAIR": "flair", "T1": "t1", "T1C": "t1ce"}, _find_brats2017),
        Layout("isles2015", "test", {"T2": "T2", "FLAIR": "Flair", "T1": "T1", "DWI": "DWI"}, _find_isles2015),
        Layout("brats2013-deepmedic", "test", {"T1C": "T1c", "FLAIR": "Flair"}, _find_brats2013),
        Layout("open-ms", "test", {"T1": "T1", "T2": "T2", "FLAIR": "FLAIR", "T1C": "T1POST"}, _find_open_ms),
        Layout("brats-toolkit", "test", {"T1C": "t1c", "T1": "t1", "T2": "t2", "FLAIR": "fla"}, _find_brats_toolkit),
    )
}


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    img = check_nifti_header(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    return shape, np.asarray(img.affine)


def check_entry(entry: dict, affine_atol: float = 1e-3) -> list[str]:
    """Problems of one entry: unreadable or non-3D files, and masks/labels off the image grid."""
    problems = []
    try:
        shape, affine = _header(entry["image"])
    except InputError as err:
        return [str(err)]
    if len(shape) != 3:
        problems.append(f"{entry['image']}: expected a 3D volume, got shape {shape}")
    for key in ("brainmask", "label"):
        if entry.get(key) is None:
            continue
        try:
            other_shape, other_affine = _header(entry[key])
        except InputError as err:
            problems.append(str(err))
            continue
        if other_shape != shape:
            problems.append(f"{entry[key]} ({key}): shape {other_shape} differs from the image's {shape}")
        elif np.abs(other_affine - affine).max() > affine_atol:
            problems.append(f"{entry[key]} ({key}): affine differs from the image's (not on the same grid)")
    return problems


def prepare_entries(
    layout: str, root: str | os.PathLike, modality: str | None = None, skip_incomplete: bool = False
) -> list[dict]:
    """Find and check the entries of ``root`` in ``layout``.

    Args:
        layout: a key of :data:`LAYOUTS`.
        root: the data set's top folder.
        modality: the sequence to list (the layout's default if None).
        skip_incomplete: leave out images without a mask/label (each logged as a warning) instead of failing.

    Raises:
        InputError: unknown layout or modality, missing root, no image found, or any problem in any entry
            (all listed in one message).
    """
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}.")
    spec = LAYOUTS[layout]
    token = spec.token(modality)
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist; give the top folder of the '{layout}' data set.")
    entries, problems = spec.find(root, token)
    if skip_incomplete:
        for problem in problems:
            logger.warning("skipped %s", problem)
        problems = []
    for entry in entries:
        problems += check_entry(entry)
    if problems:
        listed = "\n  ".join(problems)
        raise InputError(
            f"{len(problems)} problem(s) in {root} (layout '{layout}', modality "
            f"{(modality or spec.default_modality).upper()}):\n  {listed}\nFix or remove these files"
            + ("" if skip_incomplete else ", or pass --skip-incomplete to leave out images without a mask/label")
            + "."
        )
    if not entries:
        raise InputError(
            f"no '{layout}' image of modality {(modality or spec.default_modality).upper()} found "
            f"under {root}; check --root, --layout and --modality."
        )
    return entries
