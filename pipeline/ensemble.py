"""Seed ensembles: several trained runs of one architecture scored as one :class:`~pipeline.anomaly_map.AnomalyMap`.

An ensemble lives in a folder like a training run's ``checkpoints/``:

* ``ensemble.json``, the manifest, stands where a ``model.pt`` would (``--ckpt .../ensemble.json``): every member's
  ``model.pt`` with its SHA-256 (a member that changed afterwards is refused when the ensemble is loaded);
* ``config.json``: the members' training config (they agree on every scoring setting, :data:`EVALUATION_KEYS`), so
  evaluation and inference check their settings against it as for one model;
* ``threshold.json``: the ensemble's **own** healthy reference (healthy constants, normative references, thresholds,
  the operating point), bound to the manifest's SHA-256 as a model's is to its weights, and fitted by the usual
  label-free calibration on the ensemble's maps of healthy validation subjects; nothing is taken from the members'.

Scores: for every batch of slices the members' raw scores are averaged (the reconstructions, the ``|dKL/dx|`` maps,
the ELBO terms; the posterior means are kept side by side), and every option set's maps are made from these averages
as for one model: the residual is that of the members' mean reconstruction, the ensemble's estimate of the healthy
image. An ensemble of identical members scores as each of them (tested).

Its healthy subjects must be held out by **every** member: a subject one member trained on reconstructs too well,
and thresholds fitted on it would be too low. :func:`write_ensemble` checks it against the subjects each member was
calibrated on (its ``threshold.json``); members trained with different seeds split a datalist differently, so train
them on a datalist with a ``validation`` list.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.errors import InputError, read_json
from pipeline.io import atomic_write_json
from pipeline.run_record import EVALUATION_KEYS, EXECUTED_CONFIG, training_config
from pipeline.scoring import kl_gradient, raw_scores
from pipeline.thresholds import checkpoint_sha256, read_thresholds
from pipeline.weights import load_trained

__all__ = ["MANIFEST_FILENAME", "AnomalyEnsemble", "anomaly_map_for", "is_ensemble", "write_ensemble"]

MANIFEST_FILENAME = "ensemble.json"


def is_ensemble(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` names an ensemble's manifest rather than one model's weights."""
    return Path(checkpoint).name == MANIFEST_FILENAME


def _members(manifest: str | os.PathLike) -> list[dict]:
    content = read_json(manifest, "make the ensemble anew (--ensemble with a new --output_dir).", what="the ensemble")
    members = content.get("members") if isinstance(content, dict) else None
    if not members or not all(isinstance(m, dict) and {"checkpoint", "sha256"} <= set(m) for m in members):
        raise InputError(
            f"{manifest} lists no members with their checkpoint and sha256; make the ensemble anew "
            "(--ensemble with a new --output_dir)."
        )
    return members


class AnomalyEnsemble(AnomalyMap):
    """The :class:`~pipeline.anomaly_map.AnomalyMap` of several trained members (the module docstring).

    Args:
        networks, losses: one network and one loss per member, of one architecture (their weights and likelihoods
            come from :meth:`load`).
        option_sets, batch_size, device: as for :class:`~pipeline.anomaly_map.AnomalyMap`.

    ``network`` and ``loss`` are ``ModuleList``s, so ``state_dict()`` holds every member and the shared reference.
    ``model(image, brainmask)`` returns what one model's does; ``terms["mu"]`` is ``(D, members * Z)``.
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        losses: Sequence[torch.nn.Module],
        option_sets: Mapping | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        if not networks or len(networks) != len(losses):
            raise ValueError(f"an ensemble needs one loss per network, got {len(networks)} and {len(losses)}.")
        networks = [getattr(n, "module", n) for n in networks]
        super().__init__(torch.nn.ModuleList(networks), torch.nn.ModuleList(losses), option_sets, batch_size, device)

    @classmethod
    def like(cls, model: AnomalyMap, members: int) -> AnomalyEnsemble:
        """An ensemble of ``members`` copies of ``model``'s (untrained) network and loss, with its option sets."""
        return cls(
            [copy.deepcopy(model.network) for _ in range(members)],
            [copy.deepcopy(model.loss) for _ in range(members)],
            model.option_sets,
            model.batch_size,
            model.device,
        )

    def _load_weights(self, checkpoint: str | os.PathLike) -> None:
        members = _members(checkpoint)
        if len(members) != len(self.network):
            raise InputError(f"{checkpoint} lists {len(members)} members, this ensemble has {len(self.network)}.")
        for member, network, loss in zip(members, self.network, self.loss):
            if checkpoint_sha256(member["checkpoint"]) != member["sha256"]:
                raise InputError(
                    f"{member['checkpoint']} changed since the ensemble {checkpoint} was made (its SHA-256 differs): "
                    "its thresholds were fitted on other weights; make the ensemble anew in a new --output_dir."
                )
            load_trained(member["checkpoint"], network, loss, self.device)

    def raw_scores(
        self, x: torch.Tensor, inpaint_tiles: Sequence[int] = (), posterior_samples: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """The members' :func:`pipeline.scoring.raw_scores` of ``x`` averaged (their posterior means and predictive
        spreads too); ``mu`` side by side."""
        raws = [
            raw_scores(network, x, loss, inpaint_tiles, posterior_samples)
            for network, loss in zip(self.network, self.loss)
        ]
        mean = {key: torch.stack([raw[key] for raw in raws]).mean(0) for key in raws[0] if key != "mu"}
        return {**mean, "mu": torch.cat([raw["mu"] for raw in raws], dim=1)}

    def kl_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The members' ``|dKL/dx|`` of ``x`` averaged (the ``kl_grad`` of :meth:`raw_scores`)."""
        return torch.stack([kl_gradient(network, x) for network in self.network]).mean(0)


def anomaly_map_for(model: AnomalyMap, checkpoint: str | os.PathLike) -> AnomalyMap:
    """``model`` for one model's ``checkpoint``; for an ensemble's manifest, an :class:`AnomalyEnsemble` of as many
    copies of it as the manifest lists (what the bundle's evaluation and inference load)."""
    return AnomalyEnsemble.like(model, len(_members(checkpoint))) if is_ensemble(checkpoint) else model


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def write_ensemble(ckpt_dir: str | os.PathLike, runs: Sequence[str | os.PathLike], healthy: Sequence[dict]) -> Path:
    """Make (or find) the ensemble of the training runs ``runs`` in ``ckpt_dir`` and return its manifest.

    Refused in one line: fewer than two runs, a run without ``checkpoints/model.pt``, members trained with other
    scoring settings (:data:`EVALUATION_KEYS` of their ``config.json``), a ``healthy`` subject (the validation
    entries the ensemble will be calibrated on) that a member did not hold out, and a ``ckpt_dir`` that holds
    another ensemble or a training run (their thresholds and config would be silently replaced). The same members
    again: the manifest is kept, with the ``threshold.json`` fitted for it."""
    if len(runs) < 2:
        raise InputError(f"--ensemble needs at least two training runs, got {list(map(str, runs))}.")
    members, configs = [], []
    for run in runs:
        checkpoint = Path(run) / "checkpoints" / "model.pt"
        if not checkpoint.is_file():
            raise InputError(f"--ensemble: {run} has no {checkpoint.relative_to(run)}; give training output folders.")
        digest = checkpoint_sha256(checkpoint)
        _check_held_out(checkpoint, digest, healthy)
        members.append({"run": str(run), "checkpoint": str(checkpoint.resolve()), "sha256": digest})
        configs.append(training_config(checkpoint))
    for run, config in zip(runs[1:], configs[1:]):
        differ = [k for k in EVALUATION_KEYS if config.get(k) != configs[0].get(k)]
        if differ:
            raise InputError(
                f"--ensemble: {run} was trained with other {', '.join(differ)} than {runs[0]}; an ensemble's members "
                "share every scoring setting."
            )
    folder = Path(ckpt_dir)
    manifest = folder / MANIFEST_FILENAME
    content = {"members": members}
    if manifest.is_file():
        if _members(manifest) != members:
            raise InputError(f"{manifest} holds another ensemble; choose another --output_dir.")
        return manifest
    taken = [name for name in ("model.pt", EXECUTED_CONFIG) if (folder / name).exists()]
    if taken:
        raise InputError(f"{folder} holds a training run ({taken[0]}); give the ensemble another --output_dir.")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(configs[0], folder / EXECUTED_CONFIG)
    atomic_write_json(content, manifest)
    return manifest


def _check_held_out(checkpoint: Path, digest: str, healthy: Sequence[dict]) -> None:
    held_out = read_thresholds(checkpoint, digest).get("healthy", {}).get("subjects")
    if held_out is None:
        raise InputError(f"--ensemble: {checkpoint} has no healthy validation subjects in its threshold.json.")
    seen = [str(e["image"]) for e in healthy if not any(_same_file(e["image"], h) for h in held_out)]
    if seen:
        raise InputError(
            f"--ensemble: {seen[0]} is a healthy validation subject here but {checkpoint} was not validated on it "
            "(it may have trained on it); train every member on one split (a datalist with a 'validation' list)."
        )
