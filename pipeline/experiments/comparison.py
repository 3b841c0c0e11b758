"""The comparison of a sweep, read back from MLflow: the finished child runs of one parent run grouped by variant,
their evaluation metrics as mean +- std over seeds (``comparison.md``, ``comparison.csv``) and the figures
(``roc.png``, ``bars.png``). Rebuilt from the tracking server alone (``scripts/compare.py --from-mlflow``)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = ["NO_OVERLAY", "Comparison", "variant_label"]

NO_OVERLAY = "none"
CI_ENDS = ("lo", "hi")
CI_SUFFIXES = tuple(f"_ci95_{end}" for end in CI_ENDS)
HEADLINE = [  # (row label, metric path below "<test set>/", the metric whose ci95 interval goes beside it)
    ("slice AUROC (ELBO)", "{c}/slice_auroc/elbo", None),
    ("pixel AUROC rec", "{c}/pixel_auroc/rec", "pixel_auroc"),
    ("pixel AUROC kl_grad", "{c}/pixel_auroc/kl_grad", "pixel_auroc"),
    ("pixel AUROC combined", "{c}/pixel_auroc/combined", "pixel_auroc"),
    ("pixel AUROC intensity", "{c}/pixel_auroc/intensity", "pixel_auroc"),
    ("pixel AUPRC rec", "{c}/pixel_auprc/rec", "pixel_auprc"),
    ("pixel AUPRC combined", "{c}/pixel_auprc/combined", "pixel_auprc"),
    ("pixel AUPRC intensity", "{c}/pixel_auprc/intensity", "pixel_auprc"),
    ("lesion prevalence (AUPRC of a random score)", "prevalence", None),
    ("Dice 20/80 combined", "{c}/dice_split/combined", "dice_split"),
    ("Dice 20/80 intensity", "{c}/dice_split/intensity", "dice_split"),
    ("Dice of the whole brain, 80 % subjects", "dice_whole_brain_reported", None),
    ("Dice at healthy q0.99 combined (no labels)", "{c}/dice_healthy_q0.99/combined", "dice_healthy"),
    ("Dice at healthy q0.99 intensity (no labels)", "{c}/dice_healthy_q0.99/intensity", "dice_healthy"),
    (
        "same threshold, synthetic lesions in healthy validation, combined",
        "{c}/synthetic_dice_healthy_q0.99/combined",
        None,
    ),
    ("Dice of the whole brain, all subjects", "dice_whole_brain_all", None),
    ("inference default: label-free operating point, Dice (no labels)", "operating_point/dice", None),
    ("same operating point, synthetic lesions in healthy validation", "operating_point/synthetic_dice", None),
    ("lesions found at the operating point", "operating_point/recall", None),
    ("false-positive components per volume, same", "operating_point/fp_per_volume", None),
    ("lesions found at healthy q0.99 combined", "{c}/lesion_recall_healthy/combined", None),
    ("false-positive components per volume, same", "{c}/lesion_fp_per_volume_healthy/combined", None),
    ("best Dice combined (upper bound)", "{c}/dice_best/combined", None),
    ("best Dice intensity (upper bound)", "{c}/dice_best/intensity", None),
]
COLLAPSE = [
    ("KL 0.95-quantile", "kl_q95"),
    ("KL 0.95-quantile per latent dimension", "kl_q95_per_dim"),
    ("active latent units", "active_units"),
]
BARS = [
    "slice_auroc/elbo",
    "pixel_auroc/combined",
    "pixel_auprc/combined",
    "dice_split/combined",
    "dice_healthy_q0.99/combined",
]


def variant_label(ce_weight: float, overlay: str = NO_OVERLAY) -> str:
    label = "VAE (λ=0)" if ce_weight == 0 else f"ceVAE (λ={ce_weight:g})"
    return label if overlay == NO_OVERLAY else f"{label} + {overlay}"


def finite(values: list[float] | None) -> list[float]:
    """The finite values (an evaluation logs NaN where a metric is undefined, e.g. an interval from one subject)."""
    return [v for v in values or [] if np.isfinite(v)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


class Comparison:
    """The finished child runs of one parent run, grouped by variant (CE weight), with their evaluation metrics.

    ``values[variant][metric]`` lists one value per seed, in seed order; metric names are the evaluation's
    ``<test set>/<option set>/<metric>/<score>`` and ``<test set>/kl_q95`` / ``<test set>/active_units``.
    """

    def __init__(self, client, parent_id: str) -> None:
        self.client, self.parent_id = client, parent_id
        parent = client.get_run(parent_id)
        runs = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=10000
        )
        runs = [r for r in runs if r.info.status == "FINISHED"]
        if not runs:
            raise LookupError(f"parent run {parent_id} has no finished child runs")

        def overlay(run) -> str:
            return run.data.params.get("overlay_name", NO_OVERLAY)

        runs.sort(
            key=lambda r: (
                overlay(r) != NO_OVERLAY,
                overlay(r),
                float(r.data.params["ce_weight"]),
                int(r.data.params["seed"]),
            )
        )
        self.variants: dict[str, list[Run]] = defaultdict(list)
        for run in runs:
            self.variants[variant_label(float(run.data.params["ce_weight"]), overlay(run))].append(run)
        self.values = {v: defaultdict(list) for v in self.variants}
        for variant, members in self.variants.items():
            for run in members:
                for key, value in run.data.metrics.items():
                    if "/" in key:
                        self.values[variant][key].append(value)
        keys = {k for v in self.values.values() for k in v}
        self.sets = (
            sorted(json.loads(parent.data.params["test_sets"]))
            if "test_sets" in parent.data.params
            else sorted({k.split("/")[0] for k in keys if not k.startswith("healthy_")})
        )
        self.configs = sorted(
            {k.split("/")[1] for k in keys if k.count("/") == 3 and k.split("/")[0] in self.sets},
            key=lambda c: (c != "paper", c),
        )
        self.metrics = sorted(keys)

    def group_rows(self, test_set: str) -> list[tuple[str, str, str | None]]:
        """Headline rows of the label groups evaluated on ``test_set`` (``pixel_auroc_<group>``, see evaluation)."""
        groups = sorted(
            {
                k.split("/")[2][len("pixel_auroc_") :]
                for k in self.metrics
                if k.startswith(f"{test_set}/")
                and k.count("/") == 3
                and k.split("/")[2].startswith("pixel_auroc_")
                and not k.split("/")[2].endswith(CI_SUFFIXES)
            }
        )
        return [
            (f"pixel AUROC {score}, {group} vs healthy", f"{{c}}/pixel_auroc_{group}/{score}", None)
            for group in groups
            for score in ("rec", "combined", "intensity")
        ]

    def seeds(self, variant: str) -> list[str]:
        return [r.data.params["seed"] for r in self.variants[variant]]

    def cell(self, variant: str, key: str, digits: int = 3, ci_metric: str | None = None) -> str:
        """``mean ± std`` over seeds; with ``ci_metric``, the seeds' mean 95 % bootstrap interval ``[lo, hi]`` beside
        it (the interval over test subjects that each evaluation logs as ``<ci_metric>_ci95_lo/hi``)."""
        values = finite(self.values[variant].get(key))
        if not values:
            return "–"
        mean, std = mean_std(values)
        text = f"{mean:.{digits}f} ± {std:.{digits}f}"
        if ci_metric is not None:
            test_set, config, _, score = key.split("/")
            bounds = [
                finite(self.values[variant].get(f"{test_set}/{config}/{ci_metric}_ci95_{end}/{score}"))
                for end in CI_ENDS
            ]
            if all(bounds):
                text += " [" + ", ".join(f"{np.mean(b):.{digits}f}" for b in bounds) + "]"
        return text

    def markdown(self) -> str:
        variants = list(self.variants)
        seeds = "; ".join(f"{v}: seeds {', '.join(self.seeds(v))}" for v in variants)
        lines = [
            f"# VAE vs ceVAE: MLflow parent run `{self.parent_id}`",
            "",
            f"Mean ± std (sample std) over seeds ({seeds}); in brackets the seeds' mean 95 % bootstrap interval "
            "over test subjects. Pixel metrics pool the brain voxels of all test subjects; Dice 20/80: threshold "
            "picked on 20 % of the test subjects, Dice on the other 80 %; Dice at healthy q0.99: threshold at the "
            "0.99 quantile of the healthy validation subjects' maps (no labels; inference's default).",
            "",
        ]
        head = "| metric | " + " | ".join(variants) + " |\n|---" + "|---" * len(variants) + "|"
        for test_set in self.sets:
            for config in self.configs:
                lines += [f"## test set `{test_set}`, option set `{config}`", "", head]
                for label, path, ci_metric in HEADLINE + self.group_rows(test_set):
                    key = f"{test_set}/{path.format(c=config)}"
                    lines.append(
                        f"| {label} | " + " | ".join(self.cell(v, key, ci_metric=ci_metric) for v in variants) + " |"
                    )
                for label, path in COLLAPSE:
                    lines.append(
                        f"| {label} | " + " | ".join(self.cell(v, f"{test_set}/{path}", 2) for v in variants) + " |"
                    )
                lines.append("")
        lines += ["## every metric", "", head.replace("| metric |", "| metric (test set/option set/metric/score) |")]
        lines += [f"| {key} | " + " | ".join(self.cell(v, key) for v in variants) + " |" for key in self.metrics]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["variant", "ce_weight", "metric", "mean", "std", "n", "seeds", "values"])
        for variant, members in self.variants.items():
            for key in self.metrics:
                values = finite(self.values[variant].get(key))
                if values:
                    mean, std = mean_std(values)
                    writer.writerow(
                        [
                            variant,
                            members[0].data.params["ce_weight"],
                            key,
                            f"{mean:.6g}",
                            f"{std:.6g}",
                            len(values),
                            " ".join(self.seeds(variant)),
                            " ".join(f"{v:.6g}" for v in values),
                        ]
                    )
        return buffer.getvalue()

    def best_runs(self, primary: str) -> dict[str, Run]:
        """Per variant, the child run with the highest ``primary`` metric."""
        return {v: max(runs, key=lambda r: r.data.metrics.get(primary, -np.inf)) for v, runs in self.variants.items()}

    def plot_roc(self, path: Path, primary: str) -> None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        best = self.best_runs(primary)
        fig, axes = plt.subplots(
            len(self.sets), len(self.configs), figsize=(5 * len(self.configs), 4.5 * len(self.sets)), squeeze=False
        )
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with tempfile.TemporaryDirectory() as tmp:
            for row, test_set in enumerate(self.sets):
                for variant, run in best.items():
                    local = self.client.download_artifacts(run.info.run_id, f"evaluation/{test_set}/curves.json", tmp)
                    curves = json.loads(Path(local).read_text())
                    for col, config in enumerate(self.configs):
                        entry = curves[config]["combined"]
                        axes[row, col].plot(
                            curves["fpr"],
                            entry["tpr"],
                            label=f"{variant}, seed " f"{run.data.params['seed']} (AUROC {entry['auroc']:.3f})",
                        )
                for col, config in enumerate(self.configs):
                    entry = curves[config]["intensity"]
                    axes[row, col].plot(
                        curves["fpr"],
                        entry["tpr"],
                        "k--",
                        lw=1,
                        label=f"intensity baseline (AUROC {entry['auroc']:.3f})",
                    )
                    axes[row, col].set(
                        title=f"{test_set}, {config}: combined score",
                        xlabel="false positive rate",
                        ylabel="true positive rate",
                    )
                    axes[row, col].legend(fontsize=7)
        fig.suptitle(f"pixel ROC, best seed per variant by {primary}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def plot_bars(self, path: Path) -> None:
        """One row per (test set, option set), one column per metric of :data:`BARS`: a bar per variant (mean over
        seeds) with its seeds as dots; the variants' colours in one legend above."""
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        rows = [(s, c) for s in self.sets for c in self.configs]
        height = 2.4 * len(rows) + 0.7
        fig, axes = plt.subplots(len(rows), len(BARS), figsize=(2.9 * len(BARS), height), squeeze=False)
        for r, (test_set, config) in enumerate(rows):
            for c, metric in enumerate(BARS):
                ax = axes[r, c]
                for i, variant in enumerate(self.variants):
                    values = finite(self.values[variant].get(f"{test_set}/{config}/{metric}"))
                    if values:
                        ax.bar(i, np.mean(values), color=f"C{i}", alpha=0.6)
                        ax.plot(np.full(len(values), i), values, "k.", ms=5)
                ax.set_xticks([])
                ax.set_ylim(bottom=0)
                ax.tick_params(labelsize=8)
                if r == 0:
                    ax.set_title(metric.replace("/", "\n"), fontsize=9)
                if c == 0:
                    ax.set_ylabel(f"{test_set}\n{config}", fontsize=9)
        legend = [Patch(color=f"C{i}", alpha=0.6, label=v) for i, v in enumerate(self.variants)]
        fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self, out: Path, primary: str) -> list[Path]:
        from pipeline.io import atomic_path, atomic_write_text

        files = [out / "comparison.md", out / "comparison.csv", out / "roc.png", out / "bars.png"]
        atomic_write_text(self.markdown(), files[0])
        atomic_write_text(self.csv(), files[1])
        for plot, path in ((lambda p: self.plot_roc(p, primary), files[2]), (self.plot_bars, files[3])):
            with atomic_path(path, ".png") as tmp:
                plot(tmp)
        for path in files:
            self.client.log_artifact(self.parent_id, str(path), artifact_path="comparison")
        return files
