"""A sweep of the bundle over CE weights, overlays and seeds (``scripts/compare.py``): every (variant, seed) is one
child MLflow run under one parent run, trained and evaluated by ``python -m monai.bundle run`` subprocesses (the
commands a user types; logs in ``<output>/runs/<child>/*.log``); a killed or failed sweep resumes with its recorded
settings, reusing the children that MLflow holds as finished. Then :class:`~pipeline.experiments.comparison.Comparison`
reads the results back from MLflow."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.experiments.comparison import NO_OVERLAY, Comparison

__all__ = ["DEMO_EPOCHS", "PAPER_EPOCHS", "compare"]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "cevae" / "configs"
COMPARISON_TAG = "cevae.comparison"
PARENT_FILE = "parent_run.json"
COMPARISON_OUTPUTS = ("runs", PARENT_FILE, "comparison.md", "comparison.csv", "roc.png", "bars.png")
SETTINGS = ("seeds", "ce_weights", "overlays", "epochs", "datalist_train", "test_sets", "overrides")
PAPER_EPOCHS, DEMO_EPOCHS = 60, 15


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


# ------------------------------------------------------------------------------------------------ training
def bundle(run_id: str, files: list[str], log: Path, overrides: dict[str, object]) -> None:
    """``python -m monai.bundle run <run_id>`` with ``overrides``, output appended to ``log`` (a resumed step keeps
    what the interrupted one wrote); raises with the log's tail."""
    config = str([str(CONFIGS / f) for f in files])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
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
    children = list(itertools.product(settings["seeds"], settings["overlays"], settings["ce_weights"]))
    try:
        for done, (seed, overlay, ce_weight) in enumerate(children, 1):
            extra = overlay_files(overlay)
            name = child_name(ce_weight, seed, overlay)
            child_dir, tag = out / "runs" / name, f"[{done}/{len(children)}] {name}:"
            training, to_evaluate = (
                child_progress(client, parent, name, list(sets), child_dir) if resume else ({}, list(sets))
            )
            if training is None and not to_evaluate:
                print(f"{tag} done before, reused", flush=True)
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
                step = "resuming its training" if training.get("resume") else "training"
                print(f"{tag} {step}, log {child_dir / 'training.log'}", flush=True)
                bundle(
                    "training",
                    ["train.json", *extra],
                    child_dir / "training.log",
                    {**common, "parent_run_id": parent, **training},
                )
            for set_name in to_evaluate:
                log = child_dir / f"evaluating_{set_name}.log"
                print(f"{tag} evaluating on {set_name}, log {log}", flush=True)
                bundle(
                    "evaluating",
                    ["train.json", *extra, "evaluate.json"],
                    log,
                    {
                        **common,
                        "eval_datalist": sets[set_name],
                        "eval_name": set_name,
                        "eval_output_dir": child_dir / set_name,
                        "overwrite": resume,
                    },
                )
            print(f"{tag} trained and evaluated in {time.perf_counter() - start:.0f} s", flush=True)
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


def compare(args: argparse.Namespace) -> tuple[Comparison, list[Path], str, str]:
    """Run (or resume, or only rebuild) the sweep that ``args`` (``scripts/compare.py``'s options) describe, under a
    lock on ``args.output_dir``; returns ``(comparison, files written, parent run id, tracking URI)``."""
    from mlflow import MlflowClient

    from pipeline.output_dir import claim, release
    from pipeline.tracking import resolve_tracking_uri, tracking_off

    if tracking_off(args.tracking_uri):
        raise ValueError("a comparison is read back from MLflow: give --tracking-uri a store, or leave it out")
    out = Path(args.output_dir).resolve()
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
            parent, settings = recorded_comparison(client, out) if args.resume else new_comparison(args, client, out)
            experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
            run_children(client, parent, settings, out, experiment, args.resume)
        comparison = Comparison(client, parent)
        files = comparison.write(out, f"{comparison.sets[0]}/{args.primary}")
    finally:
        release(out)
    return comparison, files, parent, uri
