"""The inpainting score: every pixel reconstructed from its context, never from itself."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.inpainting import inpainted
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.scoring import PAPER, POSTPROCESSED, ScoreOptions


class ConstantDecoder(torch.nn.Module):
    """Decodes every latent to an image of ones: what a covering assembly of tiles returns unchanged."""

    def encode(self, x):
        return torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2)

    def decode(self, mu):
        return torch.ones(mu.shape[0], 1, 64, 64)


class IdentityVAE(torch.nn.Module):
    """Copies its input through the latent: the plain reconstruction is the input, the inpainted one is not."""

    def encode(self, x):
        return x.flatten(1), torch.zeros_like(x.flatten(1))

    def decode(self, mu):
        return mu.view(mu.shape[0], 1, 64, 64)


def test_a_pixels_own_value_never_reaches_its_inpainted_value():
    """Changing one pixel (inside the slice's range, so the noise fill stays) leaves that pixel's inpainted value
    exactly as it was, for pixels at tile corners and inside tiles; the plain reconstruction ``g(mu(x))`` does change
    at and around it (negative control: the input is copied through), and so do inpainted pixels that see the
    changed one as context. The tiles of both grids cover every pixel once (a constant decoder's image comes back
    unchanged)."""
    torch.manual_seed(0)
    network = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    x = 0.1 + 0.8 * torch.rand(2, 1, 64, 64)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0  # each slice's range, kept by every change below
    with torch.no_grad():
        before, recon = inpainted(network, x, 16), network.decode(network.encode(x)[0])
        for row, col in ((20, 37), (16, 16), (8, 40), (60, 50)):
            changed = x.clone()
            changed[1, 0, row, col] = 0.95 if x[1, 0, row, col] < 0.5 else 0.05
            after = inpainted(network, changed, 16)
            assert after[1, 0, row, col] == before[1, 0, row, col], (row, col)
            assert (after[1] != before[1]).any()  # its context changed elsewhere
            torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # slices are independent
            copied = network.decode(network.encode(changed)[0])[1, 0, row - 1 : row + 2, col - 1 : col + 2]
            assert not torch.equal(copied, recon[1, 0, row - 1 : row + 2, col - 1 : col + 2]), (row, col)
    assert torch.equal(inpainted(ConstantDecoder(), x, 16), torch.ones_like(x))
    with pytest.raises(ValueError, match="even"):
        ScoreOptions(inpaint_tile=15)


def test_an_inpainting_option_set_scores_against_the_inpainted_image():
    """``rec`` of an option set with ``inpaint_tile`` is ``|x - inpainted(x)|`` (and ``combined`` that times the
    KL gradient), while the other option sets of the same pass keep ``|x - g(mu(x))|``: with a network that copies
    its input, 0 for the plain residual and the distance to the context's guess for the inpainted one."""
    network = IdentityVAE()
    rng = np.random.default_rng(0)
    brain = np.zeros((64, 64, 6), bool)
    brain[10:54, 12:52, 1:5] = True
    image = torch.from_numpy(rng.random((1, 64, 64, 6)) * brain).float()
    configs = {"paper": PAPER, "inpainting": replace(PAPER, inpaint_tile=16)}
    terms, maps = AnomalyMap(network, CeVAELoss(sigma=0.2), configs)(image, brain)
    slices = image.permute(3, 0, 1, 2)
    with torch.no_grad():
        expected = (slices - inpainted(network, slices, 16)).abs()[:, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(maps["inpainting"]["rec"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        maps["inpainting"]["combined"], expected * maps["paper"]["kl_grad"], rtol=1e-5, atol=1e-9
    )
    assert not maps["paper"]["rec"].any() and maps["inpainting"]["rec"][brain].mean() > 0.1
    assert "inpainted_16" not in terms
    assert POSTPROCESSED.inpaint_tile == 0
