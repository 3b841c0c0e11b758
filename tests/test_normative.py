"""Normative maps: deviations in units of the healthy spread at the same place, fitted on healthy data only and
never scaled by the scored volume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import pipeline.normative as normative
from pipeline.anomaly_map import AnomalyMap
from pipeline.healthy import fit_grad_normalization, fit_normative
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.normative import BINS, CELLS, NormativeAccumulator, NormativeReference, axial_position
from pipeline.scoring import NORMATIVE, POSTPROCESSED, score_maps

SHAPE = (64, 64, 8 * BINS)  # 4 x 4 pixel cells, 8 slices per axial bin


def healthy_draw(rng, shape=SHAPE):
    """A map whose mean grows from left to right and whose spread is 4x larger in the upper half of the rows."""
    mean = np.linspace(0.0, 1.0, shape[1])[None, :, None] * np.ones(shape)
    spread = np.where(np.arange(shape[0]) < shape[0] // 2, 0.4, 0.1)[:, None, None] * np.ones(shape)
    return mean + spread * rng.standard_normal(shape), spread


def fitted_reference(n_volumes=6, seed=0):
    rng = np.random.default_rng(seed)
    accumulator = NormativeAccumulator()
    brain = np.ones(SHAPE, bool)
    for _ in range(n_volumes):
        accumulator.add(healthy_draw(rng)[0], brain)
    return accumulator.reference(), brain


def test_cell_moments_match_numpy(monkeypatch):
    """Without shrinkage the reference is each cell's plain mean and (population) standard deviation, computed here
    by reshaping the pooled volumes into cells (an independent reference)."""
    monkeypatch.setattr(normative, "PRIOR_VOXELS", 0.0)
    rng = np.random.default_rng(1)
    volumes = [healthy_draw(rng)[0] for _ in range(3)]
    accumulator = NormativeAccumulator()
    for volume in volumes:
        accumulator.add(volume, np.ones(SHAPE, bool))
    reference = accumulator.reference()
    side, depth = SHAPE[0] // CELLS, SHAPE[2] // BINS
    # (volume, cell row, row in cell, cell column, column in cell, bin, slice in bin)
    cells = np.stack(volumes).reshape(3, CELLS, side, CELLS, side, BINS, depth)
    values = cells.transpose(5, 1, 3, 0, 2, 4, 6).reshape(BINS, CELLS, CELLS, -1)
    np.testing.assert_allclose(reference.mean, values.mean(-1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reference.std, values.std(-1), rtol=1e-7)


def test_z_map_has_unit_spread_where_healthy_spread_differs():
    """On a new healthy draw the z-map has spread ~1 in both halves although the raw spread differs 4x; negative
    control: one mean and spread for the whole brain (a whole-brain z-score) leaves the halves' spreads apart."""
    reference, brain = fitted_reference()
    draw, _ = healthy_draw(np.random.default_rng(99))
    z = reference.z_map(draw, brain)
    upper, lower = z[:28], z[36:]  # the halves away from the step, where the interpolation blends the two
    assert abs(upper.std() - 1) < 0.1 and abs(lower.std() - 1) < 0.1, (upper.std(), lower.std())
    assert abs(z.mean()) < 0.05
    assert upper.std() / lower.std() < 1.1
    global_z = (draw - draw.mean()) / draw.std()
    ratio = global_z[: SHAPE[0] // 2].std() / global_z[SHAPE[0] // 2 :].std()
    assert ratio > 1.4, ratio


def test_z_map_is_not_scaled_by_the_scored_volume():
    """A bright lesion changes the z-map inside the lesion only (every constant comes from the healthy data);
    negative control: the authors' per-volume min-max normalisation of the KL gradient changes it everywhere."""
    reference, brain = fitted_reference()
    draw, _ = healthy_draw(np.random.default_rng(7))
    lesioned = draw.copy()
    lesioned[20:30, 20:30, 30:36] += 5.0
    inside = np.zeros(SHAPE, bool)
    inside[20:30, 20:30, 30:36] = True
    before, after = reference.z_map(draw, brain), reference.z_map(lesioned, brain)
    assert np.array_equal(before[~inside], after[~inside]) and (after[inside] > before[inside] + 5).all()
    x = torch.zeros(SHAPE[2], 1, 64, 64)
    grads = torch.from_numpy(draw).permute(2, 0, 1)[:, None].float().abs()
    lesioned_grads = torch.from_numpy(lesioned).permute(2, 0, 1)[:, None].float().abs()
    volume_scaled = replace(POSTPROCESSED, grad_normalization="volume", grad_sigma=0.0)
    plain = score_maps({"recon": x, "kl_grad": grads}, x, volume_scaled)["kl_grad"]
    scaled = score_maps({"recon": x, "kl_grad": lesioned_grads}, x, volume_scaled)["kl_grad"]
    outside = ~torch.from_numpy(inside).permute(2, 0, 1)[:, None]
    assert not torch.allclose(plain[outside], scaled[outside])


def test_axial_position_follows_the_brain_not_the_field_of_view():
    """0 at the lowest slice holding brain and 1 at the highest, whatever lies beyond (a cut field of view)."""
    brain = np.zeros((8, 8, 30), bool)
    brain[2:6, 2:6, 5:25] = True
    position = axial_position(brain)
    assert position[5] == 0 and position[24] == 1 and position[0] == 0 and position[29] == 1
    np.testing.assert_allclose(position[5:25], np.linspace(0, 1, 20))
    assert (axial_position(np.zeros((4, 4, 3), bool)) == 0.5).all()


def test_sparse_cells_borrow_from_the_whole_brain():
    """A cell with a single brain voxel gets a positive spread close to the global one, not 0."""
    brain = np.zeros(SHAPE, bool)
    brain[8:56, 8:56] = True
    brain[0, 0, 0] = True  # a lone voxel in the corner cell
    rng = np.random.default_rng(3)
    accumulator = NormativeAccumulator()
    accumulator.add(rng.standard_normal(SHAPE), brain)
    reference = accumulator.reference()
    assert 0.8 < reference.std[0, 0, 0] < 1.2 and (reference.std > 0).all()


def test_reference_round_trips_and_refuses_bad_arrays():
    reference, _ = fitted_reference(n_volumes=2)
    again = NormativeReference.from_dict(reference.to_dict())
    np.testing.assert_allclose(again.mean, reference.mean, atol=1e-8)
    with pytest.raises(ValueError, match="positive spreads"):
        NormativeReference(reference.mean, np.zeros_like(reference.std))
    with pytest.raises(ValueError, match="means and spreads"):
        NormativeReference(reference.mean[:1], reference.std[:1])
    constant = NormativeAccumulator()
    constant.add(np.ones(SHAPE), np.ones(SHAPE, bool))
    with pytest.raises(ValueError, match="constant"):
        constant.reference()


def untrained_model_and_volumes(n: int, depth: int, seed: int):
    """A seeded untrained narrow model and ``n`` random volumes ``(1, 64, 64, depth)`` inside one box-shaped brain
    (its first and last slices hold none)."""
    torch.manual_seed(0)
    model = AnomalyMap(CeVAE(channels=(8, 16, 32, 64), z_dim=16), CeVAELoss(sigma=0.2)).eval()
    rng = np.random.default_rng(seed)
    brain = np.zeros((64, 64, depth), bool)
    brain[12:52, 10:54, 1 : depth - 1] = True
    images = [torch.from_numpy(rng.random((1, 64, 64, depth)) * brain).float() for _ in range(n)]
    return model, [{"image": image, "brainmask": torch.from_numpy(brain)[None]} for image in images], brain


def test_fit_normative_holds_each_volume_out_of_its_own_reference():
    """``held_out[i]`` is exactly the reference fitted without volume ``i``; the full one differs from each (negative
    control); scoring the normative option set without a reference names what is missing."""
    model, volumes, brain = untrained_model_and_volumes(3, depth=10, seed=0)
    options = fit_grad_normalization(model, volumes, {"normative": NORMATIVE})
    fitted, held_out = fit_normative(model, volumes, options)
    again, _ = fit_normative(model, volumes[1:], options)
    assert held_out[0]["normative"].normative_reference == again["normative"].normative_reference
    assert fitted["normative"].normative_reference != held_out[0]["normative"].normative_reference
    assert fitted["normative"].fitted and not NORMATIVE.fitted
    _, maps = model(volumes[0]["image"], brain, fitted)
    assert np.isfinite(maps["normative"]["combined"]).all()
    with pytest.raises(ValueError, match="fit_normative"):
        model(volumes[0]["image"], brain, {"normative": replace(fitted["normative"], normative_reference=None)})
    plain = {"postprocessed": replace(options["normative"], normative=False)}
    assert fit_normative(model, volumes, plain) == (plain, None)


def test_filtering_only_the_changed_slab_gives_the_same_maps():
    """Scoring a lesioned volume with the healthy volume's maps for its unchanged slices (what the synthetic-lesion
    search does) gives exactly the maps of scoring it whole, for every option set, at the volume's ends too; negative
    control: a wrong span (the lesion's slices said unchanged) gives other maps."""
    from pipeline.scoring import AUTHORS, PAPER, Unchanged

    model, volumes, brain = untrained_model_and_volumes(2, depth=24, seed=1)
    sets = fit_grad_normalization(
        model, volumes, {"paper": PAPER, "authors": AUTHORS, "postprocessed": POSTPROCESSED, "normative": NORMATIVE}
    )
    sets = fit_normative(model, volumes, sets)[0]
    healthy = volumes[0]["image"]
    _, healthy_maps = model(healthy, brain, sets)
    for start, stop in ((9, 13), (0, 2), (21, 24)):
        lesioned = healthy.clone()
        lesioned[..., 20:40, 20:40, start:stop] += 0.5
        _, whole = model(lesioned, brain, sets)
        _, slab = model(lesioned, brain, sets, unchanged=Unchanged(healthy_maps, start, stop))
        for config in sets:
            for score in whole[config]:
                assert np.array_equal(whole[config][score], slab[config][score]), (start, config, score)
    _, wrong = model(lesioned, brain, sets, unchanged=Unchanged(healthy_maps, 0, 0))
    assert not np.array_equal(wrong["postprocessed"]["rec"], whole["postprocessed"]["rec"])
