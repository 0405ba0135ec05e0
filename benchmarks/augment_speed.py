"""Time each augmentation policy per batch: batched (one call on the whole batch) vs per-sample (one call per
image, as a DataLoader worker makes them), and the training step of a small CNN for scale.

    python benchmarks/augment_speed.py [--threads 2] [--batch 128] [--repeats 50]

Times are in milliseconds per batch after warm-up: the median and, in brackets, the fastest repeat (on a
shared machine the fastest is the better estimate of the cost itself). Per-sample is the augmentation alone:
no DataLoader collation or inter-process transfer. For scale, `paper` through torchvision's own v2 modules
(per image) and one training step of a small CNN with and without batched `paper`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn
from torchvision.transforms import v2

from distcnn.augment import POLICIES, BatchedAugment, PerSampleAugment


def timed_ms(fn, repeats: int, warmup: int = 5) -> tuple[float, float]:
    """(median, fastest) wall time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * min(times)


def show(t: tuple[float, float]) -> str:
    return f"{t[0]:8.2f} ({t[1]:7.2f})"


def torchvision_paper(size: int) -> v2.Compose:
    """The paper recipe from torchvision's own modules (a reference for the per-sample cost)."""
    bilinear = v2.InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RandomRotation(5, interpolation=bilinear),
        v2.RandomAffine(0, translate=(0.05, 0.05), shear=math.degrees(0.2), interpolation=bilinear),
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.2, 0.2, 0.2),
    ])


def small_cnn(channels: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}: ms per batch, median (fastest)")
    print(f"{'shape':>9} {'policy':>15} {'batched':>18} {'per-sample':>18} {'ratio':>7}")
    for channels, size in ((1, 28), (3, 32)):
        images = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8)
        x = images.float() / 255
        shape = f"{channels}x{size}x{size}"
        for name in POLICIES:
            if name == "none":
                continue
            batched = BatchedAugment(name, channels, size)
            per_sample = PerSampleAugment(name, channels, size)
            t_b = timed_ms(lambda: batched(x), args.repeats)
            t_p = timed_ms(lambda: [per_sample(img) for img in images], max(5, args.repeats // 5))
            print(f"{shape:>9} {name:>15} {show(t_b)} {show(t_p)} {t_p[0] / t_b[0]:6.1f}x")
        reference = torchvision_paper(size)
        t_r = timed_ms(lambda: [reference(img) for img in images], max(5, args.repeats // 5))
        print(f"{shape:>9} {'paper (tv v2)':>15} {'':>18} {show(t_r)}")
        model = small_cnn(channels)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        labels = torch.randint(0, 10, (args.batch,))
        paper = BatchedAugment("paper", channels, size)

        def step(augment: bool) -> None:
            inputs = paper(x) if augment else x
            loss = nn.functional.cross_entropy(model(inputs), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_model = timed_ms(lambda: step(False), args.repeats)
        t_both = timed_ms(lambda: step(True), args.repeats)
        print(f"{shape:>9} small CNN step {show(t_model)}, with batched paper {show(t_both)}: "
              f"throughput ratio {t_model[0] / t_both[0]:.3f} ({t_model[1] / t_both[1]:.3f})")


if __name__ == "__main__":
    main()
