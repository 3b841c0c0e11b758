"""The embedded demo data set: built from nilearn's template, lesions inside the brain, T2-like contrast."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO
from scipy import ndimage

from pipeline.data.datalist import load_datalist
from pipeline.data.demo import LESION_KINDS, load_template, make_subject


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "make_demo_data.py"),
        "--out",
        str(out),
        "--n-train",
        "2",
        "--n-test",
        "4",
        "--seed",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def test_datalist_loads_with_the_documented_keys(demo_dir):
    training = load_datalist(demo_dir / "datalist.json", "training", required=("image", "brainmask"))
    test = load_datalist(demo_dir / "datalist.json", "test", required=("image", "brainmask", "label"))
    assert len(training) == 2 and len(test) == 4
    assert sorted(entry["kind"] for entry in test) == sorted(LESION_KINDS)


def test_lesions_lie_inside_the_brain_and_grids_match(demo_dir):
    for entry in load_datalist(demo_dir / "datalist.json", "test"):
        image, mask, label = (nib.load(entry[k]) for k in ("image", "brainmask", "label"))
        assert image.shape == mask.shape == label.shape
        assert np.allclose(image.affine, label.affine) and np.allclose(image.affine, mask.affine)
        lesion, brain = np.asanyarray(label.dataobj) > 0, np.asanyarray(mask.dataobj) > 0
        assert lesion.sum() >= 20, f"{entry['kind']} lesion too small"
        assert not np.any(lesion & ~brain)
        assert np.all(np.asanyarray(image.dataobj)[~brain] == 0), "skull-stripped: zero background"


@pytest.fixture(scope="module")
def template():
    return load_template()


def test_healthy_contrast_is_t2_like_and_subjects_differ(template):
    rng = np.random.default_rng(0)
    image, mask, label = make_subject(template, rng)
    assert label is None
    other, _, _ = make_subject(template, rng)
    pure = {name: getattr(template, name) > 0.9 for name in ("csf", "gm", "wm")}
    means = {name: float(image[region & mask].mean()) for name, region in pure.items()}
    assert means["csf"] > means["gm"] > means["wm"], means
    assert not np.allclose(image, other), "each subject has its own deformation, contrast and noise"


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_lesion_kinds_have_their_documented_contrast(template, kind):
    image, mask, label = make_subject(template, np.random.default_rng(3), lesion=kind)
    ring = ndimage.binary_dilation(label, iterations=3) & ~label & mask
    lesion_mean, ring_mean = float(image[label].mean()), float(image[ring].mean())
    if kind in ("tumour", "ms"):
        assert lesion_mean > ring_mean * 1.2, "hyperintense"
    elif kind == "hypointense":
        assert lesion_mean < ring_mean * 0.6, "darker than its surroundings"
    else:  # texture: mean close to the surroundings, but far more variable
        assert abs(lesion_mean - ring_mean) < 0.25 * ring_mean
        assert image[label].std() > 1.5 * image[ring].std()
