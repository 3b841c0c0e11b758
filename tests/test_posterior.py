"""The posterior-sampling score: residuals in units of the spread of reconstructions from the posterior."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.losses import CeVAELoss
from pipeline.posterior import posterior_moments
from pipeline.scoring import PAPER, ScoreOptions


class LinearVAE(torch.nn.Module):
    """``mu`` = the mean of the slice's first rows, a fixed posterior spread, a linear decoder ``g(z) = W z + b``:
    the spread of ``g(z)`` under ``z ~ N(mu, s^2)`` is known in closed form, ``sqrt(sum_j W_ij^2 s_j^2)``."""

    def __init__(self, log_std: float, z_dim: int = 3) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.weight = torch.randn(64 * 64, z_dim, generator=generator)
        self.bias = torch.randn(64 * 64, generator=generator)
        self.log_std = torch.full((z_dim,), log_std)

    def encode(self, x):
        mu = x[:, 0, : self.weight.shape[1]].mean(-1)
        return mu, (2 * self.log_std).expand_as(mu)

    def decode(self, z):
        return (z @ self.weight.T + self.bias).view(z.shape[0], 1, 64, 64)


def test_the_spread_is_that_of_the_decoded_posterior_plus_the_likelihoods():
    """Against the closed form of a linear decoder (an independent reference): the mean of many draws is ``g(mu)`` and
    their spread ``sqrt(sum_j W_ij^2 s_j^2 + sigma^2)`` within sampling error; with a posterior of no spread every draw
    is ``g(mu)`` and the spread is the likelihood's ``sigma`` exactly. One fixed draw for every slice: a slice's
    moments do not depend on the others in its batch, and two calls agree."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 64, 64)
    network, sigma = LinearVAE(log_std=np.log(0.5)), 0.3
    mu, logvar = network.encode(x)
    mean, spread = posterior_moments(network, mu, logvar, 4000, sigma)
    expected = ((network.weight**2 * 0.25).sum(1) + sigma**2).sqrt().view(1, 1, 64, 64).expand_as(spread)
    torch.testing.assert_close(spread, expected, rtol=0.05, atol=0)
    assert (spread - expected).abs().max() > 1e-4  # sampled, not computed from the closed form
    torch.testing.assert_close(mean, network.decode(mu), rtol=0, atol=0.1)

    sure = LinearVAE(log_std=-40.0)
    mean, spread = posterior_moments(sure, *sure.encode(x), 8, sigma)
    torch.testing.assert_close(mean, sure.decode(sure.encode(x)[0]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(spread, torch.full_like(spread, sigma), rtol=1e-6, atol=0)

    alone = posterior_moments(network, *network.encode(x[1:2]), 8, sigma)
    batched = posterior_moments(network, *network.encode(x), 8, sigma)
    for one, many in zip(alone, batched):
        torch.testing.assert_close(one[0], many[1], rtol=0, atol=0)
    assert not torch.equal(batched[0][0], batched[0][1])  # the slices' own posteriors differ
    with pytest.raises(ValueError, match="at least 2"):
        posterior_moments(network, mu, logvar, 1, sigma)


def test_a_posterior_option_set_scores_residuals_in_units_of_the_spread():
    """``rec`` of an option set with ``posterior_samples`` is ``|x - mean| / spread`` of :func:`posterior_moments`
    under the loss's sigma (``combined`` that times the KL gradient), while the other option sets of the same pass keep
    ``|x - g(mu(x))|``; with a posterior of no spread it is the plain residual over sigma (an independent check of
    the wiring), and the images stay out of the returned terms. Invalid settings are refused."""
    rng = np.random.default_rng(0)
    brain = np.zeros((64, 64, 6), bool)
    brain[10:54, 12:52, 1:5] = True
    image = torch.from_numpy(rng.random((1, 64, 64, 6)) * brain).float()
    configs = {"paper": PAPER, "posterior": replace(PAPER, posterior_samples=6)}
    slices = image.permute(3, 0, 1, 2)

    network = LinearVAE(log_std=np.log(0.5))
    terms, maps = AnomalyMap(network, CeVAELoss(sigma=0.2), configs)(image, brain)
    mean, spread = posterior_moments(network, *network.encode(slices), 6, 0.2)
    expected = ((slices - mean).abs() / spread)[:, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(maps["posterior"]["rec"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps["posterior"]["combined"], expected * maps["paper"]["kl_grad"], rtol=1e-5, atol=1e-9)
    assert not np.allclose(maps["posterior"]["rec"], maps["paper"]["rec"] / 0.2, rtol=0.05)
    assert not any(key.startswith("posterior_") for key in terms)

    sure = LinearVAE(log_std=-40.0)
    _, maps = AnomalyMap(sure, CeVAELoss(sigma=0.2), configs)(image, brain)
    np.testing.assert_allclose(maps["posterior"]["rec"], maps["paper"]["rec"] / 0.2, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="gaussian|Gaussian"):
        AnomalyMap(network, CeVAELoss(reconstruction="l2"), configs)(image, brain)
    with pytest.raises(ValueError, match="at least 2"):
        ScoreOptions(posterior_samples=1)
    with pytest.raises(ValueError, match="one image"):
        ScoreOptions(posterior_samples=4, inpaint_tile=16)
