"""What each rank of a ``torchrun`` training did, for ``tests/test_training.py``: attached to the trainer from the
bundle's ``run`` list (a test overlay inserts :func:`attach` before the trainer runs; importable through
``PYTHONPATH=tests``), it writes ``probe_rank<R>.json`` into the output folder.

Recorded per epoch: the training slices this rank iterates (its sampler's indices for that epoch), the validation
slices it scores, the gathered validation metric, that metric recomputed here over *all* validation slices with the
epoch's weights (the reference), this rank's own shard's mean (negative control), a digest of the weights and the
likelihood sigma. At exit: when the process left, and (rank 0) when its end-of-training calibration ended.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time

import torch
from ignite.engine import Events

from pipeline.scoring import elbo_terms


def attach(trainer, validator, network, loss, output_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    record = {"epochs": [], "calibrated_at": None, "left_at": None}
    val_shard = {"neg_elbo": []}

    @validator.on(Events.ITERATION_COMPLETED)
    def _scored(engine):
        val_shard["neg_elbo"].extend(engine.state.output["neg_elbo"].tolist())

    @trainer.on(Events.EPOCH_STARTED)
    def _shard(engine):  # after MONAI's own EPOCH_STARTED handler, which calls set_epoch
        record["epochs"].append(
            {"train_indices": list(iter(engine.data_loader.sampler)), "train_size": len(engine.data_loader.dataset)}
        )
        val_shard["neg_elbo"].clear()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _after_validation(engine):  # registered after the config's ValidationHandler: runs after it
        module = network.module if hasattr(network, "module") else network
        dataset = validator.data_loader.dataset
        everything = torch.stack([item["image"] for item in dataset.__getitems__(list(range(len(dataset))))])
        with torch.no_grad():
            reference = float(elbo_terms(module, everything, loss)["neg_elbo"].mean())
        digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in module.state_dict().values()))
        record["epochs"][-1].update(
            val_indices=list(iter(validator.data_loader.sampler)),
            val_size=len(dataset),
            val_neg_elbo=float(validator.state.metrics["val_neg_elbo"]),
            val_reference=reference,
            val_own_shard=sum(val_shard["neg_elbo"]) / max(len(val_shard["neg_elbo"]), 1),
            weights=digest.hexdigest(),
            sigma=float(loss.sigma),
        )

    @trainer.on(Events.COMPLETED)
    def _calibrated(engine):  # registered after the calibration handler: runs when it is done
        record["calibrated_at"] = time.time()

    def _write():
        record["left_at"] = time.time()
        with open(os.path.join(output_dir, f"probe_rank{rank}.json"), "w") as handle:
            json.dump(record, handle)

    atexit.register(_write)
