"""The bundle's MLflow run of a training (:class:`MLflowRunHandler`): its identity across resumes, its tags,
parameters and dataset input, and the trained model logged at the end. Where runs go: :mod:`.store`.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE
from monai.handlers import MLFlowHandler

from pipeline.errors import read_json
from pipeline.io import atomic_write_json
from pipeline.tracking.model import ModelLogging
from pipeline.tracking.spool import SpooledClient, report_pending
from pipeline.tracking.store import datalist_fingerprint, log_datalist, store_errors, store_lock

__all__ = ["CURVES_SECTION", "RUN_INFO_FILENAME", "MLflowRunHandler", "curve_key", "run_params"]

logger = logging.getLogger(__name__)

RUN_INFO_FILENAME = "mlflow_run.json"  # next to the checkpoints: which MLflow run trained them
PREVIOUS_RUN_TAG = "cevae.previous_run_id"  # on a resumed training's new run: the run it continues
# The per-epoch curves' section. MLflow 3's run page draws one section per key prefix (all but the last ``/`` part),
# the prefixed sections in sorted order (capitals before lower case) and the un-prefixed "Model metrics" last
# (``getBaseChartAndSectionConfigs`` in its ``runs-charts.types.ts``): under a capitalised prefix the training curves
# open the page, before the end-of-training calibration's and every evaluation's (lower-case) sections.
CURVES_SECTION = "Training"


def curve_key(name: str) -> str:
    """The MLflow key of the per-epoch value ``name`` of the engine (``train_loss`` -> ``Training/train_loss``)."""
    return f"{CURVES_SECTION}/{name}"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_params(hyper_parameters: Mapping[str, object], datalist: str | os.PathLike) -> dict[str, object]:
    """Parameters of a run: the hyper-parameters plus data set, datalist fingerprint, versions and git commit."""
    import ignite
    import mlflow
    import monai

    datalist = Path(datalist)
    return {
        **{k: ("None" if v is None else v) for k, v in hyper_parameters.items()},
        "dataset": datalist.parent.name,
        "datalist": str(datalist),
        "datalist_sha256": datalist_fingerprint(datalist),
        "version_monai": monai.__version__,
        "version_torch": torch.__version__,
        "version_ignite": ignite.__version__,
        "version_mlflow": mlflow.__version__,
        "git_commit": _git_commit(),
    }


class MLflowRunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that starts a **new** run, or with ``resume`` continues the run recorded in
    ``run_info_path`` by the interrupted training (a new run if there is none).

    The parent class reuses *any* unfinished run of the same name, so a fresh run would log into a run that an
    earlier, killed process left open, and two trainings of the same name would swap runs on resume. With
    ``run_info_path`` the tracking URI and run id are written there (:data:`RUN_INFO_FILENAME` next to the
    checkpoints), so that a resumed training continues exactly its own run and evaluation logs into the run that
    trained them.
    With ``parent_run_id`` a new run is created nested under that run (``scripts/compare.py`` groups the runs of
    one comparison this way). With ``spool_dir`` every write survives an outage of the tracking server during the
    run (:class:`~pipeline.tracking.spool.SpooledClient`, probing it every ``retry_s`` seconds). With
    ``model_logging`` the trained model is logged as an MLflow model at completion (:class:`ModelLogging`).
    """

    def __init__(
        self,
        *args,
        resume: bool = False,
        run_info_path: str | os.PathLike | None = None,
        parent_run_id: str | None = None,
        spool_dir: str | os.PathLike | None = None,
        retry_s: float = 30.0,
        model_logging: ModelLogging | None = None,
        **kwargs,
    ) -> None:
        self.store_uri = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        with store_lock(self.store_uri), store_errors(self.store_uri):  # the client creates a new store's schema
            super().__init__(*args, **kwargs)
        if spool_dir is not None:  # writes survive a tracking-server outage (pipeline.tracking.spool)
            self.client = SpooledClient(self.client, spool_dir, retry_s)
        self.resume = resume
        self.run_info_path = run_info_path
        self.parent_run_id = parent_run_id
        self.model_logging = model_logging

    def start(self, engine: Engine) -> None:
        if not self.cur_run:
            with store_errors(self.store_uri):  # a store that cannot be used stops the run here, in one line
                self._open_run()
        super().start(engine)

    def _open_run(self) -> None:
        """This training's MLflow run: the recorded one on resume (:meth:`_recorded_run`), else a new one with its
        tags and the training datalist as dataset input; its id goes to ``run_info_path``."""
        with store_lock(self.store_uri):
            self._set_experiment()
        recorded, previous = self._recorded_run() if self.resume else (None, None)
        tags = self._new_run_tags()
        if previous:
            tags[PREVIOUS_RUN_TAG] = previous
        if recorded is not None:
            self._keep_logged_params(recorded)
        self.cur_run = recorded or self.client.create_run(
            experiment_id=self.experiment.experiment_id, run_name=self.run_name, tags=tags
        )
        datalist = (self.experiment_param or {}).get("datalist")
        if recorded is None and datalist:  # the healthy training data, with its digest
            log_datalist(self.client, self.cur_run.info.run_id, datalist, "training")
        if self.run_info_path is not None:
            atomic_write_json(
                {
                    "tracking_uri": self.client.tracking_uri,
                    "run_id": self.cur_run.info.run_id,
                    "experiment_id": self.experiment.experiment_id,
                },
                self.run_info_path,
            )

    def _new_run_tags(self) -> dict[str, str]:
        """What ``mlflow.start_run`` would tag a run with (user, source; :func:`resolve_tags`), plus the git commit
        of this code, the parent run and a description (MLflow's run page shows it) made of the run's parameters."""
        params = self.experiment_param or {}
        tags = resolve_tags({MLFLOW_PARENT_RUN_ID: self.parent_run_id} if self.parent_run_id else {})
        commit = params.get("git_commit") or _git_commit()
        if commit != "unknown":
            tags[MLFLOW_GIT_COMMIT] = commit
        variant = params.get("model_variant", "the model")
        weight = f" (ce_weight {params['ce_weight']})" if variant == "cevae" and "ce_weight" in params else ""
        tags[MLFLOW_RUN_NOTE] = (
            f"{variant}{weight} trained on the healthy subjects of {params.get('datalist', 'a datalist')} "
            f"(sha256 {params.get('datalist_sha256', '?')}), seed {params.get('seed', '?')}, "
            f"{params.get('epochs', '?')} epochs, overlay {params.get('overlay_name', 'none')}; bundle cevae."
        )
        return tags

    def _keep_logged_params(self, run) -> None:
        """A resumed run keeps the parameters it was started with (MLflow refuses to change a logged one): a value
        that differs now, such as the code's git commit or a package's version after an update between the kill and
        the resume, is logged as the tag ``resumed.<key>`` instead, and said in the log."""
        logged = run.data.params
        params = self.experiment_param or {}
        changed = {key: str(value) for key, value in params.items() if key in logged and logged[key] != str(value)}
        for key, value in changed.items():
            self.client.set_tag(run.info.run_id, f"resumed.{key}", value)
            logger.warning(
                "MLflow run %s was started with %s=%s and is resumed with %s: the parameter keeps its first value, "
                "the new one is the tag resumed.%s",
                run.info.run_id,
                key,
                logged[key],
                value,
                key,
            )
        self.experiment_param = {key: value for key, value in params.items() if key not in changed}

    def _recorded_run(self):
        """``(run, None)`` for the unfinished run that ``run_info_path`` names (reopened if a kill or a failure ended
        it), or ``(None, its id)`` when the resumed training gets a new run linked to it (tag
        :data:`PREVIOUS_RUN_TAG`): the recorded run finished (a completed training trained further), or this store
        or experiment does not have it. ``(None, None)`` without a record. Never a run found by name: several
        trainings in one store may share a name, and each must continue its own run."""
        path = Path(self.run_info_path) if self.run_info_path is not None else None
        if path is None or not path.is_file():
            return None, None
        recorded = read_json(path, "delete it to start a new MLflow run for this training")
        run_id = recorded.get("run_id")
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:  # deleted, or a store that never had it
            logger.warning(
                "%s names MLflow run %s, which this store does not have (%s); starting a new run", path, run_id, err
            )
            return None, run_id
        if recorded.get("tracking_uri") != self.client.tracking_uri or (
            run.info.experiment_id != self.experiment.experiment_id
        ):
            logger.warning("%s names run %s of another store or experiment; starting a new run", path, run_id)
            return None, run_id
        if run.info.status == "FINISHED":  # a completed training trained further: its settings differ
            return None, run_id
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        return run, None

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Log ``metrics`` with the per-epoch values under :data:`CURVES_SECTION`; the values that the healthy
        calibration adds at the last epoch (``healthy_<check>`` and keys with their own prefix,
        :class:`~pipeline.engines.handlers.HealthyCalibration`) as they are."""
        renamed = {k if "/" in k or k.startswith("healthy_") else curve_key(k): v for k, v in metrics.items()}
        super()._log_metrics(renamed, step=step)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.TERMINATE, self.terminated)

    def terminated(self, engine: Engine) -> None:
        """A training stopped before its last epoch failed: its run ends FAILED, with no model logged."""
        self.run_finish_status = RunStatus.to_string(RunStatus.FAILED)
        reason = getattr(engine.state, "stop_reason", None)
        if reason and self.cur_run:
            self.client.set_tag(self.cur_run.info.run_id, "stop_reason", reason)

    def complete(self) -> None:
        """Log the artifacts, then the trained model (:class:`ModelLogging`) unless the training failed."""
        super().complete()
        if self.model_logging is None or not self.cur_run or self.run_finish_status != "FINISHED":
            return
        run_id = self.cur_run.info.run_id
        try:
            if isinstance(self.client, SpooledClient):  # kept in the spool while the server is unreachable
                self.client.log_model(run_id, self.model_logging)
            else:
                self.model_logging(self.client.tracking_uri, run_id)
        except Exception as err:  # a rejected model: training's outputs stay on disk
            logger.warning(
                "the trained model was not logged to MLflow run %s (%s: %s); its weights are in %s",
                run_id,
                type(err).__name__,
                err,
                self.model_logging.checkpoint,
            )

    def close(self) -> None:
        super().close()
        report_pending(self.client, "training")
