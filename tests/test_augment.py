"""Augmentation policies: every registered policy on both backends, per-image randomness, agreement of the
backends (same draws, same image), op-level checks against torchvision, and batch mixing."""

from __future__ import annotations

import pickle

import kornia
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from distcnn.augment import (
    BACKENDS, KINDS, POLICIES, Affine, BatchedAugment, BatchMix, Op, PerSampleAugment, Policy, build_augment,
    build_batch_mix, each, get_policy, sample_draws, strength,
)
from distcnn.augment.batched import _warp
from distcnn.errors import UsageError

RANDOM_POLICIES = tuple(name for name in POLICIES if name != "none")  # from the registry: new ones are tested


def textured(channels: int, size: int, seed: int = 1) -> torch.Tensor:
    """A uint8 (C, size, size) image with no symmetry: smooth random blobs plus a horizontal ramp."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.rand(1, channels, size // 4, size // 4, generator=g), size=(size, size),
                          mode="bilinear", align_corners=False)[0]
    ramp = torch.linspace(0, 0.4, size).view(1, 1, size)
    return ((0.6 * blobs + ramp).clamp(0, 1) * 255).round().to(torch.uint8)


def batch_of(image: torch.Tensor, n: int) -> torch.Tensor:
    return image.float().div(255).expand(n, -1, -1, -1).contiguous()


def distinct_pair_fraction(images: torch.Tensor) -> float:
    flat = images.flatten(1).double()
    n = flat.shape[0]
    equal = (torch.cdist(flat, flat) < 1e-6).sum().item() - n  # off-diagonal equal pairs, counted twice
    return 1 - equal / (n * (n - 1))


# ---------------------------------------------------------------- registry and factory


def test_registry_names():
    assert POLICIES == ("none", "flip-crop", "paper", "trivialaugment", "randaugment")
    assert BACKENDS == ("batched", "per-sample")


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_shapes_dtypes_and_range(policy, backend, channels, size):
    torch.manual_seed(0)
    augment = build_augment(policy, backend, channels, size)
    if policy == "none":
        assert augment is None
        augment = (BatchedAugment if backend == "batched" else PerSampleAugment)(policy, channels, size)
    images = torch.stack([textured(channels, size, seed) for seed in range(8)])
    if backend == "batched":
        x = images.float() / 255
        out = augment(x)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        if policy == "none":
            assert torch.equal(out, x)
    else:
        outs = [augment(image) for image in images]
        for image, out in zip(images, outs):
            assert out.shape == image.shape and out.dtype == torch.uint8
            if policy == "none":
                assert torch.equal(out, image)


@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_batched_leaves_its_input_alone(policy):
    x = batch_of(textured(3, 32), 16)
    before = x.clone()
    BatchedAugment(policy, 3, 32)(x)
    assert torch.equal(x, before)


def test_unknown_policy_names_the_nearest():
    with pytest.raises(UsageError) as error:
        build_augment("papr", "batched", 1, 28)
    message = str(error.value)
    assert "'papr'" in message and "nearest: paper" in message and "\n" not in message


def test_unknown_backend():
    with pytest.raises(UsageError, match="augmentation backend 'gpu'"):
        build_augment("paper", "gpu", 1, 28)


def test_saturation_is_dropped_on_one_channel():
    def kinds(policy):
        return {op.kind for slot in policy.slots for op in slot.ops}

    assert "saturation" in kinds(get_policy("paper").for_channels(3))
    assert "saturation" not in kinds(get_policy("paper").for_channels(1))
    assert "saturation" not in kinds(get_policy("trivialaugment").for_channels(1))
    assert len(get_policy("trivialaugment").for_channels(1).slots[0].ops) == 13


def test_per_sample_is_picklable_for_workers():
    augment = pickle.loads(pickle.dumps(build_augment("trivialaugment", "per-sample", 3, 32)))
    assert augment(textured(3, 32)).shape == (3, 32, 32)


# ---------------------------------------------------------------- per-image randomness


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_every_image_gets_its_own_draw(policy, channels, size):
    torch.manual_seed(0)
    out = BatchedAugment(policy, channels, size)(batch_of(textured(channels, size), 64))
    assert distinct_pair_fraction(out) >= 0.9


def test_trivialaugment_chooses_ops_per_image():
    torch.manual_seed(0)
    policy = get_policy("trivialaugment").for_channels(3)
    draws = sample_draws(policy, 64)
    assert draws.choice[:, 0].unique().numel() >= 10  # of 14 ops; kornia's TrivialAugment would give 1


def test_paper_flips_about_half():
    torch.manual_seed(0)
    policy = get_policy("paper").for_channels(1)
    flip_slot = next(i for i, s in enumerate(policy.slots) if s.ops[0].kind == "hflip")
    applied = (sample_draws(policy, 2000).choice[:, flip_slot] >= 0).float().mean().item()
    assert 0.45 < applied < 0.55


def test_randaugment_magnitude_is_fixed_with_random_sign():
    torch.manual_seed(0)
    policy = get_policy("randaugment").for_channels(3)
    rotate = next(op for op in policy.slots[0].ops if op.kind == "rotate")
    angles = strength(rotate, sample_draws(policy, 500).u[:, 0])
    assert torch.allclose(angles.abs(), torch.full_like(angles, 9.0))
    assert 0.4 < (angles > 0).float().mean().item() < 0.6


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_under_manual_seed(backend):
    image = textured(3, 32)
    augment = build_augment("trivialaugment", backend, 3, 32)

    def run():
        torch.manual_seed(123)
        if backend == "batched":
            return augment(batch_of(image, 16))
        return torch.stack([augment(image) for _ in range(16)])

    assert torch.equal(run(), run())


# ---------------------------------------------------------------- the backends agree


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_same_draws_same_image(policy, channels, size):
    """One sampler, two appliers: batched (kornia/torch) and per-sample (torchvision v2) give the same pixels,
    up to float rounding (a value on a posterize step may land one level apart)."""
    torch.manual_seed(0)
    images = torch.stack([textured(channels, size, seed) for seed in range(32)]).float() / 255
    batched, per_sample = BatchedAugment(policy, channels, size), PerSampleAugment(policy, channels, size)
    draws = sample_draws(batched.policy, len(images))
    a = batched.apply_draws(images, draws)
    b = torch.stack([per_sample.apply_draws(images[i], draws, i) for i in range(len(images))])
    diff = (a - b).abs()
    assert diff.mean() < 1e-4
    assert (diff > 1e-4).float().mean() < 1e-3


def test_per_sample_call_matches_batched_statistics():
    """The full per-sample path (own draws, uint8 in and out) changes images as much as the batched one."""
    torch.manual_seed(0)
    image = textured(1, 28)
    x = batch_of(image, 256)
    batched = BatchedAugment("paper", 1, 28)(x)
    per_sample = PerSampleAugment("paper", 1, 28)
    ps = torch.stack([per_sample(image) for _ in range(256)]).float() / 255
    change_b, change_p = (batched - x).abs().mean().item(), (ps - x).abs().mean().item()
    assert change_b > 0.02
    assert abs(change_b - change_p) < 0.1 * change_b


@pytest.mark.parametrize("kind", [k for k, v in KINDS.items() if not v.geometric and not v.noop])
def test_colour_op_matches_torchvision(kind):
    torch.manual_seed(0)
    channels = 3
    x = torch.stack([textured(channels, 32, seed) for seed in range(6)]).float() / 255
    op = Op(kind, 0.0, 0.9, signed=kind not in ("posterize", "solarize", "autocontrast", "equalize"))
    v = KINDS[kind].value(op, sample_draws(Policy("test", each(op)), len(x)).u[:, 0])
    got = KINDS[kind].batched(x.clone(), v)
    want = torch.stack([KINDS[kind].per_sample(x[i], float(v[i])) for i in range(len(x))])
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("kind", [k for k, v in KINDS.items() if v.neutral is not None])
def test_a_neutral_value_leaves_images_bit_for_bit(kind):
    """The batched backend gives the neutral value to the images that did not draw the op instead of selecting."""
    x = torch.stack([textured(3, 32, seed) for seed in range(4)]).float() / 255
    x[0, 0] = 0.0  # a black channel, and a white one
    x[1, 2] = 1.0
    got = KINDS[kind].batched(x.clone(), torch.full((len(x),), KINDS[kind].neutral))
    assert torch.equal(got, x)


def test_equalize_is_torchvisions_bin_for_bin():
    """The batched equalize is written out; torchvision's (the per-sample backend's) is the reference."""
    x = torch.rand(6, 3, 17, 23, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 0.3  # flat: kept (as its level)
    x[0, 1] = (x[0, 1] > 0.5).float()  # two levels
    x[1, 0] = (x[1, 0] > 0.99).float() * 0.5  # a few pixels above a flat background
    x[1, 1] = (x[1, 1] * 4).floor() / 4
    x[2, 2, 3, 4] = 1.0
    assert torch.equal(KINDS["equalize"].batched(x, torch.zeros(6)), TF.equalize(x))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "paper-half"])
def test_images_that_draw_nothing_keep_their_pixels(policy, channels):
    torch.manual_seed(0)
    scaled = get_policy("paper").scaled(0.5) if policy == "paper-half" else get_policy(policy)  # p 0.5: may draw none
    augment = BatchedAugment(scaled, channels, 32)
    x = torch.stack([textured(channels, 32, seed) for seed in range(16)]).float() / 255
    draws = sample_draws(augment.policy, len(x))
    draws.choice[:4] = -1
    out = augment.apply_draws(x, draws)
    assert torch.equal(out[:4], x[:4])
    assert not torch.equal(out[4:], x[4:])


# ---------------------------------------------------------------- per-sample: many images at once


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_augment_many_is_apply_draws_image_by_image(policy, channels, size):
    """One draw and one parameter computation for the batch, the same images as one call per image with the
    same draws; and, like those, the batched backend's images up to rounding."""
    torch.manual_seed(0)
    images = torch.stack([textured(channels, size, seed) for seed in range(16)])
    per_sample = PerSampleAugment(policy, channels, size)
    draws = sample_draws(per_sample.policy, len(images))
    many = per_sample.augment_many(images, draws)
    x = TF.to_dtype(images, torch.float32, scale=True)
    one_by_one = torch.stack([per_sample.apply_draws(x[i], draws, i) for i in range(len(images))])
    assert many.dtype == torch.uint8 and torch.equal(many, one_by_one.mul(255).round().to(torch.uint8))
    batched = BatchedAugment(policy, channels, size).apply_draws(x, draws).mul(255).round()
    diff = (many.float() - batched).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_augment_many_draws_per_image_and_a_call_is_one_image_of_it():
    image = textured(3, 32)
    per_sample = PerSampleAugment("trivialaugment", 3, 32)
    torch.manual_seed(3)
    many = per_sample.augment_many(image.expand(32, -1, -1, -1))
    assert many.shape == (32, 3, 32, 32) and distinct_pair_fraction(many.float()) >= 0.9
    torch.manual_seed(4)
    one = per_sample(image)
    torch.manual_seed(4)
    assert torch.equal(one, per_sample.augment_many(image.unsqueeze(0))[0])
    with pytest.raises(ValueError, match="uint8 images"):
        per_sample.augment_many(image)


# ---------------------------------------------------------------- geometry against torchvision


def one_op(op: Op, channels: int, size: int) -> BatchedAugment:
    return BatchedAugment(Policy("test", each(op)), channels, size)


def test_flip_with_p1_flips():
    x = batch_of(textured(3, 32), 4)
    assert torch.allclose(one_op(Op("hflip"), 3, 32)(x), x.flip(-1), atol=1e-5)


def test_rotation_is_torchvisions():
    x = batch_of(textured(1, 28), 2)
    got = one_op(Op("rotate", 30.0, 30.0), 1, 28)(x)
    want = TF.rotate(x, 30.0, interpolation=TF.InterpolationMode.BILINEAR)
    assert torch.allclose(got, want, atol=1e-5)


def test_pad_crop_is_a_zero_padded_shift():
    augment = one_op(Op("pad_crop", high=1 / 8), 3, 32)
    x = batch_of(textured(3, 32), 1)
    draws = sample_draws(augment.policy, 1)
    draws.u[0, 0, 3], draws.u[0, 0, 4] = 0.0, 0.999  # shift x by -4, y by +4 (pad 32 // 8 = 4)
    want = torch.zeros_like(x)
    want[..., 4:, :-4] = x[..., :-4, 4:]
    assert torch.allclose(augment.apply_draws(x, draws), want, atol=1e-5)


def test_resized_crop_keeps_size_and_matches_torchvision_inside():
    augment = one_op(Op("resized_crop", 0.25, 0.25), 1, 32)
    x = batch_of(textured(1, 32), 1)
    draws = sample_draws(augment.policy, 1)
    draws.u[0, 0, 5], draws.u[0, 0, 6] = 0.0, 1.0  # the 16x16 box at the bottom left
    got = augment.apply_draws(x, draws)
    want = TF.resized_crop(x, 16, 0, 16, 16, [32, 32], antialias=False)
    assert got.shape == x.shape
    # torchvision clamps at the box edge, the warp reads the pixels beyond it: compare inside the edge
    assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-5)


def test_warp_resamples_like_kornia_warp_affine():
    """The batched warp builds its own grid but must sample exactly where kornia's warp_affine does."""
    torch.manual_seed(0)
    n, size = 8, 28
    x = torch.rand(n, 3, size, size)
    a, b, c, d = (torch.eye(2).flatten().repeat(n, 1) + 0.2 * torch.randn(n, 4)).unbind(1)
    tx, ty = (3 * torch.randn(n, 2)).unbind(1)
    got = _warp(x, Affine(a, b, tx, c, d, ty))
    centre = (size - 1) / 2  # kornia's maps are in pixel-index coordinates
    matrix = torch.stack([a, b, tx + centre - (a + b) * centre, c, d, ty + centre - (c + d) * centre], 1)
    want = kornia.geometry.transform.warp_affine(x, matrix.view(n, 2, 3), (size, size), align_corners=True)
    assert torch.allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------- batch mixing


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_batch_mix_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    mix = BatchMix(mixup, cutmix, num_classes=10)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    mixed, targets = mix(x, y)
    assert mixed.shape == x.shape
    assert targets.shape == (16, 10) and targets.dtype.is_floating_point
    assert torch.allclose(targets.sum(1), torch.ones(16))


def test_batch_mix_refuses_bad_alphas():
    with pytest.raises(UsageError, match=">= 0"):
        BatchMix(-0.1, 0.0, 10)
    with pytest.raises(UsageError, match="nothing to mix"):
        BatchMix(0.0, 0.0, 10)
    assert build_batch_mix(0.0, 0.0, 10) is None
    assert isinstance(build_batch_mix(0.2, 0.0, 10), BatchMix)


# ---------------------------------------------------------------- augmentation strength


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", RANDOM_POLICIES)
def test_strength_one_is_the_policy_itself_bit_for_bit(policy, backend):
    assert get_policy(policy).scaled(1.0) is get_policy(policy)
    image = textured(1, 28)

    def run(augment):
        torch.manual_seed(5)
        if backend == "batched":
            return augment(batch_of(image, 16))
        return torch.stack([augment(image) for _ in range(16)])

    assert torch.equal(run(build_augment(policy, backend, 1, 28)), run(build_augment(policy, backend, 1, 28, 1.0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_strength_zero_is_no_augmentation(policy, backend):
    assert get_policy(policy).scaled(0.0).slots == ()
    assert build_augment(policy, backend, 3, 32, 0.0) is None  # the training loop then only normalises


def test_strength_scales_magnitudes_and_probabilities_within_each_ops_domain():
    def ops(policy, s):
        return {op.kind: op for slot in get_policy(policy).scaled(s).slots for op in slot.ops}

    paper = ops("paper", 2.0)
    assert paper["rotate"].high == 10.0 and paper["translate_x"].high == pytest.approx(0.1)
    assert paper["hflip"].p == 1.0  # 0.5 x 2
    assert paper["resized_crop"].low == pytest.approx(0.6) and paper["resized_crop"].high == 1.0  # cuts 0..40 %
    assert paper["resized_crop"].ratio == pytest.approx(((3 / 4) ** 2, (4 / 3) ** 2))
    half = ops("paper", 0.5)
    assert half["hflip"].p == 0.25 and half["rotate"].p == 0.5 and half["brightness"].high == pytest.approx(0.1)
    wide = ops("trivialaugment", 2.0)
    assert wide["rotate"].high == 180.0 and wide["brightness"].high == 1.0 and wide["posterize"].high == 7.0
    assert wide["translate_x"].high == 1.0 and wide["solarize"].high == 1.0  # clamped to what each op defines
    assert ops("randaugment", 2.0)["rotate"].low == 18.0  # fixed strength stays fixed, doubled
    with pytest.raises(UsageError, match=">= 0"):
        get_policy("paper").scaled(-1.0)


@pytest.mark.parametrize("policy", ["paper", "trivialaugment", "randaugment"])
def test_stronger_policies_change_images_more(policy):
    x = batch_of(textured(1, 28), 256)

    def change(s):
        torch.manual_seed(0)
        return (build_augment(policy, "batched", 1, 28, s)(x) - x).abs().mean().item()

    weak, base, strong = change(0.5), change(1.0), change(2.0)
    assert weak < base < strong


@pytest.mark.parametrize("policy", ["paper", "trivialaugment"])
def test_backends_agree_at_another_strength(policy):
    torch.manual_seed(0)
    images = torch.stack([textured(3, 32, seed) for seed in range(32)]).float() / 255
    scaled = get_policy(policy).scaled(1.7)
    batched, per_sample = BatchedAugment(scaled, 3, 32), PerSampleAugment(scaled, 3, 32)
    draws = sample_draws(batched.policy, len(images))
    a = batched.apply_draws(images, draws)
    b = torch.stack([per_sample.apply_draws(images[i], draws, i) for i in range(len(images))])
    diff = (a - b).abs()
    assert diff.mean() < 1e-4 and (diff > 1e-4).float().mean() < 1e-3
