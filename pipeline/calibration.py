"""The label-free calibration of a trained model (:class:`LabelFreeCalibration`) and its operating point
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
operating point follows the one-standard-error rule (Breiman et al. 1984; Hastie et al., The Elements of Statistical
Learning, 7.10) in its paired form: a map (option set and score) stays in the running if its best candidate's Dice
falls short of the best candidate's by no more than the standard error of that difference (bootstrap over the
synthetic volumes); of those maps the simplest is chosen, at its best candidate. Why: the candidates are many and
the synthetic volumes few, so the top of the table is partly noise (on the IXI T1 models of docs/benchmarks.md the
best ``combined`` and ``rec`` maps of one option set lay within 0.01-0.04 of each other and swapped places from seed
to seed), and a map with fewer ingredients is the safer bet when the data cannot tell them apart. Paired, because
every candidate segments the same lesions: the standard error of the best Dice's level (the unpaired rule) would
also discard a map that is better on every one of them. Simpler means: the score with fewer ingredients first
(``rec``, then ``kl_grad``, then ``combined``, the product of both), then the option set configured first (each of
``paper``, ``authors``, ``postprocessed``, ``normative`` adds processing to the one before). Within a map, ties go to
the higher quantile (fewer false positives on healthy brains), then to the smaller component size. The
``intensity`` baseline is measured the same way and reported beside it, never chosen: the operating point is a
choice among the model's maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.synthetic_lesions import LESION_KINDS, SyntheticLesion
from pipeline.healthy import (
    HEALTHY_QUANTILES,
    fit_grad_normalization,
    fit_normative,
    healthy_brain_maps,
    healthy_thresholds,
)
from pipeline.metrics import CONNECTIVITY, bounding_box
from pipeline.operating_point import DEFAULT_QUANTILE, OperatingPoint
from pipeline.scoring import SCORE_NAMES, ScoreOptions, Unchanged, on_volume
from pipeline.thresholds import quantile_key

__all__ = [
    "MIN_COMPONENT_SIZES",
    "MODEL_SCORES",
    "SYNTHETIC_VOLUMES",
    "LabelFreeCalibration",
    "choose_operating_point",
    "component_size_dice_counts",
    "synthetic_lesion_search",
]

# 0: none removed; 7: Baur et al. 2021; 27 and 125: a cube of 3 and of 5 voxels (a lesion below ~3 mm across at the
# 64-pixel grid of a ~190 mm brain box cannot be told from noise, one of ~15 mm can)
MIN_COMPONENT_SIZES = (0, 7, 27, 125)
MODEL_SCORES = tuple(s for s in SCORE_NAMES if s != "intensity")
SYNTHETIC_VOLUMES = 32  # lesioned healthy volumes the operating point is chosen on (LabelFreeCalibration)
SELECTION_BOOTSTRAP = 1000  # volume resamples for the standard errors of the one-standard-error rule


def component_size_dice_counts(
    volume: np.ndarray, brain: np.ndarray, truth: np.ndarray, threshold: float, min_sizes: Sequence[int]
) -> np.ndarray:
    """``(len(min_sizes), 2)`` counts ``[2 |S & T|, |S| + |T|]`` of the segmentation ``S`` = ``volume >= threshold``
    inside ``brain`` with 3D components under each minimum size removed (as :func:`pipeline.scoring.segment`), against
    ``truth`` ``T``; one labelling serves every size."""
    found = (volume >= threshold) & brain
    box = bounding_box(found)
    labels, n = ndimage.label(found[box], structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    hits = np.bincount(labels[truth[box]].ravel(), minlength=n + 1)  # lesion voxels in each component
    counts = np.zeros((len(min_sizes), 2), dtype=np.int64)
    for i, size in enumerate(min_sizes):
        keep = sizes >= max(int(size), 1)
        keep[0] = False
        counts[i] = 2 * hits[keep].sum(), sizes[keep].sum() + truth.sum()
    return counts


def _dice(counts: np.ndarray) -> float:
    return float(counts[0] / counts[1]) if counts[1] else 1.0


def _eligible(candidates: Sequence[Mapping], option_sets: Mapping[str, ScoreOptions]) -> list[Mapping]:
    """The candidates of the model's maps whose scale does not come from the scored volume."""
    return [
        c
        for c in candidates
        if c["score"] in MODEL_SCORES and (c["score"] == "rec" or not option_sets[c["option_set"]].test_volume_scaled)
    ]


def _best_of(rows: Sequence[Mapping]) -> Mapping:
    """The highest Dice; ties to the higher quantile, then to the smaller minimum component size."""
    return max(rows, key=lambda c: (c["dice"], c["quantile"], -c["min_component_size"]))


def _map_bests(eligible: Sequence[Mapping]) -> dict[tuple[str, str], Mapping]:
    """The best candidate of every map ``(option set, score)``."""
    maps = {(c["option_set"], c["score"]) for c in eligible}
    return {m: _best_of([c for c in eligible if (c["option_set"], c["score"]) == m]) for m in sorted(maps)}


def choose_operating_point(
    candidates: Sequence[Mapping],
    option_sets: Mapping[str, ScoreOptions],
    tolerance: Mapping[tuple[str, str], float] | None = None,
) -> OperatingPoint:
    """The operating point among the candidates (rows of :func:`synthetic_lesion_search`'s table) of the model's maps
    whose scale does not come from the scored volume: the simplest map ``(option set, score)`` whose best Dice falls
    short of the best candidate's by no more than ``tolerance[map]`` (the standard error of that difference), at
    that map's best candidate (the module docstring; no ``tolerance``: the best candidate)."""
    eligible = _eligible(candidates, option_sets)
    if not eligible:
        raise ValueError("no candidate operating point: the option sets hold no map of the model.")
    best = _best_of(eligible)
    order = list(option_sets)
    bests = _map_bests(eligible)
    reaching = [
        m
        for m, row in bests.items()
        if m == (best["option_set"], best["score"]) or best["dice"] - row["dice"] <= (tolerance or {}).get(m, 0.0)
    ]
    chosen = bests[min(reaching, key=lambda m: (MODEL_SCORES.index(m[1]), order.index(m[0])))]
    return OperatingPoint(
        chosen["option_set"],
        chosen["score"],
        chosen["quantile"],
        chosen["threshold"],
        chosen["min_component_size"],
        chosen["dice"],
    )


def paired_standard_error(
    first: np.ndarray, second: np.ndarray, seed: int, n_bootstrap: int = SELECTION_BOOTSTRAP
) -> float:
    """Standard error of ``Dice(first) - Dice(second)``, both pooled Dice of per-volume counts ``(n_volumes, 2)`` of
    the same volumes, over resamples of the volumes (the same resample for both: a paired bootstrap)."""
    if len(first) < 2:
        return 0.0
    draws = np.random.default_rng(seed).integers(0, len(first), (n_bootstrap, len(first)))

    def dice(counts: np.ndarray) -> np.ndarray:
        pooled = counts[draws].sum(axis=1)
        return pooled[:, 0] / np.maximum(pooled[:, 1], 1)

    return float(np.std(dice(first) - dice(second), ddof=1))


def synthetic_lesion_search(
    model: AnomalyMap,
    volumes: Sequence[Mapping],
    option_sets: Mapping[str, ScoreOptions],
    thresholds: Mapping[str, Mapping[str, Mapping[str, float]]],
    default_quantile: float,
    per_subject: int,
    brain_maps: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
    min_sizes: Sequence[int] = MIN_COMPONENT_SIZES,
    seed: int = 0,
    held_out: Sequence[Mapping[str, ScoreOptions]] | None = None,
) -> dict:
    """Measure every candidate (the module docstring) on synthetic lesions in the healthy ``volumes`` (preprocessed by
    the training's volume chain; seeded; lesion kinds drawn uniformly, ``foreign`` patches from the next subject, so
    not with one subject). ``thresholds[option set][score][quantile key]`` as
    :func:`pipeline.healthy.healthy_thresholds` returns them; volume ``i`` is scored with ``held_out[i]`` if given
    (its normative reference fitted without it, :func:`pipeline.healthy.fit_normative`), else with ``option_sets``;
    ``brain_maps[i]``: its healthy maps so scored (:func:`pipeline.healthy.healthy_brain_maps`), of which a lesioned
    copy recomputes only the slices the lesion changes.

    Returns the ``synthetic`` section of ``threshold.json``: ``seed``, ``n_volumes``, ``kinds``,
    ``min_component_sizes``, ``candidates`` (one row per candidate, intensity included), ``operating_point``
    (:class:`OperatingPoint` as a dict), ``selection`` (the best candidate and, per map, the paired standard error
    of its difference to it: the rule's tolerances), and ``quantile`` with ``dice[option set][score]``: the Dice at
    ``default_quantile`` with each option set's own minimum component size."""
    kinds = LESION_KINDS if len(volumes) > 1 else tuple(k for k in LESION_KINDS if k != "foreign")
    lesion = SyntheticLesion(kinds=kinds).set_random_state(seed)
    sizes = sorted({*map(int, min_sizes), *(o.min_component_size for o in option_sets.values())})
    keys = [(c, s, q) for c in option_sets for s in SCORE_NAMES for q in thresholds[c][s]]
    per_volume: dict[tuple, list[np.ndarray]] = {key: [] for key in keys}  # (sizes, 2) counts per lesioned volume
    for i, data in enumerate(volumes):
        brain = np.asarray(data["brainmask"][0] > 0)
        sets = option_sets if held_out is None else held_out[i]
        healthy = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        healthy_maps = {  # a lesion changes a few slices: the rest is filtered once
            config: {score: on_volume(values, brain) for score, values in per.items()}
            for config, per in brain_maps[i].items()
        }
        for _ in range(per_subject):
            lesioned, mask, _ = lesion(data["image"], data["brainmask"], volumes[(i + 1) % len(volumes)]["image"])
            truth = np.asarray(mask[0]) > 0
            image = lesioned.as_tensor() if hasattr(lesioned, "as_tensor") else lesioned
            changed = np.flatnonzero((image != healthy).reshape(-1, image.shape[-1]).any(0).numpy())
            span = (int(changed[0]), int(changed[-1]) + 1) if changed.size else (0, 0)
            _, maps = model(image, brain, sets, unchanged=Unchanged(healthy_maps, *span))
            for config, score, q in keys:
                threshold = thresholds[config][score][q]
                per_volume[config, score, q].append(
                    component_size_dice_counts(maps[config][score], brain, truth, threshold, sizes)
                )
    stacked = {key: np.stack(parts) for key, parts in per_volume.items()}  # (volumes, sizes, 2)
    counts = {key: parts.sum(axis=0) for key, parts in stacked.items()}
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

    def volume_counts(row: Mapping) -> np.ndarray:
        return stacked[row["option_set"], row["score"], quantile_key(row["quantile"])][
            :, sizes.index(row["min_component_size"])
        ]

    eligible = _eligible(candidates, option_sets)
    best = _best_of(eligible)
    tolerance = {
        m: paired_standard_error(volume_counts(best), volume_counts(row), seed)
        for m, row in _map_bests(eligible).items()
    }
    return {
        "seed": int(seed),
        "n_volumes": len(volumes) * per_subject,
        "kinds": list(kinds),
        "min_component_sizes": sizes,
        "candidates": candidates,
        "operating_point": choose_operating_point(candidates, option_sets, tolerance).to_dict(),
        "selection": {
            "rule": "the simplest map whose best Dice is within one paired standard error of the best candidate's",
            "best": {k: best[k] for k in ("option_set", "score", "quantile", "min_component_size", "dice")},
            "standard_errors": {f"{c}/{score}": se for (c, score), se in tolerance.items()},
            "bootstrap": SELECTION_BOOTSTRAP,
        },
        "quantile": float(default_quantile),
        "dice": {c: {s: _dice(counts[c, s, default][own[c]]) for s in SCORE_NAMES} for c in option_sets},
    }


@dataclass(frozen=True)
class LabelFreeCalibration:
    """How a trained model is calibrated on its healthy validation volumes, with no label anywhere.

    ``calibration(model, entries, transform)`` fits the model's option sets (without any constants they held) to
    the healthy volumes (:func:`pipeline.healthy.fit_grad_normalization`, :func:`pipeline.healthy.fit_normative`),
    then computes for them the ``healthy`` section of ``threshold.json``: the healthy thresholds
    (:func:`pipeline.healthy.healthy_thresholds`) and, under ``synthetic``, the candidates and the operating point
    chosen on synthetic lesions (:func:`synthetic_lesion_search`), each volume's normative maps taken against the
    reference of the others. Returns ``(healthy, fitted option sets)``.

    Args:
        quantiles: the healthy brain-voxel quantiles whose thresholds are computed (candidates of the operating point).
        synthetic_volumes: at least this many lesioned volumes for the operating point: each healthy volume gets
            ``ceil(synthetic_volumes / n_volumes)`` lesions. The default, 32, comes from healthy data only: on the IXI
            T1 models of docs/benchmarks.md (4 healthy validation subjects), 8 lesioned volumes left the best
            candidates within 0.015 Dice of each other; 4x the volumes halve the standard errors, for about a minute
            of calibration at 64 pixels on 2 CPU cores.
        seed: the synthetic lesions' seed.
    """

    quantiles: Sequence[float] = HEALTHY_QUANTILES
    synthetic_volumes: int = SYNTHETIC_VOLUMES
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        if not self.quantiles or not all(0 < q < 1 for q in self.quantiles):
            raise ValueError(f"healthy quantiles must lie in (0, 1), got {list(self.quantiles)}.")
        if int(self.synthetic_volumes) < 1:
            raise ValueError(f"synthetic_volumes must be at least 1, got {self.synthetic_volumes}.")

    def __call__(
        self, model: AnomalyMap, entries: Sequence[dict], transform: Callable
    ) -> tuple[dict, dict[str, ScoreOptions]]:
        volumes = [transform(dict(entry)) for entry in entries]  # preprocessed once for the four passes
        option_sets = {name: options.unfitted() for name, options in model.option_sets.items()}
        fitted, held_out = fit_normative(model, volumes, fit_grad_normalization(model, volumes, option_sets))
        brain_maps = healthy_brain_maps(model, volumes, fitted, held_out)  # each healthy volume scored once
        healthy = healthy_thresholds(brain_maps, self.quantiles)
        healthy["subjects"] = [str(e["image"]) for e in entries]
        default = DEFAULT_QUANTILE if DEFAULT_QUANTILE in self.quantiles else self.quantiles[-1]
        per_subject = -(-int(self.synthetic_volumes) // len(volumes))
        healthy["synthetic"] = synthetic_lesion_search(
            model,
            volumes,
            fitted,
            healthy["thresholds"],
            default,
            per_subject,
            brain_maps,
            seed=self.seed,
            held_out=held_out,
        )
        return healthy, fitted
