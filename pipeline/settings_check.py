"""Range checks of the training's numeric settings, before anything is built: a value out of range stops the run in
one line naming the setting, the value and a valid example (the network, loss and loaders would raise their own
``ValueError`` later, deep in a MONAI traceback, or not at all: ``epochs`` 0 trains nothing and exits 0)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from pipeline.data.augmentation import AUGMENT_CHOICES
from pipeline.errors import InputError
from pipeline.networks.cevae import downsampling_layers

__all__ = ["RULES", "check_settings"]


Rule = tuple[Callable[[object], bool], str, str]  # (valid?, what it must be, an example of a valid value)


def _whole(minimum: int, example: str) -> Rule:
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
        f"a whole number >= {minimum}",
        example,
    )


def _number(ok: Callable[[float], bool], text: str, example: str) -> Rule:
    return (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v),
        f"a finite number {text}",
        example,
    )


def _image_size(value: object) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    try:
        downsampling_layers(value)
    except ValueError:
        return False
    return True


# setting -> (valid?, what it must be, an example of a valid value: the bundle's default)
RULES: dict[str, Rule] = {
    "epochs": _whole(1, "150"),
    "batch_size": _whole(1, "64"),
    "z_dim": _whole(1, "256"),
    "context_slices": _whole(0, "0"),
    "seed": _whole(0, "0"),
    "border_slices": _whole(0, "0"),
    "image_size": (
        _image_size,
        "a whole number >= 8 divisible by the network's downsampling (64, 128, 192, 256)",
        "64",
    ),
    "lr": _number(lambda v: v > 0, "> 0", "2e-4"),
    "kl_weight": _number(lambda v: v >= 0, ">= 0", "1.0"),
    "ce_weight": _number(lambda v: 0 <= v <= 1, "in [0, 1]", "0.5"),
    "val_fraction": _number(lambda v: 0 <= v < 1, "in [0, 1)", "0.1"),
    "min_brain_fraction": _number(lambda v: 0 <= v <= 1, "in [0, 1]", "0.1"),
    "augment": (lambda v: v in AUGMENT_CHOICES, f"one of {', '.join(AUGMENT_CHOICES)}", "none"),
    "synthetic_volumes": _whole(1, "32"),
}


def check_settings(values: Mapping[str, object]) -> None:
    """Raise :class:`InputError` for the first setting of ``values`` (the bundle's ``hyper_parameters``) that breaks
    its rule in :data:`RULES`; settings without a rule are not checked here."""
    for key, (valid, must_be, example) in RULES.items():
        if key in values and not valid(values[key]):
            raise InputError(f"--{key} must be {must_be}, got {values[key]!r}; e.g. --{key} {example}.")
