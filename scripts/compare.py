"""VAE vs ceVAE (or any sweep of the CE weight) over seeds, trained and evaluated through the bundle, compared
from MLflow.

    python scripts/compare.py --seeds 0 1 2 --epochs 15 --output-dir runs/compare       # embedded demo data
    python scripts/compare.py --datalist-train T.json --datalist-test E.json [E2.json ...] --seeds 0 1 2 \\
        --paper --output-dir O --experiment ixi-t1                                         # real data, 60 epochs
    python scripts/compare.py --from-mlflow latest --output-dir O [--tracking-uri URI]     # tables only
    python scripts/compare.py --resume --output-dir O                                      # after a kill or a failure

Every (CE weight, seed) pair is one child run, nested under one parent run: ``python -m monai.bundle run training``
then ``run evaluating`` once per test set, as subprocesses (exactly the commands a user types; their logs go to
``O/runs/<child>/*.log``). The comparison is then read back from MLflow (``MlflowClient.search_runs`` on the
parent's children), so it can be rebuilt later or on another machine that sees the same tracking server:

* ``O/comparison.md`` and ``O/comparison.csv``: mean ± std over seeds of every evaluation metric, per variant, test
  set, option set and score (the CSV in long form, with every seed's value);
* ``O/roc.png``: pixel ROC curves of each variant's best seed (by ``--primary``), per test set and option set;
* ``O/bars.png``: headline metrics per variant, bars at the mean and one dot per seed.

The four files are logged to the parent run (artifact folder ``comparison``). Tracking goes to ``--tracking-uri``,
else ``MLFLOW_TRACKING_URI``, else ``sqlite:///O/mlruns.db``. ``O`` is locked for the comparison's life; a folder
that holds another comparison is refused unless ``--resume`` (continue it with its recorded settings: finished
children are reused, a killed training resumes from its last checkpoint) or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cevae" / "configs"
COMPARISON_TAG = "cevae.comparison"
PARENT_FILE = "parent_run.json"
COMPARISON_OUTPUTS = ("runs", PARENT_FILE, "comparison.md", "comparison.csv", "roc.png", "bars.png")
SETTINGS = ("seeds", "ce_weights", "overlays", "epochs", "datalist_train", "test_sets", "overrides")
NO_OVERLAY = "none"
CI_ENDS = ("lo", "hi")
CI_SUFFIXES = tuple(f"_ci95_{end}" for end in CI_ENDS)
PAPER_EPOCHS, DEMO_EPOCHS = 60, 15
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
    ("Dice of the whole brain, all subjects", "dice_whole_brain_all", None),
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


def child_name(ce_weight: float, seed: int, overlay: str = NO_OVERLAY) -> str:
    variant = "vae" if ce_weight == 0 else f"cevae-{ce_weight:g}"
    return f"{variant}-seed{seed}" if overlay == NO_OVERLAY else f"{variant}-{overlay}-seed{seed}"


def overlay_files(overlay: str) -> list[str]:
    """The bundle config files an overlay adds after ``train.json`` (none for ``none``)."""
    if overlay == NO_OVERLAY:
        return []
    if not (CONFIGS / f"{overlay}.json").is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json") if "overlay_name" in json.loads(p.read_text()))
        raise ValueError(f"no overlay {overlay!r} in {CONFIGS}; choose among {known} or {NO_OVERLAY!r}")
    return [f"{overlay}.json"]


def finite(values: list[float] | None) -> list[float]:
    """The finite values (an evaluation logs NaN where a metric is undefined, e.g. an interval from one subject)."""
    return [v for v in values or [] if np.isfinite(v)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------------ training
def bundle(run_id: str, files: list[str], log: Path, overrides: dict[str, object]) -> None:
    """``python -m monai.bundle run <run_id>`` with ``overrides``, output to ``log``; raises with the log's tail."""
    config = str([str(CONFIGS / f) for f in files])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        done = subprocess.run(
            cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`{run_id}` failed (exit {done.returncode}); log {log}:\n{tail}")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def test_sets(paths: list[Path], names: list[str] | None) -> dict[str, Path]:
    """Test-set name -> datalist: ``eval`` for a single set, else the file names (or ``names``)."""
    if names is None:
        names = ["eval"] if len(paths) == 1 else [p.stem for p in paths]
    if len(names) != len(paths) or len(set(names)) != len(names) or any("/" in n for n in names):
        raise ValueError(f"need one distinct name without '/' per test datalist, got {names} for {len(paths)} lists")
    return dict(zip(names, paths))


def new_comparison(args: argparse.Namespace, client, out: Path) -> tuple[str, dict]:
    """Create the parent run of a new comparison and record its settings; returns ``(parent run id, settings)``."""
    from pipeline.bundle_support import resolve_datalist
    from pipeline.io import atomic_write_json
    from pipeline.tracking import experiment_id

    train = Path(resolve_datalist(args.datalist_train, args.demo_dir)).resolve()
    sets = test_sets([Path(p).resolve() for p in (args.datalist_test or [train])], args.test_names)
    for path in [train, *sets.values()]:
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} does not exist; write it with scripts/prepare_datalist.py")
    for overlay in args.overlays:
        overlay_files(overlay)
    settings = {
        "seeds": args.seeds,
        "ce_weights": args.ce_weights,
        "overlays": args.overlays,
        "epochs": args.epochs or (PAPER_EPOCHS if args.paper else DEMO_EPOCHS),
        "datalist_train": str(train),
        "test_sets": {k: str(v) for k, v in sets.items()},
        "overrides": parse_overrides(args.set),
    }
    run_name = args.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = client.create_run(
        experiment_id(client, args.experiment), run_name=run_name, tags={COMPARISON_TAG: "true"}
    ).info.run_id
    for key, value in settings.items():
        client.log_param(parent, key, json.dumps(value, default=str))
    atomic_write_json(
        {"tracking_uri": client.tracking_uri, "run_id": parent, "experiment": args.experiment}, out / PARENT_FILE
    )
    return parent, settings


def recorded_comparison(client, out: Path) -> tuple[str, dict]:
    """``(parent run id, settings)`` of the comparison that ``out`` holds, for ``--resume``."""
    path = out / PARENT_FILE
    if not path.is_file():
        raise LookupError(f"{out} holds no comparison to resume ({path} is missing); start one without --resume")
    parent = json.loads(path.read_text())["run_id"]
    params = client.get_run(parent).data.params
    settings = {key: json.loads(params[key]) for key in SETTINGS}
    client.update_run(parent, status="RUNNING")
    return parent, settings


def child_progress(client, parent: str, name: str, sets: list[str], child_dir: Path) -> tuple[dict | None, list[str]]:
    """What is left of child ``name`` of ``parent``: ``(how to train, test sets to evaluate)``, where training is
    None (done), ``{}`` (from scratch), ``{"resume": True}`` (a killed training continues from ``last.pt``) or
    ``{"overwrite": True}`` (a failed one starts over). Superseded MLflow runs of the child are marked FAILED, so
    that the comparison counts each child once."""
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"],
    )
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished and (child_dir / "checkpoints" / "model.pt").is_file():
        return None, [s for s in sets if f"{s}/kl_q95" not in finished[0].data.metrics]
    running = [r for r in runs if r.info.status == "RUNNING"]
    if running and (child_dir / "checkpoints" / "last.pt").is_file():
        stale, how = [r for r in runs if r is not running[0]], {"resume": True}
    else:
        stale, how = runs, ({"overwrite": True} if (child_dir / "checkpoints").exists() else {})
    for run in stale:
        if run.info.status != "FAILED":
            client.set_terminated(run.info.run_id, "FAILED")
    return how, sets


def run_children(client, parent: str, settings: dict, out: Path, experiment: str, resume: bool) -> None:
    """Train and evaluate every (seed, overlay, CE weight) child of ``parent`` through the bundle; with ``resume``
    only what an interrupted comparison left undone."""
    sets = settings["test_sets"]
    try:
        for seed in settings["seeds"]:
            for overlay in settings["overlays"]:
                extra = overlay_files(overlay)
                for ce_weight in settings["ce_weights"]:
                    name = child_name(ce_weight, seed, overlay)
                    child_dir = out / "runs" / name
                    training, to_evaluate = (
                        child_progress(client, parent, name, list(sets), child_dir) if resume else ({}, list(sets))
                    )
                    if training is None and not to_evaluate:
                        print(f"{name}: done before, reused", flush=True)
                        continue
                    common = {
                        "datalist": settings["datalist_train"],
                        "output_dir": child_dir,
                        "seed": seed,
                        "ce_weight": ce_weight,
                        "epochs": settings["epochs"],
                        "run_name": name,
                        "experiment_name": experiment,
                        "tracking_uri": client.tracking_uri,
                        "progress_bar": False,
                        **settings["overrides"],
                    }
                    start = time.perf_counter()
                    if training is not None:
                        bundle(
                            "training",
                            ["train.json", *extra],
                            child_dir / "training.log",
                            {**common, "parent_run_id": parent, **training},
                        )
                    for set_name in to_evaluate:
                        bundle(
                            "evaluating",
                            ["train.json", *extra, "evaluate.json"],
                            child_dir / f"evaluating_{set_name}.log",
                            {
                                **common,
                                "eval_datalist": sets[set_name],
                                "eval_name": set_name,
                                "eval_output_dir": child_dir / set_name,
                                "overwrite": resume,
                            },
                        )
                    print(f"{name}: trained and evaluated in {time.perf_counter() - start:.0f} s", flush=True)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    client.set_terminated(parent)


def prepare_output_dir(out: Path, args: argparse.Namespace) -> None:
    """Refuse to start a comparison in a folder that holds another one, unless ``--resume`` (continue it) or
    ``--overwrite`` (delete :data:`COMPARISON_OUTPUTS` first; the MLflow store keeps the old runs)."""
    if not (out / PARENT_FILE).is_file() or args.resume:
        return
    if args.from_mlflow:
        held = json.loads((out / PARENT_FILE).read_text())["run_id"]
        if args.from_mlflow in (held, "latest") and not args.overwrite:
            return  # rebuilding this folder's own tables
    from pipeline.output_dir import delete_outputs

    if not args.overwrite:
        raise ValueError(
            f"{out} holds the comparison {out / PARENT_FILE}; continue it with --resume, replace it with "
            f"--overwrite (deletes {', '.join(COMPARISON_OUTPUTS)}), or choose another --output-dir"
        )
    delete_outputs(out, COMPARISON_OUTPUTS)


# ------------------------------------------------------------------------------------------------ comparison
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
        self.variants: dict[str, list] = defaultdict(list)
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

    def group_rows(self, test_set: str) -> list[tuple[str, str]]:
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

    def best_runs(self, primary: str) -> dict[str, object]:
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
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(s, c, m) for s in self.sets for c in self.configs for m in BARS]
        cols = len(BARS)
        fig, axes = plt.subplots(
            len(panels) // cols, cols, figsize=(3.2 * cols, 3 * len(panels) // cols), squeeze=False
        )
        for ax, (test_set, config, metric) in zip(axes.ravel(), panels):
            key = f"{test_set}/{config}/{metric}"
            for i, variant in enumerate(self.variants):
                values = finite(self.values[variant].get(key))
                if values:
                    ax.bar(i, np.mean(values), color=f"C{i}", alpha=0.6)
                    ax.plot(np.full(len(values), i), values, "k.", ms=5)
            ax.set_xticks(range(len(self.variants)), list(self.variants), fontsize=6, rotation=15)
            ax.set_title(key, fontsize=8)
            ax.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
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


def find_parent(client, which: str, experiment: str) -> str:
    """``which`` itself (a run id), or the newest comparison parent run of ``experiment`` for ``latest``."""
    if which != "latest":
        return which
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            f"tags.`{COMPARISON_TAG}` = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not runs:
        raise LookupError(f"no comparison run in experiment {experiment!r} at {client.tracking_uri}")
    return runs[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist-train", help="datalist with a 'training' list (default: the demo data)")
    parser.add_argument("--datalist-test", nargs="+", help="datalists with a 'test' list (default: --datalist-train)")
    parser.add_argument(
        "--test-names",
        nargs="+",
        help="MLflow names of the test sets (default: 'eval', or the datalist file names when there are several)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ce-weights", nargs="+", type=float, default=[0.0, 0.5], help="λ per variant (0 = VAE)")
    parser.add_argument(
        "--overlays",
        nargs="+",
        default=[NO_OVERLAY],
        metavar="NAME",
        help="bundle config overlays to compare, each a file configs/NAME.json added after train.json "
        f"(e.g. legacy_likelihood: the defaults before 0.5.0); {NO_OVERLAY!r} = the defaults",
    )
    parser.add_argument(
        "--epochs", type=int, help=f"training epochs (default {DEMO_EPOCHS}, {PAPER_EPOCHS} with --paper)"
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="full paper settings: 60 epochs (the bundle's "
        "defaults are the paper's network, batch 64, lr 2e-4, 64x64)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra bundle override for every run, e.g. --set image_size=128 (repeatable)",
    )
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--demo-dir", default="demo_data", help="demo data folder (built if missing)")
    parser.add_argument("--experiment", default="cevae-compare", help="MLflow experiment")
    parser.add_argument("--run-name", help="name of the parent run (default: compare-<time>)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<output-dir>/mlruns.db)",
    )
    parser.add_argument(
        "--from-mlflow",
        metavar="RUN_ID",
        help="no training: rebuild the comparison of this parent "
        "run ('latest': the newest comparison in --experiment)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison that --output-dir holds "
        "(killed, or a child failed) with its recorded settings: children finished in MLflow are "
        "reused, a killed training resumes from its last checkpoint, the rest runs again",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the comparison that --output-dir holds")
    parser.add_argument(
        "--primary",
        default="postprocessed/pixel_auroc/combined",
        help="metric below '<test set>/' that picks each variant's best seed for roc.png",
    )
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    from pipeline.output_dir import claim, release
    from pipeline.tracking import resolve_tracking_uri

    out = Path(args.output_dir).resolve()
    try:
        claim(out, "comparison")
        try:
            prepare_output_dir(out, args)
            if args.resume:
                recorded = json.loads((out / PARENT_FILE).read_text()) if (out / PARENT_FILE).is_file() else {}
                uri = recorded.get("tracking_uri") or resolve_tracking_uri(args.tracking_uri, out)
            else:
                uri = resolve_tracking_uri(args.tracking_uri, out)
            client = MlflowClient(uri)
            if args.from_mlflow:
                parent = find_parent(client, args.from_mlflow, args.experiment)
            else:
                parent, settings = (
                    recorded_comparison(client, out) if args.resume else new_comparison(args, client, out)
                )
                experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
                run_children(client, parent, settings, out, experiment, args.resume)
            comparison = Comparison(client, parent)
            files = comparison.write(out, f"{comparison.sets[0]}/{args.primary}")
        finally:
            release(out)
    except (OSError, ValueError, LookupError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comparison.markdown().split("## every metric")[0])
    print("wrote " + ", ".join(str(f) for f in files) + f"\nMLflow: parent run {parent} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
