"""The file MLflow runs to build the logged pyfunc (MLflow's "models from code"): nothing is unpickled on load."""

from mlflow.models import set_model

from pipeline.tracking.scan_model import ScanAnomalyModel

set_model(ScanAnomalyModel())
