"""MLflow tracking, one package below the bundle glue: where runs go (:mod:`.store`), what a training's run logs
(:mod:`.runs`), the outage spool that keeps every write while the server is unreachable (:mod:`.spool`), the trained
model as an MLflow model (:mod:`.model`). The names the bundle configs use are importable from here."""

from pipeline.tracking.model import ModelLogging
from pipeline.tracking.runs import CURVES_SECTION, RUN_INFO_FILENAME, MLflowRunHandler, curve_key, run_params
from pipeline.tracking.spool import SPOOL_DIRNAME, SpooledClient, report_pending, sync
from pipeline.tracking.store import (
    StoreUnavailable,
    artifact_location,
    check_tracking_server,
    datalist_fingerprint,
    experiment_id,
    log_datalist,
    resolve_tracking_uri,
    store_errors,
    store_lock,
    tracking_off,
)

__all__ = [
    "CURVES_SECTION",
    "RUN_INFO_FILENAME",
    "SPOOL_DIRNAME",
    "MLflowRunHandler",
    "ModelLogging",
    "SpooledClient",
    "StoreUnavailable",
    "artifact_location",
    "check_tracking_server",
    "curve_key",
    "datalist_fingerprint",
    "experiment_id",
    "log_datalist",
    "report_pending",
    "resolve_tracking_uri",
    "run_params",
    "store_errors",
    "store_lock",
    "sync",
    "tracking_off",
]
