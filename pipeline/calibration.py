"""The label-free calibration of a trained model (:func:`label_free_calibration`) and its operating point
(:class:`pipeline.operating_point.OperatingPoint`): the map, threshold and minimum lesion size that segment lesions
best, chosen on synthetic lesions inserted into the healthy validation volumes. No lesion label of any data set is
used.

:func:`synthetic_lesion_search` inserts ``per_subject`` synthetic lesions (:mod:`pipeline.data.synthetic_lesions`)
into each healthy validation volume, scores each lesioned volume once and measures every candidate on it:

* every option set of the model and every **model** score (``rec``, ``kl_grad``, ``combined``), except the
  ``kl_grad`` and ``combined`` maps of option sets that scale them by the scored volume itself
  (:attr:`pipeline.scoring.ScoreOptions.test_volume_scaled`): a healthy-data threshold does not mean the same on
  them from one scan to the next;
* every healthy quantile's threshold (:func:`pipeline.healthy.healthy_thresholds`: its false-positive rate on
  healthy brain voxels is known);
* every minimum connected-component size of :data:`MIN_COMPONENT_SIZES` (voxels of the 64-pixel grid, 26-connected).

A candidate's figure is its Dice pooled over all synthetic volumes (``sum 2|S & T| / sum (|S| + |T|)``). The
operating point is the candidate with the highest Dice; ties go to the higher quantile (fewer false positives on
healthy brains), then to the smaller component size. The ``intensity`` baseline is measured the same way and
reported beside it, never chosen: the operating point is a choice among the model's maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.synthetic_lesions import LESION_KINDS, SyntheticLesion
from pipeline.healthy import DEFAULT_QUANTILE, HEALTHY_QUANTILES, fit_grad_normalization, healthy_thresholds
from pipeline.metrics import CONNECTIVITY
from pipeline.operating_point import OperatingPoint
from pipeline.scoring import SCORE_NAMES, ScoreOptions
from pipeline.thresholds import quantile_key

__all__ = [
    "MIN_COMPONENT_SIZES",
    "MODEL_SCORES",
    "SYNTHETIC_PER_SUBJECT",
    "choose_operating_point",
    "component_size_dice_counts",
    "label_free_calibration",
    "synthetic_lesion_search",
]

# 0: none removed; 7: Baur et al. 2021; 27 and 125: a cube of 3 and of 5 voxels (a lesion below ~3 mm across at the
# 64-pixel grid of a ~190 mm brain box cannot be told from noise, one of ~15 mm can)
MIN_COMPONENT_SIZES = (0, 7, 27, 125)
MODEL_SCORES = tuple(s for s in SCORE_NAMES if s != "intensity")
SYNTHETIC_PER_SUBJECT = 2  # synthetic lesions per healthy validation volume (each volume scored once per lesion)


def component_size_dice_counts(
    volume: np.ndarray, brain: np.ndarray, truth: np.ndarray, threshold: float, min_sizes: Sequence[int]
) -> np.ndarray:
    """``(len(min_sizes), 2)`` counts ``[2 |S & T|, |S| + |T|]`` of the segmentation ``S`` = ``volume >= threshold``
    inside ``brain`` with 3D components under each minimum size removed (as :func:`pipeline.scoring.segment`), against
    ``truth`` ``T``; one labelling serves every size."""
    found = (volume >= threshold) & brain
    labels, n = ndimage.label(found, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    hits = np.bincount(labels[truth].ravel(), minlength=n + 1)  # lesion voxels in each component
    counts = np.zeros((len(min_sizes), 2), dtype=np.int64)
    for i, size in enumerate(min_sizes):
        keep = sizes >= max(int(size), 1)
        keep[0] = False
        counts[i] = 2 * hits[keep].sum(), sizes[keep].sum() + truth.sum()
    return counts


def _dice(counts: np.ndarray) -> float:
    return float(counts[0] / counts[1]) if counts[1] else 1.0


def choose_operating_point(candidates: Sequence[Mapping], option_sets: Mapping[str, ScoreOptions]) -> OperatingPoint:
    """The candidate (rows of :func:`synthetic_lesion_search`'s table) with the highest Dice among the model's maps
    whose scale does not come from the scored volume (the module docstring); ties go to the higher quantile, then to
    the smaller minimum component size."""
    eligible = [
        c
        for c in candidates
        if c["score"] in MODEL_SCORES and (c["score"] == "rec" or not option_sets[c["option_set"]].test_volume_scaled)
    ]
    if not eligible:
        raise ValueError("no candidate operating point: the option sets hold no map of the model.")
    best = max(eligible, key=lambda c: (c["dice"], c["quantile"], -c["min_component_size"]))
    return OperatingPoint(
        best["option_set"], best["score"], best["quantile"], best["threshold"], best["min_component_size"], best["dice"]
    )


def synthetic_lesion_search(
    model: AnomalyMap,
    volumes: Sequence[Mapping],
    option_sets: Mapping[str, ScoreOptions],
    thresholds: Mapping[str, Mapping[str, Mapping[str, float]]],
    default_quantile: float,
    per_subject: int = SYNTHETIC_PER_SUBJECT,
    min_sizes: Sequence[int] = MIN_COMPONENT_SIZES,
    seed: int = 0,
) -> dict:
    """Measure every candidate (the module docstring) on synthetic lesions in the healthy ``volumes`` (preprocessed by
    the training's volume chain; seeded; lesion kinds drawn uniformly, ``foreign`` patches from the next subject, so
    not with one subject). ``thresholds[option set][score][quantile key]`` as
    :func:`pipeline.healthy.healthy_thresholds` returns them.

    Returns the ``synthetic`` section of ``threshold.json``: ``seed``, ``n_volumes``, ``kinds``,
    ``min_component_sizes``, ``candidates`` (one row per candidate, intensity included), ``operating_point``
    (:class:`OperatingPoint` as a dict), and ``quantile`` with ``dice[option set][score]``: the Dice at
    ``default_quantile`` with each option set's own minimum component size."""
    kinds = LESION_KINDS if len(volumes) > 1 else tuple(k for k in LESION_KINDS if k != "foreign")
    lesion = SyntheticLesion(kinds=kinds).set_random_state(seed)
    sizes = sorted({*map(int, min_sizes), *(o.min_component_size for o in option_sets.values())})
    counts = {
        (c, s, q): np.zeros((len(sizes), 2), dtype=np.int64)
        for c in option_sets
        for s in SCORE_NAMES
        for q in thresholds[c][s]
    }
    for i, data in enumerate(volumes):
        brain = np.asarray(data["brainmask"][0] > 0)
        for _ in range(per_subject):
            lesioned, mask, _ = lesion(data["image"], data["brainmask"], volumes[(i + 1) % len(volumes)]["image"])
            truth = np.asarray(mask[0]) > 0
            image = lesioned.as_tensor() if hasattr(lesioned, "as_tensor") else lesioned
            _, maps = model(image, brain, option_sets)
            for config, score, q in counts:
                threshold = thresholds[config][score][q]
                counts[config, score, q] += component_size_dice_counts(
                    maps[config][score], brain, truth, threshold, sizes
                )
    candidates = [
        {
            "option_set": config,
            "score": score,
            "quantile": float(q),
            "threshold": float(thresholds[config][score][q]),
            "min_component_size": size,
            "dice": _dice(counted[j]),
        }
        for (config, score, q), counted in counts.items()
        for j, size in enumerate(sizes)
    ]
    default = quantile_key(default_quantile)
    own = {c: sizes.index(o.min_component_size) for c, o in option_sets.items()}
    return {
        "seed": int(seed),
        "n_volumes": len(volumes) * per_subject,
        "kinds": list(kinds),
        "min_component_sizes": sizes,
        "candidates": candidates,
        "operating_point": choose_operating_point(candidates, option_sets).to_dict(),
        "quantile": float(default_quantile),
        "dice": {c: {s: _dice(counts[c, s, default][own[c]]) for s in SCORE_NAMES} for c in option_sets},
    }


def label_free_calibration(
    model: AnomalyMap,
    entries: Sequence[dict],
    transform: Callable,
    quantiles: Sequence[float] = HEALTHY_QUANTILES,
) -> tuple[dict, dict[str, ScoreOptions]]:
    """Everything a trained ``model`` needs from its healthy validation volumes ``entries``, no label anywhere:
    its option sets (without any constants they held) with their healthy normalisation constants
    (:func:`pipeline.healthy.fit_grad_normalization`), then for them the ``healthy`` section of ``threshold.json``:
    the healthy thresholds (:func:`pipeline.healthy.healthy_thresholds`) and, under ``synthetic``, the candidates and
    the operating point chosen on synthetic lesions (:func:`synthetic_lesion_search`). Returns ``(healthy, fitted option sets)``.
    """
    volumes = [transform(dict(entry)) for entry in entries]  # preprocessed once for the three passes
    option_sets = {name: options.unfitted() for name, options in model.option_sets.items()}
    fitted = fit_grad_normalization(model, volumes, option_sets)
    healthy = healthy_thresholds(model, volumes, fitted, quantiles)
    healthy["subjects"] = [str(e["image"]) for e in entries]
    default = DEFAULT_QUANTILE if DEFAULT_QUANTILE in quantiles else quantiles[-1]
    healthy["synthetic"] = synthetic_lesion_search(model, volumes, fitted, healthy["thresholds"], default)
    return healthy, fitted
