"""The trained model as an MLflow model that takes a scan: the pyfunc
:class:`~pipeline.tracking.scan_model.ScanAnomalyModel` under the artifact path ``model``
(``mlflow.pyfunc.load_model("runs:/<run id>/model")``, ``mlflow models serve``), optionally registered in the Model
Registry. It is logged as MLflow's "model from code"
(:mod:`pipeline.tracking.pyfunc_entry` is the file MLflow runs to build it), so that loading it unpickles no code.

Called at the end of training by :class:`pipeline.tracking.runs.MLflowRunHandler`, through
:class:`pipeline.tracking.spool.SpooledClient` (kept in the spool while the tracking server is unreachable, logged
when it is back or by ``scripts/sync_tracking.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipeline.errors import InputError
from pipeline.run_record import EXECUTED_CONFIG
from pipeline.thresholds import THRESHOLD_FILENAME

__all__ = ["COMPANION_FILES", "REQUIREMENTS", "ModelLogging"]

COMPANION_FILES = (EXECUTED_CONFIG, THRESHOLD_FILENAME)  # what the logged model needs beside the checkpoint

REQUIREMENTS = ("torch", "monai", "pytorch-ignite", "nibabel", "numpy", "scipy", "mlflow")


class ModelLogging:
    """Log a training run's best ``model.pt`` as the MLflow model of the module docstring.

    The artifacts are the training's ``model.pt``, ``config.json`` and ``threshold.json``; the code is this package
    (``code_paths``) with the installed versions of what it imports as pip requirements (:data:`REQUIREMENTS`); the
    signature is :data:`pipeline.tracking.scan_model.SIGNATURE` with a small input example.

    Args:
        checkpoint: the best epoch's ``model.pt`` (its ``config.json`` and ``threshold.json`` beside it).
        registered_name: also register the model as a new version of this name in the Model Registry, described by
            the training run's own description (variant, datalist and its digest, seed, epochs, overlay) and its id.
        alias: and point this alias of ``registered_name`` (e.g. ``champion``) at the new version.
    """

    def __init__(
        self, checkpoint: str | os.PathLike, registered_name: str | None = None, alias: str | None = None
    ) -> None:
        if alias and not registered_name:
            raise InputError(
                f"--register_alias {alias} names a version of a registered model; add --register_model NAME."
            )
        self.checkpoint, self.registered_name, self.alias = Path(checkpoint), registered_name or None, alias or None

    def __call__(self, tracking_uri: str, run_id: str) -> None:
        import mlflow

        from pipeline.tracking.scan_model import SIGNATURE, example_scan

        package = Path(sys.modules[__name__.split(".")[0]].__file__).parent  # pipeline/ (or scripts/ in a bundle)
        # log_model needs the fluent API's active run, hence its global tracking URI, which MLflow also writes into
        # MLFLOW_TRACKING_URI: both are put back as they were (a user's variable kept), or later runs of this
        # process would log into this store
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        with tempfile.TemporaryDirectory(prefix="cevae-model-") as staging:
            trained = Path(staging) / "trained"
            trained.mkdir()
            shutil.copy2(self.checkpoint, trained / "model.pt")
            for name in COMPANION_FILES:
                shutil.copy2(self.checkpoint.parent / name, trained / name)
            mlflow.set_tracking_uri(tracking_uri)
            try:
                with mlflow.start_run(run_id=run_id):
                    logged = mlflow.pyfunc.log_model(
                        name="model",
                        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                        artifacts={"trained": str(trained)},
                        code_paths=[str(package)],
                        pip_requirements=[_pinned(name) for name in REQUIREMENTS],
                        signature=SIGNATURE,
                        input_example=example_scan(),
                        registered_model_name=self.registered_name,
                    )
            finally:
                mlflow.set_tracking_uri(previous)
        if self.registered_name:
            client = mlflow.MlflowClient(tracking_uri)
            version = str(logged.registered_model_version)
            note = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NOTE, "")  # what trained it, as the run says
            client.update_model_version(self.registered_name, version, description=f"{note} MLflow run {run_id}.")
            if self.alias:
                client.set_registered_model_alias(self.registered_name, self.alias, version)


def _pinned(distribution: str) -> str:
    """``name==version`` of an installed distribution (a local build's ``+cpu`` suffix dropped)."""
    return f"{distribution}=={metadata.version(distribution).split('+')[0]}"
