"""A generated dataset for tests and smoke runs: learnable in a few steps, but not trivially.

Each class has a smooth random template (a coarse 5x5 random grid, bilinearly upsampled) and a stripe texture
(its own orientation and period). An image is its class template shifted by up to a quarter of its size, plus
the stripes at a random phase, scaled by a random contrast, lifted by a random brightness and covered in pixel
noise. A nearest-class-mean classifier sees only the template, blurred by the shifts, so it is right well above
chance but far from always (about 63 % with 10 classes); a small CNN also finds the stripes, which are local and
shift-invariant, so even one that pools globally learns them in a few dozen steps. Everything comes from a fixed
seed, independent of ``split_seed``: the same options give the same images on every rank and every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcnn.data.splits import Pool, take_by_index
from distcnn.errors import UsageError, unknown

SEED = 20_240_607
DEFAULTS = {"n": 2000, "test": 500, "classes": 10, "channels": 1}
DEFAULT_IMAGE_SIZE = 28
OPTION_HELP = "synthetic:n=2000,test=500,classes=10,channels=1"

TEMPLATE_GRID = 5  # coarse grid of each class template: low frequency, so shifts change it only gradually
MAX_SHIFT_FRACTION = 1 / 4  # translation up to 7 px at 28 px: what keeps nearest-class-mean from winning
NOISE = 1.5  # pixel noise relative to a template's unit standard deviation
STRIPES = 1.5  # amplitude of the class's stripe texture (random phase, so class means do not show it)
STRIPE_PERIODS = (4.0, 8.0)  # pixels per stripe cycle at 28 px, scaled with the image size
CHUNK = 4096  # images generated at a time, bounding the float working set


def parse_options(text: str) -> dict[str, int]:
    """'n=500,classes=4' → the full option dict; UsageError naming a bad key or value."""
    options = dict(DEFAULTS)
    seen = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if key not in DEFAULTS:
            raise unknown("synthetic option", key, DEFAULTS)
        if not sep or not value:
            raise UsageError(f"synthetic option {key!r} needs a value, e.g. {OPTION_HELP}")
        if key in seen:
            raise UsageError(f"synthetic option {key!r} is given twice")
        seen.add(key)
        try:
            options[key] = int(value)
        except ValueError:
            raise UsageError(f"synthetic option {key}={value!r} is not a whole number, e.g. {OPTION_HELP}") from None
    if options["classes"] < 2:
        raise UsageError(f"synthetic option classes={options['classes']} is too small; allowed: 2 or more")
    if options["channels"] not in (1, 3):
        raise UsageError(f"synthetic option channels={options['channels']} is not allowed; allowed: 1, 3")
    if options["n"] < options["classes"]:
        raise UsageError(
            f"synthetic option n={options['n']} is too small; allowed: at least classes={options['classes']}"
        )
    if options["test"] < 1:
        raise UsageError(f"synthetic option test={options['test']} is too small; allowed: 1 or more")
    return options


def class_templates(classes: int, channels: int, size: int, margin: int, generator: torch.Generator) -> torch.Tensor:
    """(classes, channels, size + 2 margin, same) smooth patterns with zero mean and unit deviation each."""
    coarse = torch.randn(classes, channels, TEMPLATE_GRID, TEMPLATE_GRID, generator=generator)
    full = size + 2 * margin
    smooth = F.interpolate(coarse, size=(full, full), mode="bilinear", align_corners=False)
    smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


def stripe_waves(classes: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the wave vector (ky, kx) of its stripes: orientations spread over 180 degrees, two periods."""
    orientations = -(-classes // len(STRIPE_PERIODS))
    k = torch.arange(classes)
    angle = torch.pi * (k % orientations) / orientations
    period = torch.tensor(STRIPE_PERIODS)[k // orientations] * size / DEFAULT_IMAGE_SIZE
    wavenumber = 2 * torch.pi / period
    return wavenumber * torch.sin(angle), wavenumber * torch.cos(angle)


def render(
    templates: torch.Tensor, labels: torch.Tensor, size: int, margin: int, generator: torch.Generator
) -> torch.Tensor:
    """uint8 (N, C, size, size) images of the given labels, in chunks; deterministic for a generator state."""
    channels = templates.shape[1]
    out = torch.empty(len(labels), channels, size, size, dtype=torch.uint8)
    grid = torch.arange(size)
    wave_y, wave_x = stripe_waves(templates.shape[0], size)
    ys, xs = grid.view(1, 1, size, 1).float(), grid.view(1, 1, 1, size).float()
    for start in range(0, len(labels), CHUNK):
        chunk = labels[start : start + CHUNK]
        n = len(chunk)
        dy, dx = torch.randint(0, 2 * margin + 1, (2, n, 1, 1, 1), generator=generator)
        rows = (grid.view(1, 1, size, 1) + dy).expand(n, channels, size, size)
        cols = (grid.view(1, 1, 1, size) + dx).expand(n, channels, size, size)
        chans = torch.arange(channels).view(1, channels, 1, 1).expand(n, channels, size, size)
        shifted = templates[chunk.view(n, 1, 1, 1), chans, rows, cols]
        contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=generator)
        brightness = torch.randn(n, 1, 1, 1, generator=generator) * 0.3
        phase = torch.rand(n, 1, 1, 1, generator=generator) * 2 * torch.pi
        ky, kx = wave_y[chunk].view(n, 1, 1, 1), wave_x[chunk].view(n, 1, 1, 1)
        stripes = STRIPES * torch.cos(ky * ys + kx * xs + phase)
        noise = torch.randn(n, channels, size, size, generator=generator) * NOISE
        pixels = 128 + 40 * (contrast * (shifted + stripes) + brightness + noise)
        out[start : start + n] = pixels.round().clamp(0, 255).to(torch.uint8)
    return out


def load_pool(options_text: str, image_size: int | None) -> Pool:
    """``n`` balanced training-pool images and ``test`` test images, generated at ``image_size``."""
    options = parse_options(options_text)
    size = image_size or DEFAULT_IMAGE_SIZE
    margin = max(1, round(size * MAX_SHIFT_FRACTION))
    classes, channels, n, n_test = options["classes"], options["channels"], options["n"], options["test"]
    # Separate streams: the templates do not depend on n, and the training pool does not depend on test.
    templates = class_templates(classes, channels, size, margin, torch.Generator().manual_seed(SEED))
    train_labels = torch.arange(n) % classes
    test_labels = torch.arange(n_test) % classes
    train_images = render(templates, train_labels, size, margin, torch.Generator().manual_seed(SEED + 1))
    test_images = render(templates, test_labels, size, margin, torch.Generator().manual_seed(SEED + 2))
    described = ",".join(f"{key}={value}" for key, value in options.items())
    return Pool(
        name="synthetic",
        source=f"synthetic:{described} (seed {SEED}, {size}px)",
        classes=[f"class{k}" for k in range(classes)],
        labels=torch.cat([train_labels, test_labels]),
        gather=take_by_index(torch.cat([train_images, test_images])),
        train=torch.arange(n),
        test=torch.arange(n, n + n_test),
    )
