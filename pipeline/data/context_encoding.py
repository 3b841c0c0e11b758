"""Context-encoding noise: the ceVAE's corrupted input ``x~`` (random squares of ``x`` replaced).

One implementation, :class:`ContextEncodingNoise`, works on a whole batch on any device without a Python loop
over images; the trainer calls it on the device. :class:`ContextEncodingMask` / :class:`ContextEncodingMaskd` are
MONAI transforms around it for single images: they draw a seed from ``self.R`` and run the batched code on a
batch of one, so ``set_random_state`` makes them reproducible and both forms follow the same distribution.

Per image: the number of squares is uniform in ``n_squares`` (inclusive); each square's side is uniform in
``square_size`` (fractions of the shorter image side, inclusive after rounding to pixels); its position is
uniform among the positions where it lies fully inside the image. Squares may overlap. The fill is per-pixel
uniform noise in the image's own ``[min, max]`` (``"noise"``), one uniform value in that range per square
(``"constant"``), or 0 (``"zero"``). Every pixel outside the squares is left untouched.

``variant="authors"`` reproduces the authors' code instead (``MIC-DKFZ/mood``, ``util/ce_noise.py``): it draws 0, 1
or 2 squares per image, but each square is drawn on a fresh empty mask, so **at most one survives** (an image gets
one square with probability 2/3, none otherwise); the side is ``int(U(0, S/2))`` pixels (0, i.e. no square, is
possible); the square is filled with **one constant** drawn uniformly in the **batch's** ``[min, max]``. The
project's default keeps 1-3 squares, each of at least 1/8 of the side, filled with noise in each image's own range:
the CE branch then always has something to inpaint, and an image's corruption does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = ["FILL_MODES", "VARIANTS", "ContextEncodingMask", "ContextEncodingMaskd", "ContextEncodingNoise"]

FILL_MODES = ("noise", "constant", "zero")
VARIANTS = ("project", "authors")


@dataclass(frozen=True)
class ContextEncodingNoise:
    """Replace random squares of each image in a batch.

    Args:
        n_squares: inclusive range of the number of squares per image.
        square_size: inclusive range of the square side, as fractions of ``min(H, W)``.
        fill: ``"noise"``, ``"constant"`` or ``"zero"`` (see the module docstring).
        variant: ``"project"`` (the above) or ``"authors"``: the sampling of the authors' code, which ignores
            ``n_squares``, ``square_size`` and ``fill`` (see the module docstring).
    """

    n_squares: tuple[int, int] = (1, 3)
    square_size: tuple[float, float] = (1 / 8, 1 / 2)
    fill: str = "noise"
    variant: str = "project"

    def __post_init__(self) -> None:
        lo, hi = self.n_squares
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"n_squares must be (lo, hi) with 0 <= lo <= hi and hi >= 1, got {self.n_squares}.")
        s_lo, s_hi = self.square_size
        if not 0.0 < s_lo <= s_hi <= 1.0:
            raise ValueError(f"square_size must be (lo, hi) with 0 < lo <= hi <= 1, got {self.square_size}.")
        if self.fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, got {self.fill!r}.")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")

    def side_range(self, height: int, width: int) -> tuple[int, int]:
        """Inclusive range of square sides in pixels for an image of ``height x width``."""
        side = min(height, width)
        lo = min(side, max(1, round(self.square_size[0] * side)))
        hi = min(side, max(lo, round(self.square_size[1] * side)))
        return lo, hi

    def squares(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Boolean ``(B, K, H, W)``: square ``k`` of image ``b`` (all False for squares beyond its count)."""
        if self.variant == "authors":
            k_max, fits = 1, 0  # positions randint(0, S - side): the square never touches the last row/column
            count = (torch.randint(0, 3, (batch,), generator=generator, device=device) > 0).long()
            size = (torch.rand((batch, 1), generator=generator, device=device) * (min(height, width) // 2)).long()
        else:
            k_max, fits = self.n_squares[1], 1
            count = torch.randint(self.n_squares[0], k_max + 1, (batch,), generator=generator, device=device)
            lo, hi = self.side_range(height, width)
            size = torch.randint(lo, hi + 1, (batch, k_max), generator=generator, device=device)
        top = (torch.rand((batch, k_max), generator=generator, device=device) * (height - size + fits)).long()
        left = (torch.rand((batch, k_max), generator=generator, device=device) * (width - size + fits)).long()
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        in_rows = (rows >= top[..., None]) & (rows < (top + size)[..., None])
        in_cols = (cols >= left[..., None]) & (cols < (left + size)[..., None])
        active = torch.arange(k_max, device=device) < count[:, None]
        return in_rows[..., :, None] & in_cols[..., None, :] & active[..., None, None]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt a batch.

        Args:
            x: ``(B, C, H, W)`` images.
            generator: a ``torch.Generator`` on ``x.device`` for reproducible draws (global RNG if None).

        Returns:
            ``(x_tilde, mask)``: ``x_tilde`` like ``x``; ``mask`` boolean ``(B, 1, H, W)``, True inside squares.
        """
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}.")
        b, c, h, w = x.shape
        squares = self.squares(b, h, w, generator, x.device)
        mask = squares.any(dim=1, keepdim=True)
        dims = (0, 1, 2, 3) if self.variant == "authors" else (1, 2, 3)  # the authors fill from the batch's range
        lo = x.amin(dim=dims).expand(b).reshape(b, 1, 1, 1)
        hi = x.amax(dim=dims).expand(b).reshape(b, 1, 1, 1)
        fill_mode = "constant" if self.variant == "authors" else self.fill
        if fill_mode == "noise":
            fill = lo + (hi - lo) * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        elif fill_mode == "constant":
            k_max = squares.shape[1]
            values = lo.view(b, 1) + (hi - lo).view(b, 1) * torch.rand(
                (b, k_max), generator=generator, device=x.device, dtype=x.dtype
            )
            # the value of the last square covering a pixel (0 = none)
            order = torch.arange(1, k_max + 1, device=x.device).view(1, k_max, 1, 1)
            last = (squares * order).amax(dim=1)
            values = torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)
            fill = values.gather(1, last.flatten(1)).view(b, 1, h, w).expand_as(x)
        else:
            fill = torch.zeros_like(x)
        return torch.where(mask, fill, x), mask


class ContextEncodingMask(Randomizable, Transform):
    """Array transform: ``(C, H, W)`` image -> corrupted ``(C, H, W)`` image (see :class:`ContextEncodingNoise`).

    Draws only from ``self.R``; call ``set_random_state(seed)`` for reproducible output. The mask of the last
    call is kept in ``self.last_mask`` (``(1, H, W)`` boolean).
    """

    def __init__(
        self,
        n_squares: tuple[int, int] = (1, 3),
        square_size: tuple[float, float] = (1 / 8, 1 / 2),
        fill: str = "noise",
    ) -> None:
        self.noise = ContextEncodingNoise(tuple(n_squares), tuple(square_size), fill)
        self._seed = 0
        self.last_mask: torch.Tensor | None = None

    def randomize(self, data: object = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        img_t = torch.as_tensor(img)
        generator = torch.Generator(device=img_t.device).manual_seed(self._seed)
        corrupted, mask = self.noise(img_t[None], generator)
        self.last_mask = mask[0]
        return corrupted[0]


class ContextEncodingMaskd(Randomizable, MapTransform):
    """Dictionary transform: writes the corrupted copy of each key under ``f"{key}{suffix}"``, keeping the clean one.

    Args:
        keys: image keys, each ``(C, H, W)``.
        suffix: suffix of the output key (``"image"`` -> ``"image_ce"``).
        mask_suffix: if given, the boolean square mask ``(1, H, W)`` is written under ``f"{key}{mask_suffix}"``.
        n_squares, square_size, fill: see :class:`ContextEncodingNoise`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        suffix: str = "_ce",
        mask_suffix: str | None = None,
        n_squares: tuple[int, int] = (1, 3),
        square_size: tuple[float, float] = (1 / 8, 1 / 2),
        fill: str = "noise",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.suffix, self.mask_suffix = suffix, mask_suffix
        self.masker = ContextEncodingMask(n_squares, square_size, fill)
        self.masker.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state=None) -> ContextEncodingMaskd:
        super().set_random_state(seed, state)
        self.masker.set_random_state(state=self.R)
        return self

    def randomize(self, data: object = None) -> None:
        self.masker.randomize()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize()
            d[f"{key}{self.suffix}"] = self.masker(d[key], randomize=False)
            if self.mask_suffix is not None:
                d[f"{key}{self.mask_suffix}"] = self.masker.last_mask
        return d
