"""The scoring knobs of one option set, :class:`ScoreOptions`, and the option sets reported side by side
(:data:`OPTION_SETS`); what each does is described in :mod:`pipeline.scoring`, which applies them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["AUTHORS", "GRAD_NORMALIZATIONS", "NORMATIVE", "OPTION_SETS", "PAPER", "POSTPROCESSED", "ScoreOptions"]

GRAD_NORMALIZATIONS = ("none", "slice", "volume", "healthy")


@dataclass(frozen=True)
class ScoreOptions:
    """Scoring knobs, each documented and off by default.

    Args:
        positive_residuals: ``rec = max(x - recon, 0)`` (lesions brighter than expected only) instead of ``|x - recon|``.
        grad_normalization: min-max normalise the KL-gradient map before smoothing: ``"none"``, ``"slice"`` (each
            slice on its own), ``"volume"`` (over each volume's slices; the deterministic form of the authors'
            per-batch normalisation) or ``"healthy"`` (``(g - grad_low) / (grad_high - grad_low)`` with constants
            from the healthy validation volumes, :func:`pipeline.healthy.fit_grad_normalization`: the same scale
            for every test volume, so that a large lesion does not scale its own map down).
        grad_low, grad_high: the healthy constants of ``"healthy"`` (None until fitted; stored in
            ``threshold.json`` with the option set).
        grad_sigma: Gaussian smoothing (sigma in pixels) of the KL-gradient map (0 = off); the authors' code uses 3.
        grad_kernel: side of the smoothing kernel in pixels (the authors' code: 7).
        brain_mask: multiply every map by the brain mask.
        mask_erosion: erode the brain mask by this many voxels first (suppresses the brain-border rim).
        median_size: size of a 3D median filter applied to each map volume (0 = off; 5 in Baur et al.).
        min_component_size: in segmentations, remove 3D connected components smaller than this (0 = off).
        equalize_intensity: histogram-equalise the ``intensity`` baseline inside each volume's brain (its values
            become their brain-voxel quantiles), the usual strong thresholding baseline.
        normative: replace the ``rec``, ``kl_grad`` and ``combined`` maps by their deviation from the healthy
            validation maps at the same place in units of their spread (:mod:`pipeline.normative`), before the
            volume-level options.
        normative_reference: the healthy means and spreads of ``normative`` (None until fitted,
            :func:`pipeline.healthy.fit_normative`): ``{score: NormativeReference.to_dict()}``.
        inpaint_tile: side in pixels of the tiles of :func:`inpainted` (0 = off): ``rec`` (and ``combined``) then
            measure ``x`` against the reconstruction of each tile from its context with the tile itself replaced by
            noise, as the ceVAE's context-encoding branch was trained to, instead of against ``g(mu(x))``; an
            anomaly cannot be copied through from the input. A multiple of 2; 8 network passes per slice.
        posterior_samples: ``K`` reconstructions decoded from the posterior (0 = off, else at least 2): ``rec`` (and
            ``combined``) then measure ``x`` against their mean in units of their predictive spread,
            ``|x - mean_k g(z_k)| / sqrt(var_k g(z_k) + sigma^2)`` (:mod:`pipeline.posterior`; Behrendt et al.
            2024), instead of ``|x - g(mu(x))|``. ``K`` decoder passes per slice; needs the Gaussian likelihood.
    """

    positive_residuals: bool = False
    grad_normalization: str = "none"
    grad_sigma: float = 0.0
    grad_kernel: int = 7
    brain_mask: bool = False
    mask_erosion: int = 0
    median_size: int = 0
    min_component_size: int = 0
    equalize_intensity: bool = False
    normative: bool = False
    grad_low: float | None = None
    grad_high: float | None = None
    normative_reference: dict | None = None
    inpaint_tile: int = 0
    posterior_samples: int = 0

    def __post_init__(self) -> None:
        if self.inpaint_tile < 0 or self.inpaint_tile % 2:
            raise ValueError(f"inpaint_tile must be 0 (off) or a positive even number, got {self.inpaint_tile}.")
        if self.posterior_samples < 0 or self.posterior_samples == 1:
            raise ValueError(f"posterior_samples must be 0 (off) or at least 2, got {self.posterior_samples}.")
        if self.posterior_samples and self.inpaint_tile:
            raise ValueError("an option set measures rec against one image: set inpaint_tile or posterior_samples.")
        if self.grad_normalization not in GRAD_NORMALIZATIONS:
            raise ValueError(
                f"grad_normalization must be one of {GRAD_NORMALIZATIONS}, got " f"{self.grad_normalization!r}."
            )
        if self.grad_fitted and not self.grad_high > self.grad_low:
            raise ValueError(f"grad_high must exceed grad_low, got {self.grad_low} and {self.grad_high}.")

    @property
    def grad_fitted(self) -> bool:
        """Whether the healthy constants of ``"healthy"`` KL-gradient normalisation are set."""
        return self.grad_low is not None and self.grad_high is not None

    @property
    def fitted(self) -> bool:
        """Whether every healthy constant these options need is set."""
        grad = self.grad_normalization != "healthy" or self.grad_fitted
        return grad and (not self.normative or self.normative_reference is not None)

    @property
    def test_volume_scaled(self) -> bool:
        """Whether the ``kl_grad`` and ``combined`` maps are scaled by the scored data itself (``"slice"``,
        ``"volume"``): a threshold from healthy data does not transfer to them."""
        return self.grad_normalization in ("slice", "volume")

    def unfitted(self) -> ScoreOptions:
        """These knobs without the healthy constants (what a config states)."""
        return replace(self, grad_low=None, grad_high=None, normative_reference=None)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """:meth:`to_dict` without the normative reference's arrays (what a report shows)."""
        return {**self.to_dict(), "normative_reference": self.normative_reference is not None}


PAPER = ScoreOptions()
AUTHORS = ScoreOptions(grad_normalization="volume", grad_sigma=3.0, grad_kernel=7)
POSTPROCESSED = replace(
    AUTHORS, grad_normalization="healthy", brain_mask=True, mask_erosion=1, median_size=5, min_component_size=7
)
NORMATIVE = replace(POSTPROCESSED, normative=True)
OPTION_SETS = {"paper": PAPER, "authors": AUTHORS, "postprocessed": POSTPROCESSED, "normative": NORMATIVE}
