"""The ceVAE objective (Zimmerer et al. 2019, Eq. 1) and its per-sample terms.

``L = (1 - ce_weight) * [kl_weight * KL(q(z|x) || N(0, I)) + rec(x, g(z))] + ce_weight * rec(x, g(mu(x~)))``

with ``z ~ q(z|x)`` sampled, ``x~`` the context-encoding-corrupted input, and the CE branch decoding the encoder
**mean** of ``x~`` and compared with the **clean** ``x``. Terms are summed over pixels and latent dimensions per
sample and averaged over the batch, so that ``rec + KL`` is the negative ELBO per slice (the ELBO-consistent
default). ``ce_weight = 0`` is the plain VAE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RECONSTRUCTIONS", "CeVAELoss", "kl_divergence", "reconstruction_error"]

RECONSTRUCTIONS = ("l2", "l1", "gaussian")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample: ``(B, Z)`` -> ``(B,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)


def reconstruction_error(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2", sigma: float = 1.0,
                         reduce: bool = True) -> torch.Tensor:
    """Per-pixel reconstruction term, summed per sample when ``reduce`` (``(B, C, H, W)`` -> ``(B,)``).

    ``"l2"``: squared error; ``"l1"``: absolute error; ``"gaussian"``: negative log-likelihood of ``x`` under
    ``N(recon, sigma^2)``.
    """
    diff = x - recon
    if kind == "l2":
        per_pixel = diff.pow(2)
    elif kind == "l1":
        per_pixel = diff.abs()
    elif kind == "gaussian":
        per_pixel = 0.5 * (diff / sigma).pow(2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}.")
    return per_pixel.flatten(1).sum(dim=1) if reduce else per_pixel


class CeVAELoss(nn.Module):
    """Eq. 1 of the paper. ``forward`` returns ``{"loss", "loss_rec", "loss_kl", "loss_ce"}`` (batch means).

    Args:
        ce_weight: ``lambda`` (0.5 default; 0 is the plain VAE, and callers then skip the CE pass).
        kl_weight: ``beta``, the weight of the KL term (1 in the paper).
        reconstruction: ``"l2"`` (default), ``"l1"`` or ``"gaussian"``.
        sigma: standard deviation of the Gaussian likelihood.
    """

    def __init__(self, ce_weight: float = 0.5, kl_weight: float = 1.0, reconstruction: str = "l2",
                 sigma: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}.")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}.")
        self.ce_weight, self.kl_weight, self.reconstruction, self.sigma = ce_weight, kl_weight, reconstruction, sigma

    def rec(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction term ``(B,)``."""
        return reconstruction_error(x, recon, self.reconstruction, self.sigma)

    def forward(self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                recon_ce: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rec = self.rec(x, recon).mean()
        kl = kl_divergence(mu, logvar).mean()
        loss = (1.0 - self.ce_weight) * (self.kl_weight * kl + rec)
        if recon_ce is not None:
            ce = self.rec(x, recon_ce).mean()
            loss = loss + self.ce_weight * ce
        elif self.ce_weight > 0:
            raise ValueError("ce_weight > 0 needs the CE reconstruction recon_ce.")
        else:
            ce = torch.zeros_like(rec)
        return {"loss": loss, "loss_rec": rec, "loss_kl": kl, "loss_ce": ce}
