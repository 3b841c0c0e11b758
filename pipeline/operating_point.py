"""The label-free operating point of a trained model (:class:`OperatingPoint`): the map, threshold and minimum lesion
size inference segments with by default, chosen on synthetic lesions in the healthy validation volumes
(:mod:`pipeline.calibration`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from pipeline.score_options import ScoreOptions
from pipeline.thresholds import quantile_key

__all__ = ["DEFAULT_OPTION_SET", "DEFAULT_QUANTILE", "DEFAULT_SCORE", "OperatingPoint"]

# the segmentation rule of a model without a label-free operating point (an old checkpoint, or none was chosen)
DEFAULT_QUANTILE = 0.99
DEFAULT_OPTION_SET = "postprocessed"  # the paper's score with the authors' gradient smoothing and Baur et al.'s
DEFAULT_SCORE = "combined"  # post-processing: nothing in it was chosen on lesion labels


@dataclass(frozen=True)
class OperatingPoint:
    """A segmentation rule: threshold ``score`` of option set ``option_set`` at ``threshold`` (the healthy
    ``quantile``), remove components under ``min_component_size`` voxels; ``synthetic_dice`` is its Dice on the
    synthetic lesions it was chosen on."""

    option_set: str
    score: str
    quantile: float
    threshold: float
    min_component_size: int
    synthetic_dice: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: Mapping) -> OperatingPoint:
        return cls(**{name: entry[name] for name in cls.__dataclass_fields__})

    def options(self, option_set: ScoreOptions) -> ScoreOptions:
        """``option_set`` (the options of :attr:`option_set`) with this point's minimum component size."""
        return replace(option_set, min_component_size=int(self.min_component_size))

    def describe(self) -> str:
        return (
            f"{self.option_set}/{self.score} at healthy quantile {quantile_key(self.quantile)}, components >= "
            f"{self.min_component_size} voxels (synthetic-lesion Dice {self.synthetic_dice:.3f})"
        )
