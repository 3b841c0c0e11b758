"""The ceVAE network (Zimmerer et al. 2019): a fully convolutional VAE with a vector latent.

At 64x64 (the paper's setting) the encoder is five 2D convolutions, kernel 4: four with stride 2
(64 -> 32 -> 16 -> 8 -> 4) and a last one whose kernel covers the remaining 4x4 map, giving the mean and log-variance
of a vector latent ``z``; the decoder mirrors it with five transposed convolutions. LeakyReLU after every layer
but the outputs, no normalisation by default, linear output. Larger inputs add stride-2 layers until the map is
at most 7 pixels wide (128 and 256 -> 4, 192 -> 6), so the latent stays a vector.

The two layers at the latent (the last convolution, whose kernel covers its whole input map, and the first
transposed convolution, which starts from a 1x1 map) are computed as one matrix product each
(:class:`FullMapConv2d`, :class:`FullMapConvTranspose2d`): the same parameters and ``state_dict`` as
``nn.Conv2d``/``nn.ConvTranspose2d``, the same numbers, but 3-4x faster than oneDNN's convolution for these shapes
on CPU (``docs/performance.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ARCHITECTURE_KEYS",
    "CeVAE",
    "CeVAEReconstruction",
    "FullMapConv2d",
    "FullMapConvTranspose2d",
    "downsampling_layers",
]

# the config keys that build a CeVAE
ARCHITECTURE_KEYS = ("image_size", "z_dim", "channels", "norm", "context_slices")

NORMS = {
    "batch": lambda c: nn.BatchNorm2d(c),
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
    "group": lambda c: nn.GroupNorm(min(8, c), c),
}


def downsampling_layers(image_size: int) -> int:
    """Number of stride-2 layers that bring ``image_size`` to the bottleneck map (4 to 7 pixels)."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}.")
    n = int(math.floor(math.log2(image_size / 4)))
    if image_size % (2**n):
        raise ValueError(f"image_size {image_size} is not divisible by 2**{n}; use e.g. 64, 128, 192 or 256.")
    return n


class FullMapConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size)`` applied to a map of exactly the kernel's size, as one
    matrix product: ``(B, in_channels, k, k) -> (B, out_channels, 1, 1)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.weight.shape[1:]:
            raise ValueError(
                f"FullMapConv2d expects inputs of shape (B, {self.in_channels}, {self.kernel_size[0]}, "
                f"{self.kernel_size[1]}), got {list(x.shape)}; check the network's image_size."
            )
        weight = self.weight
        if weight.is_contiguous(memory_format=torch.channels_last):  # flatten (C, k, k) in memory order: no copies
            x, weight = x.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
        return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]


class FullMapConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in_channels, out_channels, kernel_size)`` applied to a 1x1 map, as one matrix product:
    ``(B, in_channels, 1, 1) -> (B, out_channels, k, k)``, in the weight's memory format."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if list(x.shape[1:]) != [self.in_channels, 1, 1]:
            raise ValueError(
                f"FullMapConvTranspose2d expects inputs of shape (B, {self.in_channels}, 1, 1), "
                f"got {list(x.shape)}."
            )
        b, (kh, kw) = x.shape[0], self.kernel_size
        if self.weight.is_contiguous(memory_format=torch.channels_last):  # (Cin, kh, kw, Cout) in memory: no copies
            y = torch.mm(x.flatten(1), self.weight.permute(0, 2, 3, 1).flatten(1))
            y = y.view(b, kh, kw, self.out_channels).permute(0, 3, 1, 2)
        else:
            y = torch.mm(x.flatten(1), self.weight.flatten(1)).view(b, self.out_channels, kh, kw)
        bias = self.bias
        return y if bias is None else y + bias.view(1, -1, 1, 1)


def _block(conv: nn.Module, channels: int, norm: str | None, slope: float) -> list[nn.Module]:
    layers = [conv]
    if norm is not None:
        layers.append(NORMS[norm](channels))
    layers.append(nn.LeakyReLU(slope, inplace=True))
    return layers


class CeVAE(nn.Module):
    """Convolutional VAE used by ceVAE.

    Args:
        image_size: input side ``S`` (square inputs ``(B, C, S, S)``).
        in_channels: image channels.
        context_slices: ``k`` neighbouring slices on either side as extra input channels (2.5D input,
            :func:`pipeline.data.slices.with_context`): ``C = in_channels * (1 + 2k)``; the decoder reconstructs
            all ``C`` channels (a VAE of the slab), and the anomaly maps read the middle slice's.
        channels: widths of the stride-2 layers, one per layer (default ``(16, 32, 64, 256)`` at 64x64, the
            authors' reference; extra leading layers of width 16 for larger inputs).
        z_dim: latent size.
        negative_slope: LeakyReLU slope.
        norm: None (paper), ``"batch"``, ``"instance"`` or ``"group"``.

    ``forward(x, x_ce=None)`` is the training pass (see its docstring); ``encode(x)`` returns ``(mu, logvar)`` of
    shape ``(B, z_dim)``; ``decode(z)`` returns ``(B, C, S, S)``.
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        channels: Sequence[int] | None = None,
        z_dim: int = 256,
        negative_slope: float = 0.01,
        norm: str | None = None,
        context_slices: int = 0,
    ) -> None:
        super().__init__()
        n_down = downsampling_layers(image_size)
        if channels is None:
            channels = (16,) * max(n_down - 3, 1) + (32, 64, 256)[-min(n_down - 1, 3) :]
        channels = tuple(int(c) for c in channels)
        if len(channels) != n_down:
            raise ValueError(f"image_size {image_size} needs {n_down} channel widths, got {len(channels)}: {channels}.")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm must be None or one of {sorted(NORMS)}, got {norm!r}.")
        if not isinstance(context_slices, int) or context_slices < 0:
            raise ValueError(f"context_slices must be a whole number >= 0, got {context_slices!r}.")
        self.image_size, self.in_channels, self.z_dim = image_size, in_channels, z_dim
        self.context_slices = context_slices
        slab = in_channels * (1 + 2 * context_slices)
        bottleneck = image_size // 2**n_down

        enc: list[nn.Module] = []
        widths = (slab, *channels)
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            enc += _block(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm is None), c_out, norm, negative_slope)
        enc.append(FullMapConv2d(channels[-1], 2 * z_dim, bottleneck))
        self.encoder = nn.Sequential(*enc)

        dec = _block(
            FullMapConvTranspose2d(z_dim, channels[-1], bottleneck, bias=norm is None),
            channels[-1],
            norm,
            negative_slope,
        )
        rev = channels[::-1]
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            dec += _block(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=norm is None), c_out, norm, negative_slope)
        dec.append(nn.ConvTranspose2d(rev[-1], slab, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return h[:, : self.z_dim], h[:, self.z_dim :]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z[:, :, None, None])

    def forward(
        self, x: torch.Tensor, x_ce: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Training pass: ``(recon, mu, logvar, recon_ce)``.

        ``recon`` decodes ``z ~ q(z|x)`` (reparameterised); if the context-encoded input ``x_ce`` is given,
        ``recon_ce`` decodes the encoder **mean** of ``x_ce`` (else None). Both inputs go through the encoder and
        decoder as one batch, so a ceVAE step costs one (double-sized) pass and works under DDP.
        """
        b = x.shape[0]
        mu_all, logvar_all = self.encode(x if x_ce is None else torch.cat([x, x_ce]))
        mu, logvar = mu_all[:b], logvar_all[:b]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon_all = self.decode(z if x_ce is None else torch.cat([z, mu_all[b:]]))
        return recon_all[:b], mu, logvar, (None if x_ce is None else recon_all[b:])


class CeVAEReconstruction(CeVAE):
    """Inference view with the same ``state_dict``: ``forward(x)`` is the reconstruction from the mean, a tensor.

    Scriptable with TorchScript (no ``super().forward()``), as ``verify_net_in_out`` and ``ckpt_export`` need.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mu, _ = self.encode(x)
        return self.decode(mu)
