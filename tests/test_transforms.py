"""The volume chain and its custom transforms on synthetic volumes with known geometry and statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import brain_phantom, input_error, save_nifti
from monai.data import MetaTensor
from monai.transforms import Resize
from scipy import ndimage

from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import brain_slice_indices, slices_to_volume, volume_to_slices
from pipeline.data.transforms import AntiAlias, BrainIntensityNormalize, ForegroundMask, SquarePad, SquarePadd


def lps_copy(array, spacing=2.0):
    """The same volume stored in LPS voxel order, with the affine that keeps every voxel's world position."""
    n0, n1 = array.shape[:2]
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:2, 3] = [spacing * (n0 - 1), spacing * (n1 - 1)]
    return array[::-1, ::-1].copy(), affine


def test_lps_and_ras_give_the_same_slices(tmp_path):
    image, mask, label = brain_phantom()
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    files = {}
    for name, (img, msk, lab, aff) in {
        "ras": (image, mask, label, ras),
        "lps": (lps_copy(image)[0], lps_copy(mask)[0], lps_copy(label)[0], lps_copy(image)[1]),
    }.items():
        files[name] = {
            k: save_nifti(v, tmp_path / f"{name}_{k}.nii.gz", aff)
            for k, v in {"image": img, "brainmask": msk, "label": lab}.items()
        }
    chain = brain_volume_transform(image_size=64)
    out_ras, out_lps = chain(files["ras"]), chain(files["lps"])
    for key in ("image", "brainmask", "label"):
        assert out_ras[key].shape == (1, 64, 64, out_ras[key].shape[-1])
        torch.testing.assert_close(out_ras[key].as_tensor(), out_lps[key].as_tensor())


def native_phantom():
    """The phantom's image and mask as channel-first tensors at their own resolution."""
    image, mask, _ = brain_phantom()
    return torch.as_tensor(image[None]), torch.as_tensor(mask[None]), torch.as_tensor(mask > 0)


def test_percentile_normalisation_statistics():
    image, mask, brain = native_phantom()
    out = BrainIntensityNormalize("percentile")(image, mask)[0]
    assert out.dtype == torch.float32 and float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert torch.all(out[~brain] == 0), "background must be exactly 0"
    inside = out[brain]
    # clipping at the 0.5 / 99.5 percentiles puts ~0.5 % of brain voxels at each bound
    assert 0.002 < float((inside == 1.0).float().mean()) < 0.01
    assert 0.002 < float((inside == 0.0).float().mean()) < 0.01


def test_percentile_normalisation_equals_torch_quantile_clipping():
    """An independent reference: torch.quantile's percentiles (linear interpolation), clipping and scaling of the
    whole volume in float64, then the background set to 0: the same float32 values, bit for bit."""
    image, mask, brain = native_phantom()
    voxels = image[0][brain].double()
    lo, hi = torch.quantile(voxels, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
    expected = torch.where(brain, ((image[0].double().clamp(lo, hi) - lo) / (hi - lo)), 0.0).float()
    assert torch.equal(BrainIntensityNormalize("percentile")(image, mask)[0], expected)


def test_zscore_normalisation_statistics():
    image, mask, brain = native_phantom()
    out = BrainIntensityNormalize("zscore")(image, mask)[0]
    assert abs(float(out[brain].mean())) < 1e-4 and abs(float(out[brain].std()) - 1.0) < 1e-3
    assert torch.all(out[~brain] == 0)


def test_chain_keeps_the_normalised_range_and_a_zero_background(phantom_files):
    image, mask, brain = native_phantom()
    for mode in ("percentile", "equalize"):
        out = brain_volume_transform(image_size=64, normalization=mode)(phantom_files)
        resized, resized_brain = out["image"].as_tensor(), out["brainmask"].as_tensor() > 0
        assert resized.dtype == torch.float32 and torch.all(resized[~resized_brain] == 0)
        assert 0.0 <= float(resized.min()) and float(resized.max()) <= 1.0
        native_mean = float(BrainIntensityNormalize(mode)(image, mask)[0][brain].mean())
        assert abs(float(resized[resized_brain].mean()) - native_mean) < 0.05, "resizing keeps the intensity scale"


def test_skull_and_negative_background_do_not_bleed_into_the_brain(tmp_path):
    image, mask, label = brain_phantom()
    shell = ndimage.binary_dilation(mask > 0, iterations=3) & (mask == 0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    variants = {  # the same brain: with a bright skull around it, skull-stripped, and z-scored-style background
        "head": np.where(shell, 2000.0, image),
        "stripped": np.where(mask > 0, image, 0.0),
        "negative": np.where(mask > 0, image, -1000.0),
    }
    chain = brain_volume_transform(image_size=64)
    outputs = {}
    for name, array in variants.items():
        files = {
            "image": save_nifti(array.astype(np.float32), tmp_path / f"{name}.nii.gz", affine),
            "brainmask": save_nifti(mask, tmp_path / "mask.nii.gz", affine),
        }
        outputs[name] = chain(files)["image"].as_tensor()
    assert float(outputs["stripped"].max()) > 0.9
    for name in ("head", "negative"):
        torch.testing.assert_close(outputs[name], outputs["stripped"], rtol=0, atol=1e-6)


def test_equalize_normalisation_makes_brains_uniform_and_keeps_tissue_order(phantom_files, tmp_path):
    image_t, mask_t, brain = native_phantom()
    inside = BrainIntensityNormalize("equalize")(image_t, mask_t)[0][brain].double()
    assert float(inside.min()) > 0 and float(inside.max()) == 1.0
    # uniform on (0, 1]: mean 1/2, variance 1/12, deciles at 0.1 steps
    assert abs(float(inside.mean()) - 0.5) < 0.01 and abs(float(inside.var()) - 1 / 12) < 0.005
    deciles = torch.quantile(inside, torch.linspace(0.1, 0.9, 9, dtype=torch.float64))
    assert torch.allclose(deciles, torch.linspace(0.1, 0.9, 9, dtype=torch.float64), atol=0.01)
    # a monotone change of contrast (another scanner, another weighting of the same tissue order) changes nothing
    # (the ranks are taken at the input's own resolution); percentile scaling changes it
    image = brain_volume_transform(image_size=64, normalization="equalize")(phantom_files)["image"].as_tensor()
    image_np, mask, label = brain_phantom()
    warped = {
        "image": save_nifti(
            np.where(mask > 0, np.exp(image_np / 200.0), 0), tmp_path / "w.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0])
        ),
        "brainmask": phantom_files["brainmask"],
    }
    again = brain_volume_transform(image_size=64, normalization="equalize")(warped)["image"].as_tensor()
    assert float((again - image).abs().mean()) < 0.005
    scaled = [brain_volume_transform(image_size=64)(f)["image"].as_tensor() for f in (phantom_files, warped)]
    assert float((scaled[0] - scaled[1]).abs().mean()) > 0.03


def test_labels_are_binary_and_aligned(phantom_files):
    out = brain_volume_transform(image_size=64)(phantom_files)
    image, brain, label = (out[k].as_tensor() for k in ("image", "brainmask", "label"))
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    assert torch.all(label <= brain), "lesion voxels must lie inside the brain"
    # the phantom's lesion is +400 brighter: aligned labels cover the bright voxels
    assert float(image[label > 0].mean()) > float(image[(brain > 0) & (label == 0)].mean()) + 0.3


def test_negative_background_without_mask_is_derived_from_corners(tmp_path):
    image, mask, _ = brain_phantom(lesion=False)
    zscored = np.where(mask > 0, (image - image[mask > 0].mean()) / image[mask > 0].std(), -3.7).astype(np.float32)
    with_mask = {
        "image": save_nifti(zscored, tmp_path / "z.nii.gz"),
        "brainmask": save_nifti(mask, tmp_path / "m.nii.gz"),
    }
    without_mask = {"image": with_mask["image"]}
    chain = brain_volume_transform(image_size=64)
    a, b = chain(with_mask), chain(without_mask)
    torch.testing.assert_close(a["brainmask"].as_tensor(), b["brainmask"].as_tensor())
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())
    assert torch.all(b["image"].as_tensor()[b["brainmask"].as_tensor() == 0] == 0)


@pytest.mark.parametrize("size", [64, 128, 192])
def test_image_sizes_keep_the_slice_axis(phantom_files, size):
    out = brain_volume_transform(image_size=size)(phantom_files)
    depth = out["image"].shape[-1]
    assert out["image"].shape == (1, size, size, depth)
    assert out["label"].shape == (1, size, size, depth)
    assert 30 <= depth <= 40  # brain extent of the 40-slice phantom plus the margin


def test_foreground_mask_and_square_pad():
    img = torch.zeros(1, 6, 4, 3)
    img[0, 2:4, 1:3, 1] = 5.0
    mask = ForegroundMask()(img)
    assert mask.shape == (1, 6, 4, 3) and float(mask.sum()) == 4.0
    padded = SquarePad()(MetaTensor(img))
    assert padded.shape == (1, 6, 6, 3)
    assert float(padded.sum()) == float(img.sum())
    padder = SquarePadd("image")
    restored = padder.inverse(padder({"image": MetaTensor(img)}))
    torch.testing.assert_close(restored["image"].as_tensor(), img)


@pytest.mark.parametrize("shape", [(1, 181, 181, 40), (1, 96, 96, 12), (1, 64, 64, 9), (1, 150, 110)])
def test_anti_alias_is_monai_resize_anti_aliasing(shape):
    """AntiAlias + Resize(anti_aliasing=False) gives MONAI's Resize(anti_aliasing=True) (float rounding apart)."""
    torch.manual_seed(0)
    image = MetaTensor(torch.rand(shape) * 1000, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    size = (64, 64, -1)[: len(shape) - 1]
    mode = "trilinear" if len(shape) == 4 else "bilinear"
    smoothed = AntiAlias(size)(image)
    assert isinstance(smoothed, MetaTensor) and torch.equal(smoothed.affine, image.affine)
    expected = Resize(size, mode=mode, anti_aliasing=True)(image)
    torch.testing.assert_close(Resize(size, mode=mode, anti_aliasing=False)(smoothed), expected, atol=1e-3, rtol=1e-6)
    if shape[1] <= 64:
        assert torch.equal(smoothed.as_tensor(), image.as_tensor()), "nothing shrinks: nothing filtered"
    else:
        assert float(smoothed.std()) < float(image.std()), "shrunk axes are low-passed"
    if len(shape) == 4:  # the slice axis (-1: kept) is never filtered: slices stay separate
        single = torch.zeros(shape)
        single[..., 3] = 1.0
        filtered = AntiAlias(size)(single)
        assert torch.all(filtered[..., :3] == 0) and torch.all(filtered[..., 4:] == 0)


def test_normalisation_rejects_an_empty_mask():
    with pytest.raises(ValueError, match="brain mask is empty"):
        BrainIntensityNormalize()(torch.rand(1, 4, 4, 4), torch.zeros(1, 4, 4, 4))


def test_slice_helpers_round_trip_and_select_brain_slices():
    vol = torch.rand(1, 8, 8, 5)
    assert volume_to_slices(vol).shape == (5, 1, 8, 8)
    torch.testing.assert_close(slices_to_volume(volume_to_slices(vol)), vol)
    mask = torch.zeros(1, 10, 10, 7)
    for z, side in enumerate([0, 2, 5, 8, 8, 5, 1]):  # brain fraction per slice: side^2 / 100
        mask[0, :side, :side, z] = 1
    assert brain_slice_indices(mask, min_brain_fraction=0.0) == [1, 2, 3, 4, 5, 6]
    assert brain_slice_indices(mask, min_brain_fraction=0.25) == [2, 3, 4, 5]
    assert brain_slice_indices(mask, min_brain_fraction=0.0, border_slices=2) == [3, 4]


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or Inf"),
        ("4d", "4D series"),
        ("2d", "expected a 3D volume"),
        ("zeros", "the image is empty"),
        ("shape", "has shape"),
        ("affine", "different affines"),
        ("empty_mask", "brain mask is empty"),
    ],
)
def test_bad_volumes_fail_with_the_file_named(tmp_path, case, message):
    image, mask, _ = brain_phantom(lesion=False)
    data = {"image": image, "brainmask": mask}
    affines = {"image": np.eye(4), "brainmask": np.eye(4)}
    if case == "nan":
        data["image"] = image.copy()
        data["image"][10, 10, 10] = np.nan
    elif case == "4d":
        data["image"] = np.stack([image, image], axis=-1)
    elif case == "2d":
        data = {"image": image[:, :, 20]}
    elif case == "zeros":
        data["image"] = np.zeros_like(image)
    elif case == "shape":
        data["brainmask"] = mask[:-2]
    elif case == "affine":
        affines["brainmask"] = np.diag([1.0, 1.0, 1.5, 1.0])
    elif case == "empty_mask":
        data["brainmask"] = np.zeros_like(mask)
    files = {k: save_nifti(v, tmp_path / f"{case}_{k}.nii.gz", affines.get(k)) for k, v in data.items()}
    with pytest.raises(Exception) as info:
        brain_volume_transform()(files)
    err = input_error(info.value)
    assert err is not None and message in str(err)
    assert f"{case}_" in str(err), "the message must name the file"


def write_oversized_header(path):
    """A small .nii whose header claims 30000^3 voxels (patched int16 dim fields at byte 40)."""
    save_nifti(np.zeros((4, 4, 4), np.float32), path)
    raw = bytearray(path.read_bytes())
    raw[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "truncated or corrupt"),
        ("not_nifti", "cannot be read as NIfTI"),
        ("oversized", "over the limit"),
        ("missing", "file not found"),
    ],
)
def test_unreadable_files_fail_with_the_file_named(tmp_path, case, message):
    image, mask, _ = brain_phantom(lesion=False)
    path = tmp_path / f"{case}.nii.gz"
    if case == "truncated":
        save_nifti(image, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "not_nifti":
        path.write_text("subject,age\n1,42\n")
    elif case == "oversized":
        path = tmp_path / f"{case}.nii"
        write_oversized_header(path)
    with pytest.raises(Exception) as info:
        brain_volume_transform()({"image": str(path)})
    err = input_error(info.value)
    assert err is not None and message in str(err) and f"{case}.nii" in str(err)


def test_any_positive_label_value_is_lesion(tmp_path):
    """Labels are binarised with ``label > 0``: multi-class (BraTS 0-4) and float labels both work."""
    image, mask, label = brain_phantom()
    graded = label.astype(np.float32) * np.where(np.arange(label.shape[0])[:, None, None] % 2, 0.2, 3.0)
    files = {"image": save_nifti(image, tmp_path / "i.nii.gz"), "brainmask": save_nifti(mask, tmp_path / "m.nii.gz")}
    binary = brain_volume_transform()({**files, "label": save_nifti(label, tmp_path / "l.nii.gz")})["label"]
    graded_out = brain_volume_transform()({**files, "label": save_nifti(graded, tmp_path / "g.nii.gz")})["label"]
    torch.testing.assert_close(graded_out.as_tensor(), binary.as_tensor())


def _slices(seed=0, n=6):
    """Brain-like slices: a bright ellipse with texture on a zero background, in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:32, :32]
    brain = ((rows - 15.5) / 12) ** 2 + ((cols - 15.5) / 10) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.random((n, 32, 32)), 1.5)
    x = np.where(brain, 0.3 + texture / texture.max() * 0.7, 0.0).astype(np.float32)
    return torch.from_numpy(x)[:, None]


def test_slice_augmentation_is_seeded_and_keeps_background_and_range():
    from pipeline.data.augmentation import SliceAugmentation

    x, aug = _slices(), SliceAugmentation(spatial_prob=0.0)  # intensity changes and flips only: no resampling
    draw = [aug(x, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2]), "seeded; another seed differs"
    assert not torch.equal(draw[0], x)
    out = draw[0]
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)))  # the range preprocessing gives
    background = (x == 0) & (x.flip(-2) == 0)
    assert torch.all(out[background] == 0), "the background stays at the slice minimum"
    still = SliceAugmentation(flip_prob=0.0, spatial_prob=0.0, intensity_prob=0.0)
    assert torch.equal(still(x), x), "all probabilities 0: the slices as they are"


def test_slice_augmentation_geometry_matches_scipy():
    """Independent reference: a flip is ``x.flip`` along H (the R-L axis); a pure zoom (rotation 0, scale fixed)
    equals ``scipy.ndimage.affine_transform`` about the image centre with linear interpolation."""
    from pipeline.data.augmentation import SliceAugmentation

    x = _slices(1, 2)
    flipped = SliceAugmentation(flip_prob=1.0, spatial_prob=0.0, intensity_prob=0.0)(x)
    assert torch.equal(flipped, x.flip(-2))
    zoom = SliceAugmentation(flip_prob=0.0, spatial_prob=1.0, rotate=0.0, scale=(1.25, 1.25), intensity_prob=0.0)(x)
    centre = (np.array(x.shape[-2:]) - 1) / 2
    for got, image in zip(zoom[:, 0].numpy(), x[:, 0].numpy()):
        expected = ndimage.affine_transform(image, np.eye(2) / 1.25, centre - centre / 1.25, order=1, mode="constant")
        np.testing.assert_allclose(got[4:-4, 4:-4], expected[4:-4, 4:-4], atol=1e-5)
