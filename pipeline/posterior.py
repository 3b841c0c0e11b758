"""The posterior-sampling score's images: the mean and the predictive spread of several reconstructions of a slice.

``g(mu(x))`` is one guess of the healthy image; the posterior ``q(z|x)`` says how sure the encoder is of it. Decoding
``K`` latents ``z_k = mu + exp(logvar / 2) * eps_k`` gives ``K`` reconstructions; a pixel whose reconstructions agree
is one the model is sure of, and the same residual there counts for more than where they spread. The score is the
pixel-wise (diagonal) Mahalanobis distance of Behrendt et al. 2024 ("Leveraging the Mahalanobis Distance to enhance
Unsupervised Brain MRI Anomaly Detection", arXiv 2407.12474; there with diffusion models' reconstructions):

    ``rec = |x - mean_k g(z_k)| / sqrt(var_k g(z_k) + sigma^2)``

where ``sigma`` is the trained Gaussian likelihood's: the predictive distribution of a pixel under the model is the
mixture of ``N(g(z_k), sigma^2)``, whose variance is the two terms' sum. The likelihood's variance keeps the ratio
finite where the reconstructions agree exactly (a collapsed latent, the background) without a constant chosen by
hand. An option set with ``posterior_samples`` (:class:`pipeline.score_options.ScoreOptions`) scores so.

The ``eps_k`` are one fixed draw (seed 0), the same for every slice: a slice's score does not depend on its batch,
and two runs give the same maps.
"""

from __future__ import annotations

import torch

__all__ = ["posterior_moments"]


def posterior_moments(
    network: torch.nn.Module, mu: torch.Tensor, logvar: torch.Tensor, samples: int, sigma: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, spread)`` of ``samples`` reconstructions decoded from latents drawn from the posteriors ``N(mu,
    exp(logvar))`` (``(B, Z)`` each) of ``B`` slices, each ``(B, C, H, W)``: ``mean_k g(z_k)`` and
    ``sqrt(var_k g(z_k) + sigma^2)`` (population variance over the ``K`` draws; the module docstring).
    ``samples`` decoder passes of ``B`` slices."""
    if samples < 2:
        raise ValueError(f"posterior sampling needs at least 2 samples, got {samples}.")
    net = getattr(network, "module", network)  # inside an optional DDP/DataParallel wrapper
    eps = torch.randn((samples, mu.shape[1]), generator=torch.Generator().manual_seed(0)).to(mu)
    recons = torch.stack([net.decode(mu + torch.exp(0.5 * logvar) * draw) for draw in eps])  # (K, B, C, H, W)
    variance = recons.var(dim=0, unbiased=False)
    return recons.mean(dim=0), (variance + torch.as_tensor(sigma).to(recons) ** 2).sqrt()
