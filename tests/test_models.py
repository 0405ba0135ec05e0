"""The model registry: every own net (parametrised over OWN_MODELS, so a new one is tested on registration),
a few small timm nets, and the cost figures (params, training FLOPs) the studies report."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from distcnn.errors import UsageError
from distcnn.models import (
    LISTED_TIMM_MODELS,
    OWN_MODELS,
    check_input_size,
    count_params,
    create_model,
    describe,
    model_names,
    register_model,
    train_flops_per_image,
)

OWN_NAMES = sorted(OWN_MODELS)
SMALL_TIMM_NAMES = ["mobilenetv2_050", "resnet10t"]
TIMM_IMAGE_SIZE = 32
# convnext downsamples by 32 with kernels that must fit: a real model that cannot take 28x28 Fashion-MNIST.
TOO_SMALL = ("convnext_atto", 28)


def output_of(model: nn.Module, in_chans: int, image_size: int, batch: int = 3) -> torch.Tensor:
    model.train()
    return model(torch.randn(batch, in_chans, image_size, image_size))


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_size", [28, 14, 7])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", OWN_NAMES)
def test_own_net_classifies_any_subimage_size(name, in_chans, image_size):
    model = create_model(name, in_chans=in_chans, num_classes=10)
    assert output_of(model, in_chans, image_size).shape == (3, 10)


@pytest.mark.parametrize("name", OWN_NAMES)
def test_own_net_survives_tiny_tiles_and_tiny_widths(name):
    model = create_model(name, in_chans=1, num_classes=4, width=0.01)
    assert output_of(model, 1, 1).shape == (3, 4)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", SMALL_TIMM_NAMES)
def test_timm_net_output_shape(name, in_chans):
    model = create_model(name, in_chans=in_chans, num_classes=7)
    assert output_of(model, in_chans, TIMM_IMAGE_SIZE, batch=2).shape == (2, 7)


# ---------------------------------------------------------------------------------------------- width


@pytest.mark.parametrize("name", OWN_NAMES)
def test_params_shrink_roughly_with_width_squared(name):
    full = count_params(create_model(name, in_chans=1, num_classes=10, width=1.0))
    half = count_params(create_model(name, in_chans=1, num_classes=10, width=0.5))
    assert half < 0.35 * full


def test_width_only_scales_own_nets():
    with pytest.raises(UsageError, match="mobilenetv2_050"):
        create_model("mobilenetv2_100", in_chans=3, num_classes=10, width=0.5)


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan")])
def test_width_must_be_positive(width):
    with pytest.raises(UsageError, match="width"):
        create_model("simplecnn", in_chans=1, num_classes=10, width=width)


def test_channels_and_classes_must_be_positive():
    with pytest.raises(UsageError, match="channels"):
        create_model("simplecnn", in_chans=0, num_classes=10)
    with pytest.raises(UsageError, match="classes"):
        create_model("lenet", in_chans=1, num_classes=0)


def test_count_params_skips_frozen_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert count_params(model) == 3 * 2 + 2


# ---------------------------------------------------------------------------------------------- names


def test_unknown_name_suggests_the_nearest_not_all():
    with pytest.raises(UsageError) as caught:
        create_model("resnt18", in_chans=3, num_classes=10)
    message = str(caught.value)
    assert "unknown model 'resnt18'" in message and "resnet18" in message
    assert "distcnn models --filter" in message
    assert len(message) < 300 and "\n" not in message


def test_typo_of_an_own_net_suggests_it():
    with pytest.raises(UsageError, match="simplecnn"):
        create_model("simplecnm", in_chans=1, num_classes=10)


def test_model_names_lists_own_nets_first_then_timm():
    names = model_names()
    assert names[: len(OWN_MODELS)] == list(OWN_MODELS)
    assert "resnet18" in names and len(names) == len(set(names))


def test_own_names_do_not_shadow_timm_names():
    assert not set(OWN_MODELS) & set(timm.list_models())


def test_listed_timm_models_exist_in_this_timm():
    assert set(LISTED_TIMM_MODELS) <= set(timm.list_models())


def test_registering_a_name_twice_is_refused():
    def simplecnn(in_chans, num_classes, width=1.0):  # same name as the registered net
        return nn.Identity()

    with pytest.raises(ValueError, match="twice"):
        register_model(simplecnn)
    assert OWN_MODELS["simplecnn"] is not simplecnn


# ---------------------------------------------------------------------------------------------- FLOPs
# FlopCounterMode counts a multiply-add as 2 FLOPs. Backward of a layer costs its input gradient plus its weight
# gradient (2x forward), except the first layer: images do not require grad, so only its weight gradient runs.


def test_training_flops_of_one_linear_layer():
    inputs, outputs = 12, 5
    forward = 2 * inputs * outputs
    weight_grad = 2 * inputs * outputs
    layer = nn.Sequential(nn.Flatten(), nn.Linear(inputs, outputs))  # images of inputs x 1 x 1
    assert train_flops_per_image(layer, in_chans=inputs, image_size=1) == forward + weight_grad


def test_training_flops_of_two_linear_layers_follow_the_3x_rule_after_the_first():
    inputs, hidden, outputs = 12, 7, 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
    first = 2 * inputs * hidden
    second = 2 * hidden * outputs
    assert train_flops_per_image(model, in_chans=inputs, image_size=1) == 2 * first + 3 * second


def test_training_flops_of_a_small_conv_net():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 5, 3))
    # 8x8 -> 6x6 -> 4x4; a conv's forward is 2 * in_chans * k * k * out_chans per output pixel
    first = 2 * 1 * 3 * 3 * 3 * 6 * 6
    second = 2 * 3 * 3 * 3 * 5 * 4 * 4
    assert train_flops_per_image(model, in_chans=1, image_size=8) == 2 * first + 3 * second


@pytest.mark.parametrize("grads_before", ["none", "accumulated"])
def test_flop_counting_leaves_the_model_as_it_was(grads_before):
    model = create_model("simplecnn", in_chans=1, num_classes=10)
    if grads_before == "accumulated":
        output_of(model, 1, 28).sum().backward()
    model.eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng_state = torch.get_rng_state()

    assert train_flops_per_image(model, in_chans=1, image_size=28) > 0

    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng_state)
    for key, value in model.state_dict().items():  # weights and BatchNorm running stats
        assert torch.equal(value, state[key]), key
    for parameter, grad in zip(model.parameters(), grads):
        assert (parameter.grad is None) if grad is None else torch.equal(parameter.grad, grad)


def test_deep_net_costs_several_times_the_shallow_one():
    shallow = train_flops_per_image(create_model("simplecnn", in_chans=1, num_classes=10), 1, 28)
    deep = train_flops_per_image(create_model("deepcnn", in_chans=1, num_classes=10), 1, 28)
    assert 3 <= deep / shallow <= 5


# ---------------------------------------------------------------------------------------------- input size


@pytest.mark.parametrize("name", OWN_NAMES)
def test_own_nets_fit_small_tiles(name):
    model = create_model(name, in_chans=1, num_classes=10)
    check_input_size(model, in_chans=1, image_size=7, name=name)


def test_image_too_small_for_the_model_is_a_usage_error():
    name, image_size = TOO_SMALL
    model = create_model(name, in_chans=1, num_classes=10)
    model.train()
    with pytest.raises(UsageError, match=f"image size {image_size} is too small for model '{name}'"):
        check_input_size(model, in_chans=1, image_size=image_size, name=name)
    assert model.training
    check_input_size(model, in_chans=1, image_size=64, name=name)


def test_image_size_must_be_positive():
    with pytest.raises(UsageError, match="image size"):
        check_input_size(create_model("lenet", in_chans=1, num_classes=10), 1, 0, "lenet")


# ---------------------------------------------------------------------------------------------- describe


def test_describe_gives_params_and_flops_per_row():
    rows = describe(["simplecnn", "mobilenetv2_050"], in_chans=1, image_size=TIMM_IMAGE_SIZE, num_classes=10)
    assert [(row["name"], row["source"]) for row in rows] == [("simplecnn", "distcnn"), ("mobilenetv2_050", "timm")]
    for row in rows:
        assert row["error"] is None
        assert row["params"] > 0 and row["train_flops_per_image"] > 0


def test_describe_reports_what_does_not_fit_in_its_row():
    name, image_size = TOO_SMALL
    (too_small,) = describe([name], in_chans=1, image_size=image_size, num_classes=10)
    assert "too small" in too_small["error"] and too_small["params"] > 0
    assert too_small["train_flops_per_image"] is None
    own, timm_row = describe(["lenet", "resnet10t"], in_chans=1, image_size=28, num_classes=10, width=0.5)
    assert own["error"] is None and own["train_flops_per_image"] > 0
    assert "--width" in timm_row["error"] and timm_row["params"] is None


def test_describe_refuses_unknown_names():
    with pytest.raises(UsageError, match="nearest: lenet"):
        describe(["lenett"], in_chans=1, image_size=28, num_classes=10)
