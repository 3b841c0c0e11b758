"""Context-encoding noise: square counts, sizes and placement, untouched pixels, reproducibility, both forms."""

from __future__ import annotations

import pytest
import torch
from bundle_helpers import initialized_workflow
from monai.transforms import Compose

from pipeline.data.context_encoding import ContextEncodingMask, ContextEncodingMaskd, ContextEncodingNoise


def boxes(squares: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """(top, left, height, width) of every active square, per image, from a (B, K, H, W) boolean tensor."""
    out = []
    for per_image in squares:
        found = []
        for sq in per_image:
            if sq.any():
                rows, cols = torch.nonzero(sq.any(1)).flatten(), torch.nonzero(sq.any(0)).flatten()
                found.append((int(rows[0]), int(cols[0]), len(rows), len(cols)))
                assert int(sq.sum()) == len(rows) * len(cols), "a square must be a filled box"
        out.append(found)
    return out


@pytest.mark.parametrize(
    "n_squares, square_size", [((1, 3), (1 / 8, 1 / 2)), ((2, 2), (0.25, 0.25)), ((0, 4), (0.1, 0.9))]
)
def test_square_count_size_and_placement(n_squares, square_size):
    noise = ContextEncodingNoise(n_squares, square_size)
    h, w = 64, 48
    squares = noise.squares(500, h, w, torch.Generator().manual_seed(0))
    lo, hi = noise.side_range(h, w)
    counts = []
    for found in boxes(squares):
        counts.append(len(found))
        for top, left, height, width in found:
            assert height == width, "squares, not rectangles"
            assert lo <= height <= hi
            assert top >= 0 and left >= 0 and top + height <= h and left + width <= w
    assert min(counts) == n_squares[0] and max(counts) == n_squares[1], "every count in the range occurs"


def test_default_ranges_in_pixels():
    assert ContextEncodingNoise().side_range(64, 64) == (8, 32)


@pytest.mark.parametrize("fill", ["noise", "constant", "zero"])
def test_only_square_pixels_change_and_fill_stays_in_range(fill):
    x = torch.rand(64, 1, 32, 32) * 3 - 1
    x_tilde, mask = ContextEncodingNoise(fill=fill)(x, torch.Generator().manual_seed(1))
    assert mask.shape == (64, 1, 32, 32) and mask.dtype == torch.bool
    assert torch.equal(x_tilde[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert bool(mask.flatten(1).any(1).all()), "at least one square per image by default"
    inside = x_tilde[mask.expand_as(x)]
    if fill == "zero":
        assert torch.all(inside == 0)
    else:
        lo = x.amin(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand_as(x)[mask.expand_as(x)]
        hi = x.amax(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand_as(x)[mask.expand_as(x)]
        assert torch.all((inside >= lo) & (inside <= hi))


def test_constant_fill_is_one_value_per_square():
    noise = ContextEncodingNoise(n_squares=(1, 1), fill="constant")
    x = torch.rand(16, 1, 32, 32)
    x_tilde, mask = noise(x, torch.Generator().manual_seed(2))
    for img, m in zip(x_tilde, mask):
        assert torch.unique(img[m]).numel() == 1


def test_batched_noise_is_reproducible_with_a_generator():
    x = torch.rand(8, 1, 32, 32)
    a, _ = ContextEncodingNoise()(x, torch.Generator().manual_seed(3))
    b, _ = ContextEncodingNoise()(x, torch.Generator().manual_seed(3))
    c, _ = ContextEncodingNoise()(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dictionary_transform_keeps_clean_image_and_is_reproducible():
    img = torch.rand(1, 32, 32)
    t = ContextEncodingMaskd("image", mask_suffix="_ce_mask").set_random_state(5)
    first = [t({"image": img}) for _ in range(3)]
    t.set_random_state(5)
    again = [t({"image": img}) for _ in range(3)]
    for out, rep in zip(first, again):
        assert torch.equal(out["image"], img), "the clean image is kept"
        assert torch.equal(out["image_ce"], rep["image_ce"])
        changed = out["image_ce"] != img
        assert torch.all(out["image_ce_mask"] | ~changed), "changes only inside the written mask"
    assert not torch.equal(first[0]["image_ce"], first[1]["image_ce"])
    composed = Compose([ContextEncodingMaskd("image")])
    composed.set_random_state(9)
    x1 = composed({"image": img})["image_ce"]
    composed.set_random_state(9)
    assert torch.equal(composed({"image": img})["image_ce"], x1)


def test_single_image_and_batched_forms_agree_in_distribution():
    h = w = 64
    batched = ContextEncodingNoise().squares(4000, h, w, torch.Generator().manual_seed(6))
    single = ContextEncodingMask().set_random_state(7)
    masks = []
    for _ in range(800):
        single(torch.rand(1, h, w))
        masks.append(single.last_mask)
    single_fraction = torch.stack(masks).float().mean(dim=(1, 2, 3))
    batched_fraction = batched.any(1).float().mean(dim=(1, 2))
    # mean and spread of the masked area agree within sampling error (about 3 standard errors)
    se = float(batched_fraction.std()) * (1 / 800 + 1 / 4000) ** 0.5
    assert abs(float(single_fraction.mean()) - float(batched_fraction.mean())) < 3.5 * se
    assert abs(float(single_fraction.std()) - float(batched_fraction.std())) < 0.15 * float(batched_fraction.std())


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="n_squares"):
        ContextEncodingNoise(n_squares=(3, 1))
    with pytest.raises(ValueError, match="square_size"):
        ContextEncodingNoise(square_size=(0.0, 0.5))
    with pytest.raises(ValueError, match="fill"):
        ContextEncodingNoise(fill="blur")
    with pytest.raises(ValueError, match="B, C, H, W"):
        ContextEncodingNoise()(torch.rand(1, 32, 32))


def test_authors_variant_keeps_at_most_one_constant_square_from_the_batch_range():
    noise = ContextEncodingNoise(variant="authors")
    n, side = 3000, 64
    found = boxes(noise.squares(n, side, side, torch.Generator().manual_seed(0)))
    assert max(len(f) for f in found) == 1, "their mask keeps one square at most"
    sides = [f[0][2] for f in found if f]
    assert max(sides) <= side // 2 - 1 and min(sides) >= 1
    assert all(t + s < side and l + s < side for f in found for t, l, s, _ in f), "randint(0, S - side)"
    # P(square) = P(0, 1 or 2 squares drawn is not 0) * P(side > 0) = 2/3 * 31/32; binomial sd ~0.009 here
    assert abs(len(sides) / n - 2 / 3 * 31 / 32) < 0.03
    x = torch.rand(8, 1, side, side) * 0.1
    x[0] += 0.9  # one bright image widens the batch range
    corrupted, mask = noise(x, torch.Generator().manual_seed(1))
    assert torch.equal(corrupted[~mask.expand_as(x)], x[~mask.expand_as(x)]), "outside the square: untouched"
    for b in range(1, 8):
        inside = corrupted[b][mask[b].expand_as(x[b])]
        if inside.numel():
            assert torch.all(inside == inside[0]), "one constant per square"
            assert float(x.min()) <= float(inside[0]) <= float(x.max())
    filled = [float(corrupted[b][mask[b]][0]) for b in range(1, 8) if mask[b].any()]
    assert max(filled) > 0.1, "values from the batch's range, beyond these images' own range [0, 0.1]"
    with pytest.raises(ValueError, match="variant"):
        ContextEncodingNoise(variant="mood")


def test_bundle_builds_the_authors_variant_on_request(tiny_demo, tmp_path):
    for variant in ("project", "authors"):
        workflow = initialized_workflow(tmp_path / variant, tiny_demo, ce_variant=variant)
        assert workflow.parser.get_parsed_content("context_encoding").variant == variant
