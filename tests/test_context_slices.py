"""2.5D input (``context_slices``): each slice with its neighbours as channels, in training, scoring and the bundle."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLE, run_bundle
from conftest import input_error

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.datalist import load_datalist
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import BrainSliceDataset, SliceSelection, centre_slice, volume_to_slices, with_context
from pipeline.healthy import mean_brain_check
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.release import ship_architecture
from pipeline.run_record import EXECUTED_CONFIG
from pipeline.scoring import ScoreOptions
from pipeline.tracking.scan_model import scan_inference

SMALL = {"channels": (4, 8, 8), "z_dim": 8}  # 32x32 inputs


@pytest.mark.parametrize("k", [1, 2])
def test_with_context_stacks_each_slice_between_its_neighbours(k):
    slices = torch.randn(6, 1, 5, 4)
    stacked = with_context(slices, k)
    assert stacked.shape == (6, 1 + 2 * k, 5, 4)
    for d in range(6):  # reference: a loop over the neighbours, 0 beyond the volume
        for c, offset in enumerate(range(-k, k + 1)):
            expected = slices[d + offset, 0] if 0 <= d + offset < 6 else torch.zeros(5, 4)
            torch.testing.assert_close(stacked[d, c], expected, rtol=0, atol=0)
    torch.testing.assert_close(centre_slice(stacked, k), slices, rtol=0, atol=0)
    assert with_context(slices, 0) is slices and centre_slice(slices, 0) is slices


def test_the_dataset_gives_2_5d_slices_from_its_own_cache_entry(phantom_files, tmp_path):
    transform = brain_volume_transform(image_size=32)
    selection = SliceSelection(min_brain_fraction=0.1)
    volume = volume_to_slices(transform(dict(phantom_files))["image"].as_tensor())

    def dataset(k):
        return BrainSliceDataset(
            [phantom_files], transform, selection, progress=False, cache_dir=tmp_path / "cache", context_slices=k
        )

    flat, slab = dataset(0), dataset(1)
    assert len(list((tmp_path / "cache").glob("*/"))) == 2, "2D and 2.5D slices share a cache entry"
    assert flat[0]["image"].shape == (1, 32, 32) and slab[0]["image"].shape == (3, 32, 32)
    for i in (0, len(slab) // 2, len(slab) - 1):
        d = int(slab.slice[i])
        neighbours = [volume[j, 0] if 0 <= j < len(volume) else torch.zeros(32, 32) for j in (d - 1, d, d + 1)]
        torch.testing.assert_close(slab[i]["image"], torch.stack(neighbours), rtol=0, atol=0)
        torch.testing.assert_close(slab[i]["image"][1:2], flat[i]["image"], rtol=0, atol=0)
    assert slab[0]["brainmask"].shape == (1, 32, 32)  # masks and labels stay the middle slice's
    # the healthy check's mean brain is of the middle slices (it does not depend on the network): as in 2D
    checks = [
        mean_brain_check(CeVAE(image_size=32, context_slices=k, **SMALL), d, d) for k, d in ((0, flat), (1, slab))
    ]
    assert checks[0]["mean_brain_mse"] > 0
    assert checks[1]["mean_brain_mse"] == pytest.approx(checks[0]["mean_brain_mse"], rel=1e-6)


@pytest.mark.parametrize("k", [0, 1])
def test_a_2_5d_model_scores_the_middle_slice_from_its_neighbours(k):
    torch.manual_seed(0)
    image = torch.rand(1, 32, 32, 7)
    brain = np.ones((32, 32, 7), dtype=bool)
    model = AnomalyMap(CeVAE(image_size=32, context_slices=k, **SMALL).eval(), CeVAELoss(sigma=0.1))
    paper = {"paper": ScoreOptions()}
    _, maps = model(image, brain, paper, scores=("rec",))
    d = 3  # by hand: the network's input is slices d-k..d+k, the map the middle channel's residual
    window = torch.stack([image[0, :, :, j] for j in range(d - k, d + k + 1)])[None]
    recon = model.network.decode(model.network.encode(window)[0])[0, k]
    np.testing.assert_allclose(maps["paper"]["rec"][..., d], (image[0, :, :, d] - recon).abs().detach(), atol=1e-5)
    changed = image.clone()
    changed[..., d + 1] += 1.0  # only the next slice changes
    _, again = model(changed, brain, paper, scores=("rec",))
    moved = np.abs(again["paper"]["rec"][..., d] - maps["paper"]["rec"][..., d]).max()
    assert (moved > 1e-4) if k else (moved == 0), f"context {k}: slice {d}'s map moved by {moved}"


def test_a_2_5d_bundle_trains_calibrates_infers_and_ships_its_input_shape(tiny_demo, tmp_path):
    out = tmp_path / "run"
    run_bundle(out, tiny_demo, epochs=2, context_slices=1)
    checkpoint = out / "checkpoints" / "model.pt"
    assert json.loads((out / "checkpoints" / "config.json").read_text())["context_slices"] == 1
    assert torch.load(checkpoint)["model"]["encoder.0.weight"].shape[1] == 3
    stored = json.loads((out / "checkpoints" / "threshold.json").read_text())
    assert stored["healthy"]["synthetic"]["operating_point"]["synthetic_dice"] >= 0
    assert stored["healthy"]["validation"]["rec_vs_mean_brain"] > 0

    entry = load_datalist(tiny_demo, "test")[0]
    written = scan_inference(checkpoint, tmp_path / "pred")(entry["image"], entry["brainmask"])
    anomaly = nib.load(written["anomaly"])
    assert anomaly.shape == nib.load(entry["image"]).shape and np.isfinite(anomaly.get_fdata()).all()

    with pytest.raises(Exception) as refused:  # scored as 2D: refused in one line, not scored wrongly
        run_bundle(out, tiny_demo, ("train.json", "evaluate.json"))
    assert "context_slices=0 (trained with 1)" in str(input_error(refused.value))

    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("train.json", "metadata.json"):
        (configs / name).write_text((BUNDLE / "configs" / name).read_text())
    ship_architecture(checkpoint, configs)
    shipped = json.loads((configs / "metadata.json").read_text())["network_data_format"]
    assert shipped["inputs"]["image"]["num_channels"] == 3 == shipped["outputs"]["pred"]["num_channels"]
    assert shipped["inputs"]["image"]["channel_def"] == {
        "0": "image of slice -1",
        "1": "image",
        "2": "image of slice +1",
    }
    assert json.loads((configs / "train.json").read_text())["context_slices"] == 1
    assert shipped["inputs"]["image"]["value_range"] == [] == shipped["outputs"]["pred"]["value_range"]  # z-scored
    executed = checkpoint.parent / EXECUTED_CONFIG  # the same export of a model trained on percentile intensities
    executed.write_text(json.dumps({**json.loads(executed.read_text()), "normalization": "percentile"}))
    ship_architecture(checkpoint, configs)
    shipped = json.loads((configs / "metadata.json").read_text())["network_data_format"]
    assert shipped["inputs"]["image"]["value_range"] == [0, 1] == shipped["outputs"]["pred"]["value_range"]
