"""Embedded demo data: synthetic T2-weighted brains made from the MNI152 2009a template that nilearn ships.

Nothing is downloaded: the skull-stripped T1 template and its GM/WM probability maps lie inside nilearn's wheel
(``nilearn.datasets.MNI152_FILE_PATH`` and neighbours). From them, :func:`make_demo_dataset` writes

* healthy training subjects: tissue maps warped by a per-subject smooth random deformation (plus a small random
  rotation and scaling), a T2-like contrast (CSF brightest, then GM, then WM) with jittered tissue intensities,
  a smooth multiplicative bias field and Gaussian noise, at 2 mm;
* test subjects made the same way, each with one lesion kind and its ground-truth mask (``label``). The kinds
  cycle in this order, so each has an equal share (1/4) of the test set:

  - ``tumour``: a necrotic/enhancing core inside hyperintense oedema, with mass effect (the surrounding tissue
    is pushed outwards);
  - ``ms``: 4-9 small hyperintense ellipsoids in white matter;
  - ``hypointense``: a region darker than white matter (e.g. haemorrhage or calcification on T2);
  - ``texture``: a region whose mean intensity matches its surroundings but whose structure is replaced by
    coarse random texture (not findable by intensity thresholding).

Files: ``DIR/train/<id>_T2w.nii.gz``, ``DIR/<split>/<id>_brainmask.nii.gz``, ``DIR/test/<id>_lesion.nii.gz``, and
``DIR/datalist.json`` with ``training`` (``image``, ``brainmask``) and ``test`` (``image``, ``brainmask``,
``label``, ``kind``) entries, paths relative to ``DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.io import atomic_save_nifti, atomic_write_json

__all__ = ["LESION_KINDS", "Template", "load_template", "make_demo_dataset", "make_subject"]

LESION_KINDS = ("tumour", "ms", "hypointense", "texture")
# mean T2-like intensities of the tissue classes (arbitrary units before scaling)
TISSUE_T2 = {"csf": 1.0, "gm": 0.62, "wm": 0.42}
SCANNER_SCALE = 1000.0


@dataclass
class Template:
    """Tissue probability maps (``gm``, ``wm``, ``csf``) in [0, 1] and the brain mask, on one RAS grid."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


def load_template(spacing_mm: float = 2.0, margin: int = 3) -> Template:
    """Read nilearn's MNI152 2009a maps, crop them to the brain (+``margin`` voxels) and resample to ``spacing_mm``."""
    from nilearn import datasets

    t1_img = nib.load(datasets.MNI152_FILE_PATH)
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float32)
    gm = np.asanyarray(nib.load(datasets.GM_MNI152_FILE_PATH).dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(nib.load(datasets.WM_MNI152_FILE_PATH).dataobj).astype(np.float32) / 255.0
    brain = t1 > 0
    lo = np.maximum(np.argwhere(brain).min(0) - margin, 0)
    hi = np.minimum(np.argwhere(brain).max(0) + margin + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    zoom = float(np.abs(t1_img.header.get_zooms()[:3]).mean()) / spacing_mm
    maps = [ndimage.zoom(m[box], zoom, order=1) for m in (gm, wm, brain.astype(np.float32))]
    gm, wm, mask = (np.clip(m, 0.0, 1.0) for m in maps)
    mask = mask > 0.5
    gm, wm = gm * mask, wm * mask
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask
    affine = t1_img.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(t1_img.affine, lo)
    affine[:3, :3] = affine[:3, :3] / zoom
    return Template(gm=gm, wm=wm, csf=csf, mask=mask, affine=affine)


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, control_points: int = 5) -> np.ndarray:
    """A smooth random field with values roughly in [-1, 1]: a coarse normal grid, upsampled and blurred."""
    coarse = rng.standard_normal((control_points,) * len(shape)).astype(np.float32)
    cell = [s / control_points for s in shape]
    field = ndimage.zoom(coarse, cell, order=1, grid_mode=True, mode="nearest")
    field = ndimage.gaussian_filter(field, [c / 3 for c in cell])
    return field[tuple(slice(0, s) for s in shape)] / 1.5


def _random_warp(shape: tuple[int, int, int], rng: np.random.Generator, max_shift: float = 2.5) -> np.ndarray:
    """Sampling coordinates ``(3, *shape)`` of a small random rotation/scaling plus a smooth deformation."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    angles = rng.uniform(-0.08, 0.08, 3)
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot / rng.uniform(0.92, 1.08)
    coords = np.einsum("ij,j...->i...", matrix, grid - centre[:, None, None, None]) + centre[:, None, None, None]
    for axis in range(3):
        coords[axis] += max_shift * _smooth_field(shape, rng)
    return coords


def _warp(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)


def _blob(
    shape: tuple[int, int, int],
    centre: np.ndarray,
    radii: np.ndarray,
    rng: np.random.Generator,
    roughness: float = 0.25,
) -> np.ndarray:
    """Soft irregular ellipsoid in [0, 1]: 1 inside, smooth edge about one voxel wide."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    dist = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    dist = dist * (1.0 + roughness * _smooth_field(shape, rng, control_points=6))
    edge = 1.0 / float(radii.mean())
    return np.clip((1.0 - dist) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _pick_centre(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    candidates = np.argwhere(region)
    return candidates[rng.integers(len(candidates))].astype(np.float32)


def _mass_effect(maps: list[np.ndarray], centre: np.ndarray, radius: float, strength: float) -> list[np.ndarray]:
    """Push tissue radially away from ``centre`` (a Gaussian-profiled displacement of ``strength`` voxels)."""
    shape = maps[0].shape
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    offset = grid - centre[:, None, None, None]
    dist = np.sqrt((offset**2).sum(0)) + 1e-3
    shift = strength * np.exp(-((dist - radius) ** 2) / (2 * (1.5 * radius) ** 2))
    coords = grid - offset / dist * shift  # sample closer to the centre -> content moves outwards
    return [_warp(m, coords) for m in maps]


def _t2_contrast(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = {name: value * rng.uniform(0.93, 1.07) for name, value in TISSUE_T2.items()}
    return (levels["gm"] * gm + levels["wm"] * wm + levels["csf"] * csf).astype(np.float32)


def _add_lesion(
    kind: str,
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    mask: np.ndarray,
    rng: np.random.Generator,
    centre: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Insert one lesion of ``kind`` into the noiseless contrast ``image``; returns (image, lesion weight).

    ``centre`` (voxel coordinates) fixes the tumour centre, so that it matches the mass effect.
    """
    shape = image.shape
    inner = ndimage.binary_erosion(mask, iterations=6)
    if kind == "tumour":
        radius = rng.uniform(5.0, 8.0)
        centre = _pick_centre(inner & (maps["wm"] > 0.3), rng) if centre is None else centre
        oedema = _blob(shape, centre, radius * rng.uniform(0.8, 1.25, 3), rng)
        core = _blob(shape, centre, 0.55 * radius * rng.uniform(0.8, 1.2, 3), rng, roughness=0.4)
        necrosis = _blob(shape, centre, 0.3 * radius * rng.uniform(0.8, 1.2, 3), rng)
        texture = 0.08 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0).astype(np.float32)
        lesion = 0.88 * (1 - core) + (0.55 + texture) * core
        lesion = lesion * (1 - necrosis) + 0.97 * necrosis
        weight = np.maximum(oedema, core)
        return image * (1 - weight) + lesion * weight, weight
    if kind == "ms":
        weight = np.zeros(shape, np.float32)
        for _ in range(rng.integers(4, 10)):
            centre = _pick_centre(inner & (maps["wm"] > 0.7), rng)
            weight = np.maximum(weight, _blob(shape, centre, rng.uniform(1.0, 2.5, 3), rng, roughness=0.1))
        return image * (1 - weight) + 0.82 * weight, weight
    if kind == "hypointense":
        centre = _pick_centre(inner & ((maps["wm"] + maps["gm"]) > 0.8), rng)
        weight = _blob(shape, centre, rng.uniform(2.5, 5.0, 3), rng)
        return image * (1 - weight) + 0.16 * weight, weight
    if kind == "texture":
        centre = _pick_centre(inner & ((maps["wm"] + maps["gm"]) > 0.8), rng)
        weight = _blob(shape, centre, rng.uniform(3.5, 6.0, 3), rng)
        local_mean = float((image * weight).sum() / weight.sum())
        coarse = ndimage.gaussian_filter(rng.standard_normal(shape), 0.8).astype(np.float32)
        pattern = local_mean + 0.25 * coarse / coarse.std()
        return image * (1 - weight) + pattern * weight, weight
    raise ValueError(f"unknown lesion kind {kind!r}; choose from {LESION_KINDS}.")


def make_subject(
    template: Template, rng: np.random.Generator, lesion: str | None = None, noise: float = 0.02, bias: float = 0.15
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One synthetic subject: ``(image, brainmask, label)`` arrays on the template grid (label None if healthy)."""
    coords = _random_warp(template.mask.shape, rng)
    maps = {name: _warp(getattr(template, name), coords) for name in ("gm", "wm", "csf")}
    mask = _warp(template.mask.astype(np.float32), coords) > 0.5
    label, centre = None, None
    if lesion == "tumour":  # mass effect before the lesion is painted
        centre = _pick_centre(ndimage.binary_erosion(mask, iterations=8) & (maps["wm"] > 0.3), rng)
        moved = _mass_effect([maps["gm"], maps["wm"], maps["csf"]], centre, rng.uniform(4, 7), rng.uniform(2, 4))
        maps = dict(zip(("gm", "wm", "csf"), moved))
    image = _t2_contrast(maps["gm"], maps["wm"], maps["csf"], rng)
    if lesion is not None:
        image, weight = _add_lesion(lesion, image, maps, mask, rng, centre)
        label = (weight > 0.5) & mask
    image = image * np.exp(bias * _smooth_field(image.shape, rng, control_points=3))
    image = image + noise * rng.standard_normal(image.shape).astype(np.float32)
    image = np.where(mask, np.clip(image, 0.0, None), 0.0).astype(np.float32) * SCANNER_SCALE
    return image, mask, label


def make_demo_dataset(
    out_dir: str | os.PathLike, n_train: int = 16, n_test: int = 8, seed: int = 0, spacing_mm: float = 2.0
) -> Path:
    """Write the demo data set (see the module docstring) and return the path of ``datalist.json``."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train} and {n_test}.")
    out = Path(out_dir)
    template = load_template(spacing_mm)
    rngs = np.random.default_rng(seed).spawn(n_train + n_test)
    datalist: dict[str, list[dict]] = {"training": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        kind = None if split == "train" else LESION_KINDS[(i - n_train) % len(LESION_KINDS)]
        name = f"sub-{i:03d}"
        image, mask, label = make_subject(template, rngs[i], lesion=kind)
        entry = {"image": f"{split}/{name}_T2w.nii.gz", "brainmask": f"{split}/{name}_brainmask.nii.gz"}
        atomic_save_nifti(nib.Nifti1Image(image, template.affine), out / entry["image"])
        atomic_save_nifti(nib.Nifti1Image(mask.astype(np.uint8), template.affine), out / entry["brainmask"])
        if label is not None:
            entry["label"] = f"{split}/{name}_lesion.nii.gz"
            entry["kind"] = kind
            atomic_save_nifti(nib.Nifti1Image(label.astype(np.uint8), template.affine), out / entry["label"])
        datalist["training" if split == "train" else "test"].append(entry)
    return atomic_write_json(datalist, out / "datalist.json")
