"""Anomaly scores of the ceVAE, one place for all of them.

Slice score: the negative ELBO ``rec(x, g(mu(x))) + KL(q(z|x) || N(0, I))`` per slice, with the same per-sample
terms as the training loss (:mod:`pipeline.losses`); the reconstruction is decoded from the encoder mean, so the
score is deterministic.
"""

from __future__ import annotations

import torch

from pipeline.losses import kl_divergence, reconstruction_error

__all__ = ["elbo_terms"]


def _encoder_decoder(network: torch.nn.Module) -> torch.nn.Module:
    """The CeVAE inside an optional DDP/DataParallel wrapper."""
    return getattr(network, "module", network)


def elbo_terms(network: torch.nn.Module, x: torch.Tensor, reconstruction: str = "l2", sigma: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """Per-slice terms for a batch ``x`` ``(B, C, H, W)``.

    Returns ``recon`` ``(B, C, H, W)`` (decoded mean) and ``rec``, ``kl``, ``neg_elbo`` ``(B,)``.
    """
    net = _encoder_decoder(network)
    mu, logvar = net.encode(x)
    recon = net.decode(mu)
    rec = reconstruction_error(x, recon, reconstruction, sigma)
    kl = kl_divergence(mu, logvar)
    return {"recon": recon, "rec": rec, "kl": kl, "neg_elbo": rec + kl}
