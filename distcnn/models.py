"""Model registry: distcnn's own small CNNs plus every timm architecture, found by name through one factory.

Own nets are plain functions registered with `@register_model` (the timm pattern), so a new net is listed,
described and tested the moment it is registered. Every own net ends in global average pooling and pools with
`ceil_mode=True`, so it accepts any image size, including the small subimages of a domain decomposition
(7x7 or 14x14 tiles of a 28x28 image). `width` scales every hidden channel count as max(1, round(c * width)),
so the parameter count shrinks roughly with width² (only the first conv and the classifier shrink linearly).

Model cost is measured here too: trainable parameters and training FLOPs per image (forward + backward as
`torch.utils.flop_counter` counts them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from distcnn.errors import UsageError, unknown

OWN_MODELS: dict[str, Callable[..., nn.Module]] = {}

# What `distcnn models` shows next to the own nets when no filter is given: small, CPU-friendly timm nets.
LISTED_TIMM_MODELS: tuple[str, ...] = (
    "resnet18",
    "mobilenetv2_100",
    "mobilenetv2_050",
    "mobilenetv3_small_100",
    "mobileone_s1",
    "efficientnet_b0",
)

WIDTH_IS_OWN_ONLY = (
    "--width applies to distcnn's own nets ({own}); for timm pick a narrower variant such as mobilenetv2_050"
)


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add an own net to the registry under its function name; the factory takes (in_chans, num_classes, width)."""
    name = factory.__name__
    if name in OWN_MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    OWN_MODELS[name] = factory
    return factory


# ---------------------------------------------------------------------------------------------- own nets


def scaled_channels(channels: int, width: float) -> int:
    """Channels after width scaling; never 0, so even a very narrow local CNN is still a network."""
    return max(1, round(channels * width))


def conv_bn_relu(in_chans: int, out_chans: int) -> list[nn.Module]:
    """3x3 same-padding conv, BatchNorm, ReLU; the conv has no bias because BatchNorm supplies one."""
    return [
        nn.Conv2d(in_chans, out_chans, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    ]


def halve() -> nn.Module:
    """2x2 max-pool that rounds up, so a 1x1 map stays 1x1 instead of vanishing on small subimages."""
    return nn.MaxPool2d(kernel_size=2, ceil_mode=True)


class PlainCNN(nn.Module):
    """A VGG-style stack: stages of conv-BN-ReLU separated by max-pools, then global average pool and a linear.

    `stages` lists the channel counts of each stage, e.g. ((32,), (64,), (128,)) is three single-conv stages.
    """

    def __init__(self, stages: Sequence[Sequence[int]], in_chans: int, num_classes: int, width: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for index, stage in enumerate(stages):
            if index > 0:
                layers.append(halve())
            for stage_channels in stage:
                out_channels = scaled_channels(stage_channels, width)
                layers += conv_bn_relu(channels, out_channels)
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # global average pool as a mean: vmap batches it (local CNNs run together), adaptive pooling it does not
        return self.classifier(self.features(images).mean(dim=(2, 3)))


@register_model
def simplecnn(in_chans: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """The shallow net: four conv-BN-ReLU layers (32-64-96-96 channels at width 1) with two max-pools.

    Sized to train Fashion-MNIST to > 80 % in two epochs on two CPU cores: a fourth conv at the 7x7 stage
    gains about 5 points over three convs, for less than twice the FLOPs; params ~ 0.16M · width².
    """
    return PlainCNN(((32,), (64,), (96, 96)), in_chans, num_classes, width)


@register_model
def deepcnn(in_chans: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """The deep counterpart of simplecnn for shallow-vs-deep studies: eight conv-BN-ReLU layers in four stages.

    Two convs per stage, VGG-style, and a fourth stage: about 3x simplecnn's training FLOPs at 28x28;
    params ~ 0.58M · width².
    """
    return PlainCNN(((32, 32), (64, 64), (128, 128), (128, 128)), in_chans, num_classes, width)


class LeNet5(nn.Module):
    """LeNet-5's shape (conv5-pool-conv5-pool-fc-fc-fc, 6-16-120-84 units) with ReLU and max-pool.

    Both convs pad by 2 and the pools round up, and an adaptive pool restores the classic 16x5x5 input of the
    first dense layer, so any image size works while 28x28 keeps the classic parameter count.
    """

    def __init__(self, in_chans: int, num_classes: int, width: float):
        super().__init__()
        conv1, conv2, fc1, fc2 = (scaled_channels(c, width) for c in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, conv1, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            halve(),
            nn.Conv2d(conv1, conv2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            halve(),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Linear(conv2 * 5 * 5, fc1),
            nn.ReLU(inplace=True),
            nn.Linear(fc1, fc2),
            nn.ReLU(inplace=True),
            nn.Linear(fc2, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


@register_model
def lenet(in_chans: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """Classic LeNet-5, size-agnostic; params ~ 62k · width² (the 400x120 dense layer dominates)."""
    return LeNet5(in_chans, num_classes, width)


# ---------------------------------------------------------------------------------------------- lookup


def _timm():
    """timm, imported on first use: a run of an own net never imports it (with it come torchvision and
    torch._dynamo, 1.5 s of CPU at every rank's start)."""
    import timm

    return timm


@functools.cache
def timm_names() -> tuple[str, ...]:
    """timm's architecture names, listed once per process (lookups and suggestions reuse them)."""
    return tuple(_timm().list_models())


def model_names() -> list[str]:
    """Every name `create_model` accepts: the own nets first, then timm's architectures."""
    return list(OWN_MODELS) + [name for name in timm_names() if name not in OWN_MODELS]


def unknown_model(name: str) -> UsageError:
    """'unknown model' with only the nearest names: listing all ~1,300 timm names would bury the hint."""
    error = unknown("model", name, model_names(), show_all=False)
    return UsageError(f"{error}; list names with `distcnn models --filter 'PATTERN*'`")


def model_source(name: str) -> str:
    """'distcnn' for an own net, 'timm' for a timm architecture; UsageError for anything else."""
    if name in OWN_MODELS:
        return "distcnn"
    if name in timm_names() or _timm().is_model(name):  # is_model also accepts tagged names like resnet18.a1_in1k
        return "timm"
    raise unknown_model(name)


def create_model(name: str, *, in_chans: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """Build a fresh, randomly initialised classifier by name (never pretrained weights: no network)."""
    source = model_source(name)
    if not width > 0:
        raise UsageError(f"--width must be > 0, got {width}")
    if in_chans < 1:
        raise UsageError(f"the number of input channels must be >= 1, got {in_chans}")
    if num_classes < 1:
        raise UsageError(f"the number of classes must be >= 1, got {num_classes}")
    if source == "distcnn":
        return OWN_MODELS[name](in_chans, num_classes, width=width)
    if width != 1.0:
        raise UsageError(WIDTH_IS_OWN_ONLY.format(own=", ".join(OWN_MODELS)))
    return _timm().create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------- cost


def count_params(model: nn.Module) -> int:
    """Trainable parameters: what the optimizer updates and DDP communicates each step."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live, so probe images are made on the same device."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def probe_images(model: nn.Module, in_chans: int, image_size: int) -> torch.Tensor:
    """Two random images (BatchNorm in train mode needs more than one value per channel), drawn from a private
    generator so that probing a model leaves the global random stream of a seeded run untouched."""
    if image_size < 1:
        raise UsageError(f"image size must be >= 1, got {image_size}")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, in_chans, image_size, image_size, generator=generator)
    return images.to(model_device(model))


def short_reason(error: BaseException) -> str:
    """The first line of an error, shortened, for a one-line UsageError."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = lines[0]
    return reason if len(reason) <= 160 else reason[:157] + "..."


def check_input_size(model: nn.Module, in_chans: int, image_size: int, name: str) -> None:
    """Fail early with one line when the images cannot pass through the model, instead of deep in training.

    A dry forward of two images in eval mode without gradients; the model's mode is restored afterwards.
    """
    images = probe_images(model, in_chans, image_size)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"image size {image_size} is too small for model {name!r}: {short_reason(error)}") from None
    except AssertionError as error:  # some timm nets (ViTs) assert one fixed input size
        raise UsageError(f"image size {image_size} does not fit model {name!r}: {short_reason(error)}") from None
    finally:
        model.train(was_training)


def train_flops_per_image(model: nn.Module, in_chans: int, image_size: int) -> int:
    """Training FLOPs per image: forward + backward of a train-mode batch of two, as FlopCounterMode counts.

    FlopCounterMode counts matmuls and convolutions (a multiply-add is 2 FLOPs), not BatchNorm, activations or
    pooling. Backward costs 2x forward per layer (input gradient + weight gradient), except the first layer:
    the images need no gradient, so its backward is 1x. The optimizer step is not counted.
    The model is left as it was: weights, `.grad`, BatchNorm running stats, train/eval mode and the global RNG.
    An image size the model cannot take raises the RuntimeError; call `check_input_size` first for a UsageError.
    """
    from torch.utils.flop_counter import FlopCounterMode  # here: it imports triton, 0.2 s that most never need

    images = probe_images(model, in_chans, image_size)
    parameters = list(model.parameters())
    saved_grads = [parameter.grad for parameter in parameters]
    saved_buffers = [buffer.detach().clone() for buffer in model.buffers()]
    was_training = model.training
    devices = [images.device] if images.device.type == "cuda" else []
    try:
        for parameter in parameters:
            parameter.grad = None
        model.train()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with FlopCounterMode(display=False) as counter:
                output = model(images)
                output.float().sum().backward()
        return counter.get_total_flops() // len(images)
    finally:
        for parameter, grad in zip(parameters, saved_grads):
            parameter.grad = grad
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
        model.train(was_training)


def shell_params(name: str, *, in_chans: int, num_classes: int, width: float) -> int:
    """Parameters counted on a model built on the meta device: shapes without memory or initialisation, so a
    large timm net is counted in milliseconds. A net whose constructor needs real tensors is built for real."""
    try:
        with torch.device("meta"):
            return count_params(create_model(name, in_chans=in_chans, num_classes=num_classes, width=width))
    except UsageError:
        raise
    except Exception:  # a constructor that cannot run on meta: the real build counts it, or says what is wrong
        return count_params(create_model(name, in_chans=in_chans, num_classes=num_classes, width=width))


def describe_each(
    names: Iterable[str], *, in_chans: int, image_size: int, num_classes: int, width: float = 1.0, flops: bool = True
) -> Iterator[dict]:
    """`describe`'s rows one at a time, so `distcnn models` can show each as soon as it is measured.

    Without `flops` no model is built for real or run: the params come from `shell_params`, and
    train_flops_per_image stays None — the way to list many timm nets quickly.
    """
    for name in names:
        row = {"name": name, "source": model_source(name), "params": None, "train_flops_per_image": None,
               "error": None}
        try:
            if not flops:
                row["params"] = shell_params(name, in_chans=in_chans, num_classes=num_classes, width=width)
            else:
                model = create_model(name, in_chans=in_chans, num_classes=num_classes, width=width)
                row["params"] = count_params(model)
                check_input_size(model, in_chans, image_size, name)
                row["train_flops_per_image"] = train_flops_per_image(model, in_chans, image_size)
        except UsageError as error:
            row["error"] = str(error)
        yield row


def describe(
    names: Iterable[str], *, in_chans: int, image_size: int, num_classes: int, width: float = 1.0, flops: bool = True
) -> list[dict]:
    """One row per model for `distcnn models`: name, source, params, train_flops_per_image and error.

    A model that cannot be built or run at these settings (image too small, --width for a timm net) gets its
    reason in `error` and None for the figures it lacks, so one bad row does not hide the table.
    An unknown name still raises: that is a typo to fix, not a row.
    """
    return list(describe_each(names, in_chans=in_chans, image_size=image_size, num_classes=num_classes,
                              width=width, flops=flops))
