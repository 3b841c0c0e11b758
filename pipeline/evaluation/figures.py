"""The evaluation's figures: pixel ROC/PR curves (``roc_pr.png``) and panels of the default segmentation
(``panels.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from pipeline.display import display_window
from pipeline.io import atomic_path
from pipeline.operating_point import OperatingPoint
from pipeline.scoring import ScoreOptions, segment

__all__ = ["plot_curves", "plot_panels"]

MAP_COLOURS = matplotlib.colormaps["magma"].with_extremes(bad="black")  # masked voxels (outside the brain): black


def plot_curves(curves: dict, configs: Sequence[str], path: Path) -> None:
    """``roc_pr.png``: the pixel ROC and PR curves of every option set and score (``curves`` as in ``curves.json``)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(configs), 2, figsize=(10, 4.5 * len(configs)), squeeze=False)
    for row, config in enumerate(configs):
        for score, entry in curves[config].items():
            axes[row, 0].plot(curves["fpr"], entry["tpr"], label=f"{score} (AUROC {entry['auroc']:.3f})")
            axes[row, 1].plot(curves["recall"], entry["precision"], label=f"{score} (AUPRC {entry['auprc']:.3f})")
        axes[row, 0].set(title=f"pixel ROC, {config}", xlabel="false positive rate", ylabel="true positive rate")
        axes[row, 1].set(title=f"pixel PR, {config}", xlabel="recall", ylabel="precision")
        for ax in axes[row]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_panels(
    panels: list, results: dict, configs: Mapping[str, ScoreOptions], default: Mapping[str, str], path: Path
) -> None:
    """Input, reconstruction, ground truth, the maps of the option set that inference uses by default and its
    default segmentation (the label-free operating point, or the library default without one; named in the
    figure)."""
    if not panels:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    point = results.get("operating_point")
    if point is not None:  # what inference does by default: the label-free operating point
        config, score, threshold = point["option_set"], point["score"], point["threshold"]
        options = OperatingPoint.from_dict(point).options(configs[config])
        rule = f"{score} >= healthy q{point['quantile']:g},\ncomponents >= {point['min_component_size']} vox"
        heading = (
            "inference's default: the label-free operating point (chosen on synthetic lesions in the healthy "
            f"validation subjects; no labels)\n{config}/{rule.replace(chr(10), ' ')} (threshold {threshold:.4g}): "
            f"Dice {point['dice']:.3f} on this test set, {point['synthetic_dice']:.3f} on the synthetic lesions"
        )
    else:
        config, score, q = (default[k] for k in ("option_set", "score", "quantile"))
        threshold, options, rule = results["default"]["threshold"], configs[config], f"{score} >= healthy q{q}"
        heading = (
            f"inference's default segmentation: option set {config}, score {score}, threshold {threshold:.4g} "
            f"(healthy quantile {q}, no labels used)"
        )
    columns = [
        "input",
        "reconstruction",
        "ground truth",
        f"{config}: rec",
        f"{config}: kl_grad",
        f"{config}: combined",
        f"segmentation:\n{rule}",
    ]
    fig, axes = plt.subplots(
        len(panels), len(columns), figsize=(2 * len(columns), 2.2 * len(panels) + 0.4), squeeze=False
    )
    for row, (subject, slices, z) in enumerate(panels):
        seg = segment(subject.volume(config, score), subject.brain, threshold, options)[..., z]
        images = [
            slices["image"][z],
            slices["recon"][z],
            subject.label[..., z],
            subject.volume(config, "rec")[..., z],
            subject.volume(config, "kl_grad")[..., z],
            subject.volume(config, "combined")[..., z],
            seg,
        ]
        low, high = display_window(images[0], subject.brain[..., z])  # input and reconstruction on one scale
        outside = ~subject.brain[..., z].astype(bool)
        for col, (title, img) in enumerate(zip(columns, images)):
            ax = axes[row, col]
            is_map = col in (3, 4, 5)
            window = {"vmin": low, "vmax": high} if col < 2 else {}
            img = np.asarray(img, np.float32)
            if is_map:  # scored inside the brain only: the outside black, not 0 on a scale that may go below it
                img = np.ma.masked_where(outside, img)
            shown = ax.imshow(img.T, cmap=MAP_COLOURS if is_map else "gray", origin="lower", **window)
            if is_map:  # the maps' own scales: each subject's map is drawn from its minimum to its maximum
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(f"{subject.name}\nslice {z}", fontsize=8)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
