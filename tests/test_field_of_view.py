"""A field of view that cuts the brain in-plane: the brain framed as an uncut one, and the padding undone."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import save_nifti

import pipeline.data.field_of_view as field_of_view
from pipeline.data.field_of_view import AP_LR_RATIO, cut_padding
from pipeline.data.preprocessing import brain_volume_transform

SPACING = (1.5, 1.0, 2.0)  # mm along R, A, S: anisotropic, so that extents are compared in mm


def ellipsoid(shape=(60, 90, 40)) -> np.ndarray:
    """A brain mask in RAS whose anterior-posterior extent (mm) is the healthy ratio times its left-right one."""
    lr_mm = 66.0
    radii_mm = np.array([lr_mm / 2, lr_mm * AP_LR_RATIO / 2, 30.0])
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SPACING)], indexing="ij"))
    return ((grid / radii_mm[:, None, None, None]) ** 2).sum(0) <= 1


def cropped(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to its brain with the chain's margin of 2 planes (an uncut brain's faces hold no brain)."""
    boxes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return np.pad(mask[tuple(slice(b[0], b[-1] + 1) for b in boxes)], 2)


def test_cut_padding_restores_the_missing_extent_on_the_cut_faces_only():
    """An uncut brain gets no padding; one whose anterior, posterior or both ends are cut off gets the missing planes
    back on those faces (the extent in mm of a healthy brain of its width); a brain cut along both in-plane axes,
    which leaves nothing to estimate from, gets none."""
    brain = cropped(ellipsoid())
    ap = brain.shape[1]
    assert cut_padding(brain, SPACING) == ((0, 0),) * 4
    anterior = brain[:, : ap - 22]  # RAS: the anterior end is the high end of axis 1
    _, lr, (low, high), _ = cut_padding(anterior, SPACING)
    assert lr == (0, 0) and low == 0 and abs(high - 20) <= 1
    posterior = brain[:, 17:]
    assert abs(cut_padding(posterior, SPACING)[2][0] - 15) <= 1 and cut_padding(posterior, SPACING)[2][1] == 0
    both = brain[:, 12 : ap - 12]
    low, high = cut_padding(both, SPACING)[2]
    assert abs(low + high - 20) <= 1 and abs(low - high) <= 1
    lr_cut = brain[10:]
    assert cut_padding(lr_cut, SPACING)[1][0] == pytest.approx(8, abs=1) and cut_padding(lr_cut, SPACING)[2] == (0, 0)
    assert cut_padding(brain[10:, : ap - 22], SPACING) == ((0, 0),) * 4


def chain_output(mask: np.ndarray, tmp_path, name: str) -> tuple[np.ndarray, dict]:
    affine = np.diag([*SPACING, 1.0])
    image = np.where(mask, 100.0 + np.arange(mask.shape[1])[None, :, None], 0.0).astype(np.float32)
    files = {"image": save_nifti(image, tmp_path / f"{name}.nii.gz", affine)}
    files["brainmask"] = save_nifti(mask.astype(np.uint8), tmp_path / f"{name}_mask.nii.gz", affine)
    chain = brain_volume_transform(64)
    out = chain(files)
    return np.asarray(out["brainmask"][0]) > 0, {"chain": chain, "out": out, "files": files}


def test_a_cut_brain_is_framed_like_the_uncut_one_and_inverted_back(tmp_path, monkeypatch):
    """Through the whole volume chain, a brain with its anterior 20 planes cut off lands in the 64-pixel frame where
    the uncut brain's posterior part lands (the same left-right extent and posterior edge, within a pixel of the
    64-pixel frame); without the padding
    (negative control) it is framed larger. The chain's inverse brings the cut volume's mask back onto its own
    grid."""
    brain = ellipsoid()
    first_ap = np.flatnonzero(brain.any(axis=(0, 2)))[-1]
    cut = brain[:, : first_ap + 1 - 20]
    whole, _ = chain_output(brain, tmp_path, "whole")
    framed, run = chain_output(cut, tmp_path, "cut")

    def extent(mask, axis):
        planes = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        return planes[0], planes[-1]

    assert np.abs(np.subtract(extent(framed, 0), extent(whole, 0))).max() <= 1  # within a pixel of the frame
    assert abs(extent(framed, 1)[0] - extent(whole, 1)[0]) <= 1 and extent(framed, 1)[1] < extent(whole, 1)[1] - 8
    kept = whole.copy()
    kept[:, extent(framed, 1)[1] + 1 :] = False
    assert (framed & kept).sum() / (framed | kept).sum() > 0.95

    inverted = run["chain"].inverse(dict(run["out"]))["brainmask"]
    original = np.asanyarray(nib.load(run["files"]["brainmask"]).dataobj) > 0
    assert tuple(inverted.shape[1:]) == original.shape
    recovered = np.asarray(inverted[0]) > 0.5
    assert (recovered & original).sum() / (recovered | original).sum() > 0.9

    monkeypatch.setattr(field_of_view, "_padding", lambda *args, **kwargs: ((0, 0),) * 4)
    unpadded, _ = chain_output(cut, tmp_path, "unpadded")
    assert extent(unpadded, 0)[1] - extent(unpadded, 0)[0] > extent(whole, 0)[1] - extent(whole, 0)[0] + 4
