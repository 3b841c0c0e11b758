"""The volume chain on one real scan of each folder of ../shared/data (skipped where the data are absent)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data.preparers import prepare_entries
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import BrainSliceDataset, SliceSelection, brain_slice_indices

# folder, layout, modality, expects a label
CASES = [
    ("ixi_t1", "ixi", None, False),
    ("brats2013", "brats2013-deepmedic", "T1c", True),
    ("brats2013", "brats2013-deepmedic", "FLAIR", True),
    ("open_ms", "open-ms", "T1", True),
    ("open_ms", "open-ms", "T2", True),
    ("brats_toolkit", "brats-toolkit", "T1c", True),
    ("brats_toolkit", "brats-toolkit", "T2", True),
]


def first_entry(root, layout, modality):
    return prepare_entries(layout, root, modality, skip_incomplete=True)[0]


@pytest.mark.parametrize("folder, layout, modality, labelled", CASES)
def test_real_volume_gives_in_range_brain_slices(shared_data, folder, layout, modality, labelled):
    entry = first_entry(shared_data / folder, layout, modality)
    out = brain_volume_transform(image_size=64)(entry)
    image, brain = out["image"].as_tensor(), out["brainmask"].as_tensor() > 0
    assert image.shape[:3] == (1, 64, 64)
    assert float(image.min()) == 0.0 and 0.9 < float(image.max()) <= 1.0
    assert torch.all(image[~brain] == 0)
    assert 0.1 < float(image[brain].mean()) < 0.9, "brain intensities spread inside [0, 1]"
    picked = brain_slice_indices(out["brainmask"], min_brain_fraction=0.1)
    assert len(picked) > 30, "a whole brain gives many axial slices"
    if labelled:
        label = out["label"].as_tensor()
        assert float(label.sum()) > 20 and set(torch.unique(label).tolist()) == {0.0, 1.0}
        assert float((label * ~brain).sum()) <= 0.01 * float(label.sum()), "lesions lie inside the brain"


def test_slice_dataset_on_two_ixi_volumes(shared_data):
    entries = prepare_entries("ixi", shared_data / "ixi_t1", skip_incomplete=True)[:2]
    ds = BrainSliceDataset(
        entries, brain_volume_transform(image_size=64), SliceSelection(0.1, border_slices=3), progress=False
    )
    assert ds.stacked("image").shape[1:] == (1, 64, 64) and len(ds) == ds.stacked("image").shape[0]
    assert set(ds.subject.tolist()) == {0, 1}
    item = ds[0]
    assert item["image"].shape == (1, 64, 64) and item["brainmask"].dtype == torch.float32
    assert float(item["brainmask"].mean()) >= 0.1


def test_whole_head_and_its_skull_stripped_twin_give_the_same_slices(shared_data, tmp_path):
    """IXI is not skull-stripped: its brain mask must cut the skull off before any interpolation."""
    entry = first_entry(shared_data / "ixi_t1", "ixi", None)
    head = nib.load(entry["image"])
    mask = np.asanyarray(nib.load(entry["brainmask"]).dataobj) > 0
    stripped = tmp_path / "stripped.nii.gz"
    nib.save(nib.Nifti1Image((np.asanyarray(head.dataobj) * mask).astype(np.float32), head.affine), stripped)
    chain = brain_volume_transform(image_size=64)
    a = chain(dict(entry))["image"].as_tensor()
    b = chain({"image": str(stripped), "brainmask": entry["brainmask"]})["image"].as_tensor()
    assert float(a.max()) > 0.9
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
