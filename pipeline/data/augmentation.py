"""Training augmentation of healthy slices: the variation between subjects and scanners that a small healthy cohort
does not show, so that the decoder learns to follow the subject instead of drawing one mean brain.

Per slice, each with its own draw:

* **left-right flip** with probability ``flip_prob`` (brains are close to mirror-symmetric; the left and right of
  one subject are two plausible hemispheres);
* **in-plane rotation** uniform in ``+-rotate`` radians and **isotropic scaling** uniform in ``scale``, applied
  together with probability ``spatial_prob`` (head pose: in-plane poses in the scanner vary by several degrees;
  the scale is small, +-5 %, because preprocessing crops every brain to its own box, which removes head size, and
  leaves only how the box fits a brain turned by a few degrees);
* **gamma** ``x' = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g`` with ``log g`` uniform in ``+-log(gamma)``, on each
  slice's own range ``[lo, hi]`` (MONAI's ``RandAdjustContrast`` does the same), with probability ``intensity_prob``
  (contrast differences between scanners and sequence parameters);
* **bias field** ``x' = lo + (x - lo) * exp(sum_ij c_ij P_i(u) P_j(v))``, Legendre polynomials of degree up to
  ``bias_degree`` over the slice, coefficients uniform in ``+-bias_coefficient`` (MONAI's ``RandBiasField``: degree
  3, coefficients in [0, 0.1]), with probability ``intensity_prob`` (receive-coil inhomogeneity left after
  correction), then rescaled to the slice's former maximum, as the intensity normalisation of real scans would.

Every operation keeps the slice's minimum (the background) where it is, so it suits every intensity normalisation
(``percentile``, ``zscore``, ``equalize``). Elastic deformation is left out: it costs a second resampling per slice
and distorts the anatomy whose normal shape the model is meant to learn.

:class:`SliceAugmentation` works on a whole ``(B, C, H, W)`` batch on its device with one ``affine_grid`` /
``grid_sample`` call (MONAI's random transforms take one image at a time: a Python loop over the batch's 64 slices
would cost more than the training step's convolutions on CPU). The trainer applies it to every training batch before
the context-encoding noise, drawing from torch's global RNG (saved in every ``last.pt``, so a resumed run draws
what an uninterrupted one would).

Off by default (``augment: "none"``; ``--augment standard`` or ``configs/augment.json`` turns it on): on IXI T1 ->
BraTS2013 T1c, 60 epochs, 3 seeds, it lowered the synthetic-lesion Dice of the operating point in every seed (0.356 ±
0.090 against 0.389 ± 0.068) and left the healthy reconstruction error against the mean brain unchanged (0.567 against
0.572), the two label-free measures the defaults are chosen by (docs/benchmarks.md, "Training augmentation").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_CHOICES", "SliceAugmentation", "slice_augmentation"]

AUGMENT_CHOICES = ("none", "standard")


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _legendre(degree: int, t: torch.Tensor) -> list[torch.Tensor]:
    """Legendre polynomials ``P_0 .. P_degree`` at ``t`` in [-1, 1] (Bonnet's recursion)."""
    values = [torch.ones_like(t), t]
    for n in range(1, degree):
        values.append(((2 * n + 1) * t * values[n] - n * values[n - 1]) / (n + 1))
    return values[: degree + 1]


@dataclass(frozen=True)
class SliceAugmentation:
    """Random flips, rotations, scalings, gamma and bias fields of a batch of slices (see the module docstring).

    Args:
        flip_prob: probability of a left-right flip (along ``H``, the R-L axis of the RAS-oriented slices).
        spatial_prob: probability of a rotation with scaling.
        rotate: largest rotation, radians.
        scale: range of the isotropic scale factor.
        intensity_prob: probability of each of gamma and bias field.
        gamma: largest gamma factor (the exponent is log-uniform in ``[1 / gamma, gamma]``).
        bias_degree, bias_coefficient: the bias field's Legendre degree and largest coefficient.
    """

    flip_prob: float = 0.5
    spatial_prob: float = 0.5
    rotate: float = math.radians(10.0)
    scale: tuple[float, float] = (0.95, 1.05)
    intensity_prob: float = 0.5
    gamma: float = 1.25
    bias_degree: int = 3
    bias_coefficient: float = 0.1

    def __post_init__(self) -> None:
        for name in ("flip_prob", "spatial_prob", "intensity_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if not (0.0 < self.scale[0] <= self.scale[1]) or self.rotate < 0 or self.gamma < 1 or self.bias_degree < 0:
            raise ValueError(
                f"need 0 < scale[0] <= scale[1], rotate >= 0, gamma >= 1, bias_degree >= 0; got scale {self.scale}, "
                f"rotate {self.rotate}, gamma {self.gamma}, bias_degree {self.bias_degree}."
            )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a ``(B, C, H, W)`` batch (global RNG if ``generator`` is None); returns a new tensor like ``x``."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
        b, device = x.shape[0], x.device
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        out = self._spatial(x - lo, generator)
        hi = out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        on = (torch.rand(b, generator=generator, device=device) < self.intensity_prob).view(b, 1, 1, 1)
        log_g = _uniform(-math.log(self.gamma), math.log(self.gamma), b, generator, device).view(b, 1, 1, 1)
        gamma = torch.where(on, log_g.exp(), torch.ones_like(log_g))
        out = hi * (out / hi).clamp_min(0).pow(gamma.to(x.dtype))
        out = out * self._bias_field(x, generator)
        out = out * (hi / out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8))  # the range preprocessing gives
        return out + lo

    def _spatial(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Flip, rotate and scale ``x`` (background 0) with one ``grid_sample``; slices drawn without a spatial
        change are copied exactly (no resampling blur)."""
        b, device = x.shape[0], x.device
        flip = torch.rand(b, generator=generator, device=device) < self.flip_prob
        moved = torch.rand(b, generator=generator, device=device) < self.spatial_prob
        angle = torch.where(
            moved, _uniform(-self.rotate, self.rotate, b, generator, device), torch.zeros(b, device=device)
        )
        zoom = torch.where(moved, _uniform(*self.scale, b, generator, device), torch.ones(b, device=device))
        out = torch.where(flip.view(b, 1, 1, 1), x.flip(-2), x)
        if not bool(moved.any()):
            return out
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output pixel -> input pixel: inverse scale
        theta = torch.stack([torch.stack([cos, -sin, 0 * cos], 1), torch.stack([sin, cos, 0 * cos], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        resampled = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(moved.view(b, 1, 1, 1), resampled, out)

    def _bias_field(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``(B, 1, H, W)`` multiplicative fields, 1 for slices drawn without one."""
        b, _, h, w = x.shape
        device = x.device
        terms = [
            (i, j) for i in range(self.bias_degree + 1) for j in range(self.bias_degree + 1 - i)
        ]  # total degree <= bias_degree, as MONAI's RandBiasField
        pu = _legendre(self.bias_degree, torch.linspace(-1, 1, h, device=device))
        pv = _legendre(self.bias_degree, torch.linspace(-1, 1, w, device=device))
        basis = torch.stack([pu[i][:, None] * pv[j][None, :] for i, j in terms])  # (T, H, W)
        coefficients = _uniform(-self.bias_coefficient, self.bias_coefficient, b * len(terms), generator, device)
        field = torch.einsum("bt,thw->bhw", coefficients.view(b, len(terms)), basis).exp()[:, None]
        on = (torch.rand(b, generator=generator, device=device) < self.intensity_prob).view(b, 1, 1, 1)
        return torch.where(on, field, torch.ones_like(field)).to(x.dtype)


def slice_augmentation(augment: str) -> SliceAugmentation | None:
    """The augmentation a training config names: ``"none"`` (the slices as they are; the bundle's default, chosen by
    the synthetic-lesion Dice on healthy data, docs/benchmarks.md) or ``"standard"`` (:class:`SliceAugmentation`'s
    documented ranges)."""
    if augment not in AUGMENT_CHOICES:
        raise ValueError(f"augment must be one of {AUGMENT_CHOICES}, got {augment!r}.")
    return SliceAugmentation() if augment == "standard" else None
