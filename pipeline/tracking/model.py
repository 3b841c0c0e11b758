"""The trained network as an MLflow model: ``mlflow.pytorch.log_model`` under the artifact path ``model``, so that
``mlflow.pytorch.load_model("runs:/<run id>/model")`` returns it, optionally registered in the Model Registry.

Called at the end of training by :class:`pipeline.tracking.runs.MLflowRunHandler`, through
:class:`pipeline.tracking.spool.SpooledClient` (kept in the spool while the tracking server is unreachable, logged
when it is back or by ``scripts/sync_tracking.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.networks import ARCHITECTURE_KEYS, CeVAEReconstruction
from pipeline.run_record import training_config
from pipeline.weights import load_trained

__all__ = ["ModelLogging"]


class ModelLogging:
    """Log a training run's best ``model.pt`` as an MLflow model.

    The model is the inference view :class:`~pipeline.networks.CeVAEReconstruction` (input ``(B, 1, S, S)`` in
    [0, 1], output the reconstruction from the posterior mean), built with the architecture of the training's
    ``config.json`` next to ``checkpoint`` and the checkpoint's weights. It is saved as the module itself (MLflow's
    ``pickle`` format: ``encode``/``decode`` stay available for the anomaly maps; MLflow's default ``torch.export``
    graph would keep only ``forward``, for batch size 1), with its code (this package, ``code_paths``), this torch
    and numpy as pip requirements, and a ``(1, 1, S, S)`` input example that gives its signature.

    Args:
        checkpoint: the best epoch's ``model.pt`` (its ``config.json`` beside it).
        registered_name: also register the model as a new version of this name in the Model Registry.
    """

    def __init__(self, checkpoint: str | os.PathLike, registered_name: str | None = None) -> None:
        self.checkpoint, self.registered_name = Path(checkpoint), registered_name or None

    def network(self) -> CeVAEReconstruction:
        """The trained network (CPU, eval mode)."""
        config = training_config(self.checkpoint)
        network = CeVAEReconstruction(**{k: config[k] for k in ARCHITECTURE_KEYS if k in config})
        load_trained(self.checkpoint, network)
        return network.eval()

    def __call__(self, tracking_uri: str, run_id: str) -> None:
        import mlflow

        network = self.network()
        size = network.image_size
        package = Path(sys.modules[type(network).__module__.split(".")[0]].__file__).parent  # pipeline/ (or scripts/)
        # log_model needs the fluent API's active run, hence its global tracking URI, which MLflow also writes into
        # MLFLOW_TRACKING_URI: both are put back as they were (a user's variable kept), or later runs of this
        # process would log into this store
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)
        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.pytorch.log_model(
                    network,
                    name="model",
                    serialization_format="pickle",  # the module itself (encode/decode for the anomaly maps)
                    code_paths=[str(package)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
                    input_example=np.zeros((1, 1, size, size), dtype=np.float32),
                    registered_model_name=self.registered_name,
                )
        finally:
            mlflow.set_tracking_uri(previous)
