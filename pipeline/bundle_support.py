"""Glue between the bundle's JSON configs and the library: data set resolution and the train/validation split."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.handlers import CheckpointLoader

from pipeline.data.datalist import load_datalist, split_subjects
from pipeline.data.demo import make_demo_dataset

__all__ = ["resolve_datalist", "resume_if_requested", "train_val_split"]

logger = logging.getLogger(__name__)


def resolve_datalist(datalist: str | os.PathLike | None, demo_dir: str | os.PathLike) -> str:
    """The datalist to use: ``datalist`` if given, else the demo data set's, built in ``demo_dir`` if missing."""
    if datalist:
        return str(datalist)
    path = Path(demo_dir) / "datalist.json"
    if not path.is_file():
        logger.warning("no --datalist given and no demo data in %s: building the embedded demo data set there "
                       "(synthetic T2 brains from nilearn's MNI152 template)", demo_dir)
        make_demo_dataset(demo_dir)
    else:
        logger.info("no --datalist given: using the demo data set %s", path)
    return str(path)


def train_val_split(datalist: str | os.PathLike, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Healthy training and validation entries: the datalist's ``validation`` list if it has one, else a
    subject-level split of ``training`` holding out ``val_fraction`` (seeded)."""
    training = load_datalist(datalist, "training")
    try:
        return training, load_datalist(datalist, "validation")
    except ValueError as err:
        if "no list 'validation'" not in str(err):
            raise
    return split_subjects(training, val_fraction, seed)


def resume_if_requested(resume: bool, checkpoint: str | os.PathLike, objects: Mapping[str, object],
                        device: str | torch.device = "cpu") -> None:
    """With ``resume``, load ``objects`` (model, optimizer, trainer state, RNG state) from ``checkpoint`` through
    MONAI's ``CheckpointLoader`` (``weights_only=True``); the trainer's next ``run()`` continues from there."""
    if not resume:
        return
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {checkpoint}; run training without --resume first, or give "
                                "the --output_dir of the run to resume.")
    trainer = objects["trainer"]
    CheckpointLoader(load_path=str(checkpoint), load_dict=dict(objects), map_location=device)(trainer)
    logger.info("resumed from %s at epoch %d", checkpoint, trainer.state.epoch)
