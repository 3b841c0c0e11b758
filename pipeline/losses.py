"""The ceVAE objective (Zimmerer et al. 2019, Eq. 1) and its per-sample terms.

``L = (1 - ce_weight) * [kl_weight * KL(q(z|x) || N(0, I)) + rec(x, g(z))] + ce_weight * rec(x, g(mu(x~)))``

with ``z ~ q(z|x)`` sampled, ``x~`` the context-encoding-corrupted input, and the CE branch decoding the encoder
**mean** of ``x~`` and compared with the **clean** ``x``. Terms are summed over pixels and latent dimensions per
sample and averaged over the batch, so that ``rec + KL`` is the negative ELBO per slice. ``ce_weight = 0`` is the
plain VAE.

The likelihood scale decides what the decoder learns. With ``rec`` the summed squared error (``"l2"``) on [0, 1]
intensities and ``kl_weight`` 1, the objective is a Gaussian likelihood of ``sigma = sqrt(1/2) = 0.71``, several
times the brain's intensity spread, and the decoder outputs little more than a mean brain. The default is a
**calibrated decoder** (Rybkin, Daniilidis, Levine, ICML 2021, "optimal sigma-VAE"): a Gaussian likelihood whose
variance is its maximum-likelihood value, the current mean squared error, so there is no weight to tune; the
converged ``sigma`` is kept (a buffer of the loss, saved with every checkpoint) and fixed for scoring.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CALIBRATED", "RECONSTRUCTIONS", "CeVAELoss", "kl_divergence", "reconstruction_error"]

RECONSTRUCTIONS = ("l2", "l1", "gaussian")
CALIBRATED = "calibrated"
MIN_SIGMA = 1e-3  # floor of the calibrated sigma: 0.1 % of the [0, 1] intensity range (Rybkin et al. clip at e^-6)


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process of a running ``torch.distributed`` group (each process's batch is
    one shard of the global batch: the calibrated sigma is then the global batch's, equal on every rank, and so is the
    objective that DDP averages); the local mean without a group. Only training batches (the loss in ``train()`` mode)
    call it: every rank runs those in step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values.mean()
    total = torch.stack([values.sum(dtype=torch.float32), torch.tensor(float(values.numel()), device=values.device)])
    torch.distributed.all_reduce(total)
    return total[0] / total[1]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample: ``(B, Z)`` -> ``(B,)``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=1)


def reconstruction_error(
    x: torch.Tensor, recon: torch.Tensor, kind: str = "l2", sigma: float | torch.Tensor = 1.0, reduce: bool = True
) -> torch.Tensor:
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
        sigma = torch.as_tensor(sigma, dtype=diff.dtype, device=diff.device)
        per_pixel = 0.5 * (diff / sigma).pow(2) + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}.")
    return per_pixel.flatten(1).sum(dim=1) if reduce else per_pixel


class CeVAELoss(nn.Module):
    """Eq. 1 of the paper, and the per-slice negative ELBO that scores slices with the same terms.

    ``forward`` (training) returns ``{"loss", "loss_rec", "loss_kl", "loss_ce", "sigma"}`` (batch means);
    :meth:`terms` (validation, scoring) returns the per-sample ``rec``, ``kl`` and ``neg_elbo``.

    Args:
        ce_weight: ``lambda`` (0.5 default; 0 is the plain VAE, and callers then skip the CE pass).
        kl_weight: ``beta``, the weight of the KL term (1: the ELBO).
        reconstruction: ``"gaussian"`` (default), ``"l2"`` or ``"l1"``.
        sigma: standard deviation of the Gaussian likelihood, or ``"calibrated"`` (default): in training, each
            batch's maximum-likelihood value ``sigma^2 = mean squared error`` of the VAE branch (detached; at this
            optimum the gradient through sigma vanishes anyway), and a running mean of it (momentum
            ``sigma_momentum``) kept in the buffer ``sigma`` for validation and scoring.
        sigma_momentum: weight of the newest batch in the running ``sigma``.

    The buffer ``sigma`` (a scalar tensor; the fixed value, or the running calibrated one) is the loss's only state;
    it travels in checkpoints under ``"loss"`` so that a model is scored with the likelihood it was trained with.
    """

    def __init__(
        self,
        ce_weight: float = 0.5,
        kl_weight: float = 1.0,
        reconstruction: str = "gaussian",
        sigma: float | str = CALIBRATED,
        sigma_momentum: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0.0 <= ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}.")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}.")
        if not (sigma == CALIBRATED or (isinstance(sigma, (int, float)) and sigma > 0)):
            raise ValueError(f"sigma must be a positive number or {CALIBRATED!r}, got {sigma!r}.")
        self.calibrated = sigma == CALIBRATED and reconstruction == "gaussian"  # sigma is unused by l2 and l1
        if not 0.0 < sigma_momentum <= 1.0:
            raise ValueError(f"sigma_momentum must be in (0, 1], got {sigma_momentum}.")
        self.ce_weight, self.kl_weight, self.reconstruction = ce_weight, kl_weight, reconstruction
        self.sigma_momentum = sigma_momentum
        # 0 until the first training batch calibrates it (a calibrated loss must not score before that)
        initial = 0.0 if self.calibrated else 1.0 if sigma == CALIBRATED else float(sigma)
        self.register_buffer("sigma", torch.tensor(initial))

    def extra_repr(self) -> str:
        sigma = f"calibrated ({float(self.sigma):.4g})" if self.calibrated else f"{float(self.sigma):g}"
        return (
            f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}, reconstruction={self.reconstruction!r}, "
            f"sigma={sigma}"
        )

    def scoring_sigma(self) -> torch.Tensor:
        """The sigma of validation and scoring; raises if a calibrated loss has never seen a training batch."""
        if float(self.sigma) <= 0:
            raise RuntimeError(
                "the calibrated sigma is not set: load the loss state of a trained checkpoint "
                "(its 'loss' entry) before scoring."
            )
        return self.sigma

    def rec(self, x: torch.Tensor, recon: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample reconstruction term ``(B,)`` (``sigma``: the scoring sigma unless given)."""
        if self.reconstruction == "gaussian" and sigma is None:
            sigma = self.scoring_sigma()
        return reconstruction_error(x, recon, self.reconstruction, 1.0 if sigma is None else sigma)

    def terms(
        self, x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-slice ``rec``, ``kl`` and ``neg_elbo = rec + kl_weight * kl``, each ``(B,)``: the VAE term of the
        training objective with the scoring sigma (``recon`` decoded from the mean for a deterministic score)."""
        rec = self.rec(x, recon)
        kl = kl_divergence(mu, logvar)
        return {"rec": rec, "kl": kl, "neg_elbo": rec + self.kl_weight * kl}

    def _training_sigma(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor | None:
        """The calibrated sigma of this batch (and the running value updated); None for a fixed likelihood."""
        if not self.calibrated:
            return None
        squares = (x - recon).detach().pow(2)
        batch = (_global_mean(squares) if self.training else squares.mean()).sqrt().clamp_min(MIN_SIGMA)
        if self.training:
            with torch.no_grad():
                first = float(self.sigma) <= 0
                self.sigma.copy_(batch if first else torch.lerp(self.sigma, batch, self.sigma_momentum))
        return batch

    def forward(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        recon_ce: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        sigma = self._training_sigma(x, recon)
        rec = self.rec(x, recon, sigma).mean()
        kl = kl_divergence(mu, logvar).mean()
        loss = (1.0 - self.ce_weight) * (self.kl_weight * kl + rec)
        if recon_ce is not None:
            ce = self.rec(x, recon_ce, sigma).mean()
            loss = loss + self.ce_weight * ce
        elif self.ce_weight > 0:
            raise ValueError("ce_weight > 0 needs the CE reconstruction recon_ce.")
        else:
            ce = torch.zeros_like(rec)
        used = self.sigma if sigma is None else sigma
        return {"loss": loss, "loss_rec": rec, "loss_kl": kl, "loss_ce": ce, "sigma": used.detach().clone()}
