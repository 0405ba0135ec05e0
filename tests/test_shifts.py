"""Shifted test sets: each shift is deterministic for a seed, independent of batching, and changes the images
by the amount its table states (checked against torchvision references where one exists)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from distcnn.augment import get_policy
from distcnn.errors import UsageError
from distcnn.shifts import (
    OCCLUDER, SEVERITIES, SHIFT_NAMES, SHIFTS, Shift, blur_kernel_size, occluder_side, parse_shifts,
    shifts_in_training, translation_pixels,
)

SIZE = 28


def images(n: int = 16, channels: int = 1, low: float = 0.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [low, high]: blurred noise, so that resampling is well-behaved."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, SIZE // 4, SIZE // 4, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return low + (high - low) * fine


def signs(shift: Shift, index: torch.Tensor) -> torch.Tensor:
    u, _ = shift.draws(index, (1, SIZE, SIZE))
    return torch.where(u < 0.5, -1.0, 1.0)


def test_the_table_has_six_shifts_at_three_severities():
    assert SHIFT_NAMES == ("rotation", "translation", "noise", "blur", "contrast", "occlusion")
    assert SEVERITIES == (1, 2, 3)
    assert all(len(kind.magnitudes) == 3 for kind in SHIFTS.values())


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_deterministic_for_a_seed_and_independent_of_batching(name):
    x, index = images(), torch.arange(16)
    shift = Shift(name, 2, seed=7)
    whole = shift(x, index)
    assert torch.equal(whole, Shift(name, 2, seed=7)(x, index))
    halves = torch.cat([shift(x[:5], index[:5]), shift(x[5:], index[5:])])
    assert torch.allclose(whole, halves, atol=1e-6)  # the same image gets the same shift in any batch
    assert not torch.allclose(whole, x, atol=1e-3)  # and it does change it
    if name in ("rotation", "translation", "noise", "occlusion"):  # the random ones: another seed, other draws
        assert not torch.equal(whole, Shift(name, 2, seed=8)(x, index))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_noise_has_the_stated_standard_deviation(severity):
    x = torch.full((64, 1, SIZE, SIZE), 0.5)  # 0.5 +- 4 sigma stays inside [0, 1]: nothing is clipped
    shift = Shift("noise", severity)
    residual = shift(x, torch.arange(64)) - x
    assert residual.std().item() == pytest.approx(shift.magnitude, rel=0.03)
    assert abs(residual.mean().item()) < 0.1 * shift.magnitude


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_scales_each_images_spread_by_the_factor(severity):
    x = images(8, channels=3, low=0.2, high=0.8)
    shift = Shift("contrast", severity)
    out = shift(x, torch.arange(8))
    ratio = out.flatten(2).std(dim=2) / x.flatten(2).std(dim=2)
    assert torch.allclose(ratio, torch.full_like(ratio, shift.magnitude), atol=1e-4)
    assert torch.allclose(out.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5)  # about each image's mean


@pytest.mark.parametrize("severity", SEVERITIES)
def test_occlusion_covers_the_stated_area_and_nothing_else(severity):
    x = images(8, low=0.0, high=0.4)  # no pixel is the occluder's grey
    shift = Shift("occlusion", severity)
    out = shift(x, torch.arange(8))
    side = occluder_side(shift.magnitude, SIZE)
    covered = out == OCCLUDER
    assert covered.flatten(1).sum(1).tolist() == [side * side] * 8
    assert abs(side * side / SIZE**2 - shift.magnitude) < 0.02
    assert torch.equal(out[~covered], x[~covered])
    rows, columns = covered[:, 0].any(2), covered[:, 0].any(1)  # one square: side consecutive rows and columns
    assert rows.sum(1).tolist() == [side] * 8 and columns.sum(1).tolist() == [side] * 8
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 1  # at random places


@pytest.mark.parametrize("severity", SEVERITIES)
def test_translation_moves_by_the_stated_whole_pixels(severity):
    x, index = images(8), torch.arange(8)
    shift = Shift("translation", severity)
    out = shift(x, index)
    p = translation_pixels(shift.magnitude, SIZE)
    assert p == max(1, round(shift.magnitude * SIZE))
    for i, (sx, sy) in enumerate((signs(shift, index)[:, :2] * p).long().tolist()):
        want = torch.zeros_like(x[i])
        ys, xs = slice(max(0, sy), SIZE + min(0, sy)), slice(max(0, sx), SIZE + min(0, sx))
        yd, xd = slice(max(0, -sy), SIZE + min(0, -sy)), slice(max(0, -sx), SIZE + min(0, -sx))
        want[:, ys, xs] = x[i][:, yd, xd]  # content moved by (sx, sy) pixels, zeros where it left
        assert torch.allclose(out[i], want, atol=1e-5), (i, sx, sy)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_rotation_is_torchvisions_rotation_by_the_stated_angle(severity):
    x, index = images(6), torch.arange(6)
    shift = Shift("rotation", severity)
    out = shift(x, index)
    angles = (signs(shift, index)[:, 0] * shift.magnitude).tolist()
    assert {abs(a) for a in angles} == {shift.magnitude} and len(set(angles)) == 2
    for i, angle in enumerate(angles):
        want = TF.rotate(x[i], angle, interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(out[i], want, atol=1e-4), angle


@pytest.mark.parametrize("severity", SEVERITIES)
def test_blur_is_torchvisions_gaussian_blur_of_the_stated_sigma(severity):
    x = images(4, channels=3)
    shift = Shift("blur", severity)
    sigma = shift.magnitude
    k = blur_kernel_size(sigma)
    assert k == 2 * math.ceil(3 * sigma) + 1
    want = TF.gaussian_blur(x, [k, k], [sigma, sigma])  # reflected borders, as here
    assert torch.allclose(shift(x, torch.arange(4)), want, atol=1e-5)


def test_severity_orders_the_damage():
    x, index = images(32), torch.arange(32)
    for name in SHIFT_NAMES:
        change = [(Shift(name, s)(x, index) - x).abs().mean().item() for s in SEVERITIES]
        assert change == sorted(change), name


def test_parse_shifts():
    assert parse_shifts("noise, rotation") == ["rotation", "noise"]  # the table's order
    assert parse_shifts("all") == list(SHIFT_NAMES)
    assert parse_shifts(None) == []
    with pytest.raises(UsageError) as error:
        parse_shifts("rotation,occlusoin")
    assert "'occlusoin'" in str(error.value) and "nearest: occlusion" in str(error.value)


def test_shifts_in_training_follow_the_policys_ops():
    def trained(policy, strength=1.0, channels=1, cutmix=0.0):
        return shifts_in_training(get_policy(policy).scaled(strength).for_channels(channels), cutmix)

    assert trained("none") == []
    assert trained("paper") == ["rotation", "translation", "contrast"]
    assert trained("paper", strength=0) == []
    assert trained("flip-crop") == ["translation"]
    assert trained("trivialaugment") == ["rotation", "translation", "blur", "contrast"]
    assert trained("none", cutmix=1.0) == ["occlusion"]
