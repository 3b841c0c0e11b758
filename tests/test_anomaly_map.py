"""The trained model as one module: its state_dict carries everything scoring needs, and its reference is never
written under another model's weights."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.errors import InputError
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.operating_point import OperatingPoint
from pipeline.scoring import OPTION_SETS, POSTPROCESSED

SMALL = {"channels": (8, 16, 32, 64), "z_dim": 16}
POINT = OperatingPoint("postprocessed", "rec", 0.99, 0.25, 27, 0.4)


def trained(tmp_path, seed=0, sigma=0.2):
    """A ``model.pt`` of a seeded network with a calibrated-looking loss, and a volume to score."""
    torch.manual_seed(seed)
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": CeVAE(**SMALL).state_dict(), "loss": CeVAELoss(sigma=sigma).state_dict()}, checkpoint)
    image = torch.rand(1, 64, 64, 6)
    brain = np.zeros((64, 64, 6), bool)
    brain[12:52, 10:54] = True
    return checkpoint, image * torch.as_tensor(brain), brain


def calibrated(checkpoint):
    """An AnomalyMap loaded from ``checkpoint`` with a healthy reference recorded (as training's calibration does)."""
    model = AnomalyMap(CeVAE(**SMALL), CeVAELoss()).load(checkpoint, reference="none")
    fitted = {"postprocessed": replace(POSTPROCESSED, grad_low=0.01, grad_high=0.5), "paper": OPTION_SETS["paper"]}
    thresholds = {c: {s: {"0.99": 0.25} for s in ("rec", "kl_grad", "combined", "intensity")} for c in fitted}
    model.record(fitted, healthy={"thresholds": thresholds, "synthetic": {"operating_point": POINT.to_dict()}})
    return model


def test_state_dict_is_the_whole_trained_model(tmp_path):
    """A fresh module of the same architecture, given only the state dict (saved and read back with
    ``weights_only=True``), computes the same maps with the same sigma, option sets, thresholds and operating point;
    negative control: without it, the maps, sigma and reference differ."""
    checkpoint, image, brain = trained(tmp_path)
    model = calibrated(checkpoint)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(5)
    fresh = AnomalyMap(CeVAE(**SMALL), CeVAELoss())
    _, before = AnomalyMap(fresh.network, CeVAELoss(sigma=0.2))(
        image, brain, {"paper": OPTION_SETS["paper"]}
    )  # its own weights
    assert fresh.operating_point is None and fresh.loss.sigma.item() == 0.0, "calibrated sigma not yet set"
    fresh.load_state_dict(state)
    fresh.eval()
    _, expected = model(image, brain)
    _, got = fresh(image, brain)
    assert fresh.loss.sigma.item() == pytest.approx(0.2)
    assert fresh.option_sets == model.option_sets and fresh.option_sets["postprocessed"].fitted
    assert fresh.operating_point == POINT
    assert fresh.threshold("postprocessed", "rec", 0.99) == (0.25, "healthy quantile 0.99")
    for config in expected:
        for score in expected[config]:
            np.testing.assert_allclose(got[config][score], expected[config][score], rtol=1e-5, atol=1e-7)
    assert not np.allclose(before["paper"]["rec"], expected["paper"]["rec"]), "negative control: other weights"


def test_reference_is_read_back_from_threshold_json(tmp_path):
    """``load`` restores what ``record`` wrote; a threshold.json of other weights is refused when required, ignored
    (option sets as configured) when optional."""
    checkpoint, _, _ = trained(tmp_path)
    calibrated(checkpoint)
    again = AnomalyMap(CeVAE(**SMALL), CeVAELoss()).load(checkpoint)
    assert again.operating_point == POINT and again.option_sets["postprocessed"].grad_high == 0.5
    trained(tmp_path, seed=1)  # other weights under the same name: the file no longer matches
    with pytest.raises(InputError, match="computed for another checkpoint"):
        AnomalyMap(CeVAE(**SMALL), CeVAELoss()).load(checkpoint)
    loose = AnomalyMap(CeVAE(**SMALL), CeVAELoss()).load(checkpoint, reference="optional")
    assert loose.operating_point is None and loose.option_sets == OPTION_SETS


def test_record_refuses_when_the_checkpoint_was_replaced_meanwhile(tmp_path):
    """Results computed with the weights loaded are never written under other weights (a training ``--overwrite``
    of the same folder while an evaluation scores): refused in one line, the file untouched; negative control: the
    same weights are written."""
    checkpoint, _, _ = trained(tmp_path)
    model = calibrated(checkpoint)
    path = checkpoint.parent / "threshold.json"
    model.record(calibrated={"eval": {"thresholds": {}}})
    assert "eval" in json.loads(path.read_text())["calibrated"]
    before = path.read_bytes()
    trained(tmp_path, seed=1)
    with pytest.raises(InputError, match="changed while it was being scored"):
        model.record(calibrated={"other": {"thresholds": {}}})
    assert path.read_bytes() == before
