"""Synthetic lesions in healthy volumes: the mask is what changed, each kind changes what it says, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.synthetic_lesions import LESION_KINDS, SyntheticLesion, SyntheticLesiond


def healthy_volume(seed: int, depth: int = 36):
    """A (1, 48, 48, depth) smooth 'brain' in [0, 1] inside an ellipsoid mask, 0 outside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 48, depth)], indexing="ij"))
    brain = (grid**2 / np.array([0.8, 0.9, 0.85])[:, None, None, None] ** 2).sum(0) < 1
    image = np.clip(0.5 + 0.2 * grid[0] + 0.1 * rng.standard_normal(brain.shape), 0, 1) * brain
    return torch.from_numpy(image[None].astype(np.float32)), torch.from_numpy(brain[None].astype(np.uint8))


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_the_mask_is_exactly_where_the_volume_changed(kind):
    image, brain = healthy_volume(0)
    foreign, _ = healthy_volume(1, depth=30)  # another subject, other depth: same relative position
    for seed in range(5):
        lesioned, mask, got = SyntheticLesion(kinds=(kind,)).set_random_state(seed)(image, brain, foreign)
        changed = (lesioned != image)[0]
        mask = mask[0].bool()
        assert got == kind and mask.any() and not (mask & ~brain[0].bool()).any(), "inside the brain"
        assert not (changed & ~mask).any(), "nothing changes outside the mask"
        assert changed[mask].float().mean() > 0.5, "most of the mask changed"
        inside = lesioned[0][mask] - image[0][mask]
        if kind == "hyper":
            assert inside.mean() > 0 and (inside >= 0).all()
        elif kind == "hypo":
            assert inside.mean() < 0 and (inside <= 0).all()
        elif kind == "texture":  # structure, not level: the change's mean is ~0, its spread is not
            assert abs(float(inside.mean())) < 0.05 * float(inside.std())


def test_a_foreign_patch_is_the_other_subjects_tissue_where_the_weight_is_one():
    image, brain = healthy_volume(0)
    foreign, _ = healthy_volume(1)
    lesion = SyntheticLesion(kinds=("foreign",), radius=(8.0, 10.0)).set_random_state(3)
    lesioned, mask, _ = lesion(image, brain, foreign)
    core = torch.from_numpy(
        SyntheticLesion(kinds=("foreign",), radius=(8.0, 10.0))
        .set_random_state(3)
        .blob(tuple(brain.shape[1:]), brain[0].numpy() > 0)
        == 1
    )
    assert core.sum() > 10 and torch.equal(lesioned[0][core], foreign[0][core])
    assert torch.equal(lesioned[0][~mask[0].bool()], image[0][~mask[0].bool()])


def test_seeds_reproduce_and_differ():
    image, brain = healthy_volume(0)
    draws = [SyntheticLesion().set_random_state(seed)(image, brain, image) for seed in (7, 7, 8)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][1], draws[2][1]), "another seed, another lesion"


def test_the_dictionary_transform_writes_label_and_kind():
    image, brain = healthy_volume(0)
    transform = SyntheticLesiond(kinds=("hyper", "foreign")).set_random_state(0)
    out = transform({"image": image, "brainmask": brain, "foreign": healthy_volume(2)[0]})
    assert out["lesion_kind"] in ("hyper", "foreign") and out["label"].dtype == torch.uint8
    assert torch.equal(out["label"].bool()[0], (out["image"] != image)[0] | (out["label"].bool()[0]))
    with pytest.raises(ValueError, match="another healthy volume"):
        SyntheticLesion(kinds=("foreign",))(image, brain)
    with pytest.raises(ValueError, match="kinds"):
        SyntheticLesion(kinds=("tumour",))


def test_synthetic_lesion_search_measures_every_candidate_and_chooses_within_one_standard_error(tiny_demo):
    """Against an independent reference on the network-free ``intensity`` map of the ``paper`` option set (the
    preprocessed image itself): the same seeded lesions thresholded by hand, small components removed on the
    materialised masks, pooled, scored with sklearn's F1 (= Dice). A stricter quantile and a larger minimum size give
    other figures (negative controls); the operating point lies within one standard error of the best model candidate.
    """
    from sklearn.metrics import f1_score

    from pipeline.anomaly_map import AnomalyMap
    from pipeline.calibration import MODEL_SCORES, synthetic_lesion_search
    from pipeline.data.datalist import load_datalist
    from pipeline.data.preprocessing import brain_volume_transform
    from pipeline.healthy import healthy_brain_maps, healthy_thresholds
    from pipeline.losses import CeVAELoss
    from pipeline.metrics import remove_small_components
    from pipeline.networks import CeVAE
    from pipeline.scoring import PAPER

    entries, transform, options = load_datalist(tiny_demo, "training")[:2], brain_volume_transform(), {"paper": PAPER}
    network, loss = CeVAE(channels=[8, 16, 32, 64], z_dim=16).eval(), CeVAELoss(sigma=0.1)
    model, volumes = AnomalyMap(network, loss, options), [transform(dict(e)) for e in entries]
    brain_maps = healthy_brain_maps(model, volumes, options)
    thresholds = healthy_thresholds(brain_maps)["thresholds"]
    got = synthetic_lesion_search(model, volumes, options, thresholds, 0.99, 2, brain_maps, seed=4)
    assert got["n_volumes"] == 4 and set(got["dice"]["paper"]) == {"rec", "kl_grad", "combined", "intensity"}
    table = {(c["score"], c["quantile"], c["min_component_size"]): c["dice"] for c in got["candidates"]}
    assert len(table) == 4 * 5 * 4, "every score x healthy quantile x minimum component size"
    lesion = SyntheticLesion().set_random_state(4)
    lesioned = []
    for i, data in enumerate(volumes):
        for _ in range(2):
            image, mask, _ = lesion(data["image"], data["brainmask"], volumes[(i + 1) % 2]["image"])
            lesioned.append((np.asarray(image[0]), np.asarray(data["brainmask"][0]) > 0, np.asarray(mask[0]) > 0))

    def reference(quantile: str, min_size: int) -> float:
        level = thresholds["paper"]["intensity"][quantile]
        found = [remove_small_components((image >= level) & brain, min_size).ravel() for image, brain, _ in lesioned]
        return f1_score(np.concatenate([t.ravel() for _, _, t in lesioned]), np.concatenate(found))

    for quantile, min_size in (("0.99", 0), ("0.99", 27), ("0.95", 125)):
        expected = reference(quantile, min_size)
        assert table["intensity", float(quantile), min_size] == pytest.approx(expected, rel=1e-9)
        assert 0 < expected < 1
    assert table["intensity", 0.999, 0] != table["intensity", 0.99, 0], "another quantile, another figure"
    assert table["intensity", 0.95, 125] != table["intensity", 0.95, 0], "another minimum size, another figure"
    assert got["dice"]["paper"]["intensity"] == table["intensity", 0.99, 0], "the option set's own size at 0.99"
    point, selection = got["operating_point"], got["selection"]
    model = [c for c in got["candidates"] if c["score"] in MODEL_SCORES]
    assert selection["best"]["dice"] == max(c["dice"] for c in model) and point["score"] != "intensity"
    tolerance = selection["standard_errors"][f"{point['option_set']}/{point['score']}"]
    assert point["synthetic_dice"] >= selection["best"]["dice"] - tolerance
    best_map = f"{selection['best']['option_set']}/{selection['best']['score']}"
    assert selection["standard_errors"][best_map] == 0 and max(selection["standard_errors"].values()) > 0
    assert point["threshold"] == thresholds["paper"][point["score"]][f"{point['quantile']:g}"]
