"""The inpainting score's image: every pixel of a slice reconstructed from its context, with its own tile hidden.

The ceVAE's context-encoding branch is trained to fill squares of noise from what surrounds them; a plain
reconstruction ``g(mu(x))`` sees the whole slice and can copy an anomaly through. :func:`inpainted` hides each pixel
before it is reconstructed, so that an anomaly has only its healthy surroundings to be guessed from. An option set
with ``inpaint_tile`` (:class:`pipeline.scoring.ScoreOptions`) measures its ``rec`` against it.
"""

from __future__ import annotations

import torch

__all__ = ["inpainted"]


def _tile_groups(height: int, width: int, tile: int, shift: int) -> torch.Tensor:
    """``(4, H, W)`` boolean masks: the tiles of side ``tile`` of a grid shifted by ``shift`` pixels, in four
    groups by the parity of their row and column, so that every tile of a group has its eight neighbours in the
    other groups (its whole context is visible when the group is masked); the groups cover every pixel once."""
    rows = (torch.arange(height) + shift) // tile % 2
    cols = (torch.arange(width) + shift) // tile % 2
    return torch.stack([(rows[:, None] == a) & (cols[None, :] == b) for a in (0, 1) for b in (0, 1)])


def inpainted(network: torch.nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """The slices ``x`` ``(B, 1, H, W)`` with every pixel replaced by its reconstruction from context: for each of
    two grids of ``tile``-pixel tiles (the second shifted by half a tile) and each of its four tile groups
    (:func:`_tile_groups`), the group's tiles are replaced by noise uniform in each slice's ``[min, max]`` (the
    training's context-encoding fill; one fixed draw, so the result is deterministic and independent of the batch)
    and the image decoded from the posterior mean (as the context-encoding branch is trained); each pixel takes the
    decoding of the pass that masked it, averaged over the two grids. A pixel's own value never reaches its
    inpainted value (tested), so an anomaly is not copied through: 8 encoder and decoder passes."""
    net = getattr(network, "module", network)  # inside an optional DDP/DataParallel wrapper
    height, width = x.shape[-2:]
    noise = torch.rand((1, 1, height, width), generator=torch.Generator().manual_seed(0)).to(x)
    low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    fill = low + (high - low) * noise
    out = torch.zeros_like(x)
    for shift in (0, tile // 2):
        for group in _tile_groups(height, width, tile, shift).to(x.device):
            recon = net.decode(net.encode(torch.where(group, fill, x))[0])
            out = torch.where(group, out + recon / 2, out)
    return out
