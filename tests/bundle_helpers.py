"""Running the cevae bundle in-process from tests, as model-zoo's unit tests do (``ConfigWorkflow``)."""

from __future__ import annotations

import os
import sys

from conftest import REPO
from monai.bundle import ConfigWorkflow

BUNDLE = REPO / "bundles" / "cevae"
CONFIGS = BUNDLE / "configs"

# the bundle's command line in a subprocess (cwd: the repository root), without Python's warnings in its stderr
CLI_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
BUNDLE_RUN = [sys.executable, "-m", "monai.bundle", "run"]
TRAIN_CLI = [*BUNDLE_RUN, "training", "--config_file", "bundles/cevae/configs/train.json"]

TINY = {  # small enough for CI: ~100 slices of 64x64, a narrow net, 1 synthetic lesion for the operating point
    "batch_size": 16,
    "z_dim": 16,
    "channels": [8, 16, 32, 64],
    "lr": 1e-3,
    "val_fraction": 0.34,
    "min_brain_fraction": 0.3,
    "progress_bar": False,
    "synthetic_volumes": 1,
    "keep_last": True,  # the tests inspect and resume finished runs' last.pt (the default removes it at the end)
}


# In-process runs track nothing unless a test asks (``tracking_uri=None``: the run's own store, the bundle default, or
# a server's URI): each new SQLite store costs about 1.5 s of MLflow's schema migrations, and most tests look at files.
UNTRACKED = {"tracking_uri": "none"}
# Evaluations: 100 bootstrap resamples for the intervals instead of 1000 (about 4 s less per evaluation here); the
# tests check how intervals are made and reported, not their Monte Carlo precision.
TINY_EVALUATION = {"n_bootstrap": 100}


def initialized_workflow(output_dir, datalist, config_files=("train.json",), **overrides) -> ConfigWorkflow:
    """The bundle's training workflow with the tiny settings, untracked, plus ``overrides``, initialised."""
    files = [str(CONFIGS / f) for f in config_files]
    evaluation = TINY_EVALUATION if "evaluate.json" in config_files else {}
    settings = {
        **TINY,
        **evaluation,
        **UNTRACKED,
        "output_dir": str(output_dir),
        "datalist": str(datalist),
        **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        workflow_type="train",
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        **settings,
    )
    workflow.initialize()
    return workflow


def run_bundle(output_dir, datalist, config_files=("train.json",), **overrides) -> ConfigWorkflow:
    """Initialise, run and finalise the bundle's training workflow; returns it."""
    workflow = initialized_workflow(output_dir, datalist, config_files, **overrides)
    workflow.run()
    workflow.finalize()
    return workflow


def inference_workflow(**settings) -> ConfigWorkflow:
    """The bundle's inference workflow (``configs/inference.json``) with ``settings``, initialised."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        run_id="inference",
        **settings,
    )
    workflow.initialize()
    return workflow
