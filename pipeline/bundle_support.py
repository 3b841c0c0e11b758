"""Glue between the bundle's JSON configs and the library: data set resolution and the train/validation split."""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from monai.handlers import CheckpointLoader

from pipeline.data.datalist import load_datalist, split_subjects
from pipeline.data.demo import make_demo_dataset
from pipeline.errors import InputError, find_cause
from pipeline.io import WriteError, atomic_write_json
from pipeline.networks import ARCHITECTURE_KEYS
from pipeline.run_record import EVALUATION_KEYS, EXECUTED_CONFIG, SCORING_KEYS, training_config
from pipeline.thresholds import THRESHOLD_FILENAME
from pipeline.weights import load_trained

__all__ = [
    "EVALUATION_KEYS",
    "active_config_parser",
    "bundle_root",
    "check_config_keys",
    "check_matches_training",
    "defer_monai_tracking",
    "install_error_hook",
    "resolve_datalist",
    "restore_training_state",
    "save_executed_config",
    "start_distributed",
    "stop_distributed",
    "train_val_split",
    "validation_entries",
]

logger = logging.getLogger(__name__)


def resolve_datalist(datalist: str | os.PathLike | None, demo_dir: str | os.PathLike) -> str:
    """The datalist to use: ``datalist`` if given, else the demo data set's, built in ``demo_dir`` if missing."""
    if datalist:
        return str(datalist)
    path = Path(demo_dir) / "datalist.json"
    if not path.is_file():
        logger.warning(
            "no --datalist given and no demo data in %s: building the embedded demo data set there "
            "(synthetic T2 brains from nilearn's MNI152 template)",
            demo_dir,
        )
        make_demo_dataset(demo_dir)
    else:
        logger.info("no --datalist given: using the demo data set %s", path)
    return str(path)


def train_val_split(datalist: str | os.PathLike, val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Healthy training and validation entries: the datalist's ``validation`` list if it has one, else a
    subject-level split of ``training`` holding out ``val_fraction`` (seeded); :class:`InputError` if either is
    empty (a single-subject datalist, or ``val_fraction`` 0 without a ``validation`` list)."""
    training = load_datalist(datalist, "training")
    validation = load_datalist(datalist, "validation", missing_ok=True)
    training, validation = (training, validation) if validation else split_subjects(training, val_fraction, seed)
    if not validation or not training:
        raise InputError(
            f"datalist {datalist}: {len(training) + len(validation)} healthy subject(s) and --val_fraction "
            f"{val_fraction} leave {len(training)} for training and {len(validation)} for validation; both need at "
            "least one (validation selects the checkpoint and gives the healthy thresholds): add subjects, a "
            "'validation' list, or raise --val_fraction."
        )
    return training, validation


def validation_entries(datalist: str | os.PathLike, val_fraction: float, seed: int) -> list[dict]:
    """The healthy validation entries of :func:`train_val_split`, or ``[]`` for a datalist without a ``training``
    list (an evaluation-only datalist)."""
    if not load_datalist(datalist, "training", missing_ok=True):
        return []
    return train_val_split(datalist, val_fraction, seed)[1]


def restore_training_state(
    resume: bool,
    checkpoint: str | os.PathLike,
    objects: Mapping[str, Any],
    device: str | torch.device = "cpu",
    pretrained: str | os.PathLike | None = None,
) -> None:
    """Where training starts: with ``resume``, everything (model, optimizer, trainer state, RNG state) from
    ``checkpoint`` (``last.pt``) through MONAI's ``CheckpointLoader`` (``weights_only=True``), and the trainer's next
    ``run()`` continues from there; else with ``pretrained`` (fine-tuning) the network's weights from that
    ``model.pt`` (a training checkpoint or an exported bundle's plain state dict), whose training must have had this
    run's architecture (its ``config.json``); else nothing (fresh weights)."""
    if not resume:
        if pretrained:
            check_matches_training(pretrained, ARCHITECTURE_KEYS)
            load_trained(pretrained, objects["model"], device=device)
            logger.info("fine-tuning: network weights from %s", pretrained)
        return
    folder = Path(checkpoint).parent
    if not Path(checkpoint).is_file():
        if (folder / THRESHOLD_FILENAME).is_file():  # written when a training completes
            raise InputError(
                f"--resume: the run in {folder} completed and kept no {Path(checkpoint).name} "
                "(it is removed at the end unless --keep_last True); train further from its weights with "
                f"--pretrained {folder / 'model.pt'} and another --output_dir."
            )
        if not (folder / "model.pt").is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint {checkpoint}; run training without --resume first, or give "
                "the --output_dir of the run to resume."
            )
        logger.warning(  # killed or out of disk during its first save: nothing to continue, nothing to lose
            "--resume: the run in %s saved its best model.pt but no %s (it stopped during its first save); "
            "training starts from its first epoch",
            folder,
            Path(checkpoint).name,
        )
        return
    trainer = objects["trainer"]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).keys()
    if "validator" in objects and "validator" not in saved:  # a last.pt of bundle < 0.6.0
        logger.warning(
            "%s has no best validation epoch (an older run): the best checkpoint is chosen anew from "
            "the first resumed epoch on",
            checkpoint,
        )
        objects = {name: obj for name, obj in objects.items() if name != "validator"}
    CheckpointLoader(load_path=str(checkpoint), load_dict=dict(objects), map_location=device)(trainer)
    logger.info("resumed from %s at epoch %d", checkpoint, trainer.state.epoch)


Active = TypeVar("Active")


def _active(kind: type[Active]) -> Active:
    """The instance of ``kind`` that is executing on the call stack (a config expression's caller)."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, kind):
            return candidate
        frame = frame.f_back
    raise RuntimeError(f"no {kind.__name__} on the call stack: call this from a MONAI bundle config expression.")


def bundle_root() -> str:
    """The folder of the running bundle: the one above the workflow's ``configs/`` (MONAI's own rule, by which
    ``ConfigWorkflow.run`` puts it on ``sys.path``), so that a bundle started from any folder finds its
    ``models/``; ``"."`` (MONAI's default ``bundle_root``) when no workflow runs (a plain ``ConfigParser``)."""
    from monai.bundle import ConfigWorkflow

    try:
        configs = Path(_active(ConfigWorkflow).config_root_path).resolve()
    except RuntimeError:
        return "."
    return str(configs.parent if configs.name == "configs" else configs)


def active_config_parser():
    """The ``monai.bundle.ConfigParser`` resolving the running bundle config (found on the call stack)."""
    from monai.bundle import ConfigParser

    return _active(ConfigParser)


def _ids(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every ``a#b#c`` id of nested dicts with its content (list items are not descended into)."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{prefix}#{key}" if prefix else str(key)
            yield child, value
            yield from _ids(value, child)


def check_config_keys() -> None:
    """Refuse config ids that no file of the bundle defines, e.g. the typo ``--epoch 5`` for ``--epochs``.

    MONAI's parser adds unknown command-line keys silently, so a mistyped hyper-parameter would be ignored.
    The known ids are those of every ``*.json`` in the folder of the first config file (the bundle's configs).
    Called from the start of the configs' ``run``; raises :class:`~pipeline.errors.InputError`.
    """
    from monai.bundle import ConfigWorkflow

    workflow = _active(ConfigWorkflow)
    known, values = {"_meta_"}, {"_meta_"}  # values: ids whose content is a value (e.g. null), not a config dict
    known |= MONAI_TRACKING_KEYS  # what `--tracking mlflow` adds (see defer_monai_tracking)
    values |= MONAI_TRACKING_KEYS
    for path in Path(workflow.config_root_path).glob("*.json"):
        for key, content in _ids(json.loads(path.read_text())):
            known.add(key)
            if not isinstance(content, dict):
                values.add(key)

    def defined(key: str) -> bool:  # known, or inside a value given on the command line (a dict for a null key)
        parts = key.split("#")
        return key in known or any("#".join(parts[:n]) in values for n in range(1, len(parts)))

    unknown = sorted(i for i, _ in _ids(active_config_parser().get()) if not defined(i))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise InputError(
            f"unknown config key(s): {', '.join(hints)}; no config of {workflow.config_root_path} "
            "defines them. Fix the --key on the command line."
        )


def _monai_tracking_keys() -> frozenset[str]:
    """The top-level config ids that MONAI's ``--tracking`` settings add (``is_not_rank0``, ...), not its handlers."""
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    return frozenset(
        key
        for settings in DEFAULT_EXP_MGMT_SETTINGS.values()
        for key in settings["configs"]
        if key not in settings["handlers_id"]
    )


MONAI_TRACKING_KEYS = _monai_tracking_keys()
MONAI_TRACKING_HANDLERS = ("MLFlowHandler", "monai.handlers.MLFlowHandler")


def defer_monai_tracking() -> None:
    """Let ``python -m monai.bundle run ... --tracking mlflow`` (MONAI's experiment tracking) run without logging twice.

    MONAI's ``--tracking`` appends its own ``MLFlowHandler`` to ``train#handlers`` and ``validate#handlers`` and adds
    a few top-level keys (accepted by :func:`check_config_keys`; the bundle's ``tracking_uri``, ``experiment_name``,
    ``run_name`` and ``output_dir`` are kept, and its ``save_execute_config`` is off: the executed config is already
    ``checkpoints/config.json``). The bundle's own MLflow run (:class:`~pipeline.tracking.runs.MLflowRunHandler`)
    already records all of it, with the nested runs, outage spool and model logging that MONAI's handler lacks, so
    MONAI's handlers are disabled here: one run per training, each value logged once. Called at the start of the
    configs' ``run``.
    """
    parser = active_config_parser()
    disabled = []
    for handlers_id in ("train#handlers", "validate#handlers", "handlers"):
        handlers = parser.get(handlers_id)
        if not isinstance(handlers, list):
            continue
        for i, handler in enumerate(handlers):
            if isinstance(handler, dict) and handler.get("_target_") in MONAI_TRACKING_HANDLERS:
                # in place, not `parser[id] = ...`: that resets the parser in the middle of resolving `run`
                handler["_disabled_"] = True
                disabled.append(f"{handlers_id}#{i}")
    if disabled:
        logger.info(
            "--tracking: this bundle's own MLflow run records the run; MONAI's MLFlowHandler (%s) is disabled so that "
            "nothing is logged twice",
            ", ".join(disabled),
        )


def start_distributed(distributed: bool, device: torch.device) -> None:
    """With ``distributed`` (``multi_gpu_train.json``, under ``torchrun``): join the process group (NCCL on CUDA,
    gloo on the CPU) and make ``device`` this process's CUDA device. Without it, nothing."""
    if not distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def stop_distributed(distributed: bool) -> None:
    """With ``distributed``: leave the process group. No final barrier: once training ends the other ranks have
    nothing left to do and leave, while rank 0 calibrates the model on the healthy subjects (minutes, or hours on a
    large cohort) with no collective pending that the group's timeout (NCCL: 10 min) could end; ``torchrun`` waits
    for every rank and fails the job if rank 0 fails."""
    import torch.distributed as dist

    if distributed and dist.is_initialized():
        dist.destroy_process_group()


def save_executed_config(path: str | os.PathLike) -> str:
    """Write the configuration being executed (all files merged, command-line overrides applied) as JSON, found
    from the running config expression (:func:`active_config_parser`). Called from a bundle config's ``run``;
    returns the path (for MLflow's artifacts)."""
    atomic_write_json(active_config_parser().get(), path)
    return str(path)


def check_matches_training(checkpoint: str | os.PathLike, keys: Sequence[str] = SCORING_KEYS) -> None:
    """Refuse to score with settings that differ from the training run's (its executed ``config.json`` next to
    ``checkpoint``).

    Preprocessing, network, likelihood and slice score must be those the checkpoint was trained with: overriding
    ``--normalization`` in training but not in evaluation would silently score differently normalised images, and a
    different ``--kl_weight`` a different ELBO. Nothing is checked for a checkpoint without that file.
    """
    trained = training_config(checkpoint)
    parser = active_config_parser()
    current = {k: parser.get_parsed_content(k) for k in keys if k in trained and k in parser}
    differ = [f"{k}={value!r} (trained with {trained[k]!r})" for k, value in current.items() if value != trained[k]]
    if differ:
        raise InputError(
            f"this run's settings differ from the training of {checkpoint} (recorded in "
            f"{Path(checkpoint).parent / EXECUTED_CONFIG}): {', '.join(differ)}; pass the training's "
            "values or leave them out, or use another checkpoint."
        )


USER_ERRORS = (
    InputError,
    FileNotFoundError,
    ConnectionError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    WriteError,
)


def _user_error(exc: BaseException | None) -> BaseException | None:
    """The first error in ``exc``'s cause chain that is the user's to fix (bad input, missing file, ...)."""
    return find_cause(exc, USER_ERRORS)


def _bundle_command_line() -> bool:
    """Whether the workflow runs under ``monai.bundle.run`` (``python -m monai.bundle run ...``), not under ``load``
    or ``create_workflow`` in a user's Python session."""
    from monai.bundle import scripts

    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is scripts.run.__code__:
            return True
        frame = frame.f_back
    return False


def install_error_hook() -> None:
    """Print user errors (bad input, missing files, unreachable tracking server) as one line, not a traceback.

    MONAI's bundle runner wraps every error raised inside a config expression in ``RuntimeError`` chains; this
    hook shows the original message with ``error:`` and exits with status 2. Other errors keep their traceback.
    Set ``CEVAE_TRACEBACK=1`` to always see the full traceback. Only in the ``monai.bundle`` command line: a
    Python session that builds the workflow (``monai.bundle.load``, ``create_workflow``) keeps its own hook.
    """
    if not _bundle_command_line():
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        cause = _user_error(value)
        if cause is None or os.environ.get("CEVAE_TRACEBACK"):
            previous(kind, value, tb)
            return
        hint = (
            "; check the path, or choose a writable --output_dir"
            if isinstance(cause, (PermissionError, NotADirectoryError, IsADirectoryError))
            else ""
        )
        print(f"error: {cause}{hint}", file=sys.stderr)
        sys.exit(2)

    sys.excepthook = hook
