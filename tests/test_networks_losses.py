"""The ceVAE network and the paper's loss (Eq. 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import free_port

from pipeline.losses import CeVAELoss, kl_divergence, reconstruction_error
from pipeline.networks import CeVAE, CeVAEReconstruction
from pipeline.networks.cevae import FullMapConv2d, FullMapConvTranspose2d


@pytest.mark.parametrize("size, n_convs", [(64, 5), (128, 6), (192, 6), (256, 7)])
def test_shapes_and_vector_latent(size, n_convs):
    net = CeVAE(image_size=size, z_dim=32)
    x = torch.rand(2, 1, size, size)
    recon, mu, logvar, recon_ce = net(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 32) and recon_ce is None
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.encoder) == n_convs
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in net.decoder) == n_convs


def test_paper_architecture_at_64():
    net = CeVAE()
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(4, 4)] * 5
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 256, 512]  # last: mean and log-variance of z (256)
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.encoder) == 4
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in net.modules())
    assert isinstance(net.decoder[-1], torch.nn.ConvTranspose2d), "linear output"


def test_ce_branch_decodes_the_mean_of_the_masked_input():
    torch.manual_seed(0)
    net = CeVAE(z_dim=16).eval()
    x, x_ce = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    recon, mu, logvar, recon_ce = net(x, x_ce)
    torch.testing.assert_close(recon_ce, net.decode(net.encode(x_ce)[0]))
    torch.testing.assert_close(mu, net.encode(x)[0])
    assert not torch.allclose(recon, net.decode(mu)), "the VAE branch decodes a sampled z"


def test_inference_view_shares_weights_and_scripts():
    net = CeVAE(z_dim=16)
    view = CeVAEReconstruction(z_dim=16)
    view.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 64, 64)
    scripted = torch.jit.script(view)
    torch.testing.assert_close(scripted(x), net.decode(net.encode(x)[0]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_full_map_layers_compute_the_convolutions_they_replace(channels_last):
    """The latent layers are matrix products with nn.Conv2d/ConvTranspose2d's parameters, values and gradients."""
    torch.manual_seed(0)
    pairs = [
        (FullMapConv2d(32, 24, 4), torch.nn.Conv2d(32, 24, 4), torch.randn(5, 32, 4, 4)),
        (FullMapConvTranspose2d(32, 24, 6), torch.nn.ConvTranspose2d(32, 24, 6), torch.randn(5, 32, 1, 1)),
    ]
    for fast, reference, x in pairs:
        reference.load_state_dict(fast.state_dict())  # same parameter names and shapes
        if channels_last:
            fast.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_fast, y_ref = fast(x_fast), reference(x_ref)
        torch.testing.assert_close(y_fast, y_ref)
        weights = torch.randn_like(y_ref)
        (y_fast * weights).sum().backward()
        (y_ref * weights).sum().backward()
        torch.testing.assert_close(x_fast.grad, x_ref.grad)
        torch.testing.assert_close(fast.weight.grad, reference.weight.grad)
        torch.testing.assert_close(fast.bias.grad, reference.bias.grad)
    with pytest.raises(ValueError, match=r"shape \(B, 32, 4, 4\).*image_size"):
        pairs[0][0](torch.randn(2, 32, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(B, 32, 1, 1\)"):
        pairs[1][0](torch.randn(2, 32, 2, 2))


def test_invalid_network_arguments():
    with pytest.raises(ValueError, match="divisible"):
        CeVAE(image_size=100)
    with pytest.raises(ValueError, match="channel widths"):
        CeVAE(image_size=64, channels=(16, 32))
    with pytest.raises(ValueError, match="norm"):
        CeVAE(norm="layer")


def test_loss_terms_match_their_definitions():
    x, recon, recon_ce = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    terms = CeVAELoss(ce_weight=0.3, kl_weight=2.0, reconstruction="l2")(x, recon, mu, logvar, recon_ce)
    rec = ((x - recon) ** 2).sum(dim=(1, 2, 3)).mean()
    kl = (0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(1)).mean()
    ce = ((x - recon_ce) ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms["loss_rec"], rec)
    torch.testing.assert_close(terms["loss_kl"], kl)
    torch.testing.assert_close(terms["loss_ce"], ce)
    torch.testing.assert_close(terms["loss"], 0.7 * (2.0 * kl + rec) + 0.3 * ce)


def test_ce_term_compares_with_the_clean_input():
    x = torch.rand(2, 1, 8, 8)
    terms = CeVAELoss(reconstruction="l2")(
        x, torch.zeros_like(x), torch.zeros(2, 3), torch.zeros(2, 3), recon_ce=x.clone()
    )
    assert float(terms["loss_ce"]) == 0.0


def test_plain_vae_and_reconstruction_kinds():
    x, recon = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    vae = CeVAELoss(ce_weight=0.0, reconstruction="l2")
    terms = vae(x, recon, torch.zeros(1, 3), torch.zeros(1, 3))
    assert float(terms["loss"]) == pytest.approx(1.0) and float(terms["loss_ce"]) == 0.0
    assert float(reconstruction_error(x, recon, "l1")) == pytest.approx(2.0)
    assert float(reconstruction_error(x, recon, "gaussian")) == pytest.approx(4 * (0.125 + 0.9189385), rel=1e-5)
    assert float(kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3))) == 0.0
    with pytest.raises(ValueError, match="recon_ce"):
        CeVAELoss(ce_weight=0.5)(x, recon, torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="reconstruction"):
        CeVAELoss(reconstruction="huber")
    assert not CeVAELoss(reconstruction="l2", sigma="calibrated").calibrated, "sigma is a Gaussian's only"
    with pytest.raises(ValueError, match="sigma"):
        CeVAELoss(sigma=0.0)


def gaussian_nll(x, recon, sigma):
    """Reference: torch.distributions' Gaussian log-density, summed per sample."""
    return -torch.distributions.Normal(recon, sigma).log_prob(x).flatten(1).sum(1)


def test_calibrated_sigma_is_the_maximum_likelihood_one():
    torch.manual_seed(0)
    x, recon, recon_ce = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    loss = CeVAELoss(ce_weight=0.5)
    terms = loss(x, recon, mu, logvar, recon_ce)
    sigma = ((x - recon) ** 2).mean().sqrt()
    torch.testing.assert_close(terms["sigma"], sigma)
    torch.testing.assert_close(terms["loss_rec"], gaussian_nll(x, recon, sigma).mean())
    torch.testing.assert_close(terms["loss_ce"], gaussian_nll(x, recon_ce, sigma).mean())
    # the likelihood at this sigma is the highest over sigma (a negative control: other sigmas give less)
    for other in (0.8 * sigma, 1.25 * sigma):
        assert float(gaussian_nll(x, recon, other).mean()) > float(terms["loss_rec"])


def test_calibrated_loss_has_the_gradient_of_the_optimised_likelihood():
    # sigma is detached; at its optimum the gradient through it vanishes, so the gradient equals the one of the
    # profile likelihood D/2 log(MSE) in which sigma depends on the reconstruction (finite differences check it)
    torch.manual_seed(1)
    x, mu, logvar = torch.rand(3, 1, 4, 4, dtype=torch.float64), torch.zeros(3, 2), torch.zeros(3, 2)
    recon = torch.rand(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    CeVAELoss(ce_weight=0.0)(x, recon, mu, logvar)["loss"].backward()

    def profile(r):
        sigma = ((x - r) ** 2).mean().sqrt()
        return gaussian_nll(x, r, sigma).mean()

    eps, numeric = 1e-6, torch.zeros_like(recon)
    for i in range(recon.numel()):
        step = torch.zeros(recon.numel(), dtype=torch.float64)
        step[i] = eps
        step = step.view_as(recon)
        numeric.view(-1)[i] = (profile(recon.detach() + step) - profile(recon.detach() - step)) / (2 * eps)
    torch.testing.assert_close(recon.grad, numeric, rtol=1e-5, atol=1e-8)


def test_running_sigma_scores_and_travels_with_the_state_dict():
    torch.manual_seed(2)
    loss = CeVAELoss(ce_weight=0.0, sigma_momentum=0.5)
    x, mu, logvar = torch.rand(2, 1, 8, 8), torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="not set"):
        loss.terms(x, x, mu, logvar)  # never trained: no sigma to score with
    errors = [0.2, 0.1]
    for e in errors:
        loss(x, x + e, mu, logvar)
    assert float(loss.sigma) == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)  # first batch sets it, then a running mean
    loss.eval()
    loss(x, x + 0.4, mu, logvar)
    assert float(loss.sigma) == pytest.approx(0.15), "not updated outside training"
    copy = CeVAELoss(ce_weight=0.0)
    copy.load_state_dict(loss.state_dict())
    recon = x + 0.05
    torch.testing.assert_close(copy.terms(x, recon, mu, logvar)["rec"], gaussian_nll(x, recon, 0.15))


def _rank_batch(rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of a global batch: ranks see different intensities (sizes 3 and 5 slices)."""
    return torch.rand(3 + 2 * rank, 1, 8, 8, generator=torch.Generator().manual_seed(rank)) * (1 + rank)


def _calibrate_on_rank(rank: int, init_method: str, out: str) -> None:
    """One training step's loss on rank ``rank`` of a 2-process gloo group; writes its sigmas to ``out``."""
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        x, loss = _rank_batch(rank), CeVAELoss(ce_weight=0.0)
        terms = loss(x, torch.zeros_like(x), torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2))
        torch.save({"batch": terms["sigma"], "running": loss.sigma.clone()}, f"{out}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_calibrated_sigma_is_the_global_batch_s_on_every_rank(tmp_path):
    """Under torch.distributed each rank's batch is a shard of one global batch: the calibrated sigma (hence the
    objective) is the global batch's on every rank, computed here from the concatenated shards (reference). Negative
    control: one rank's shard alone gives another sigma."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    torch.multiprocessing.spawn(_calibrate_on_rank, args=(init_method, str(tmp_path)), nprocs=2)
    reference = torch.cat([_rank_batch(0), _rank_batch(1)]).pow(2).mean().sqrt()  # recon 0: the residual is x
    for rank in (0, 1):
        sigmas = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(sigmas["batch"], reference)
        torch.testing.assert_close(sigmas["running"], reference)
    alone = CeVAELoss(ce_weight=0.0)
    x = _rank_batch(0)
    alone(x, torch.zeros_like(x), torch.zeros(3, 2), torch.zeros(3, 2))
    assert abs(float(alone.sigma) - float(reference)) > 0.1
