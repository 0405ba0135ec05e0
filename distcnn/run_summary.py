"""The one builder of summary.json, and the last line a run prints.

Every run record's summary is built by `build_summary`: the config and the data (`head`, here), then the parts
its producer measured, each a complete group of declared figures: what the run did (`progress`), what its
model cost (`cost`), what its weights scored (`Scores`), its accounting (distcnn.telemetry.accounting), and
what its strategy adds. `distcnn.summary.checked` then refuses a key not declared and a required one missing,
so a producer that forgets a figure fails where it is built, not in a study. The loop (distcnn.trainer), the
local phase and the CNN-DNN (distcnn.strategies) all call it; none writes its own summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distcnn import shifts, speed
from distcnn import summary as declared
from distcnn.augment import get_policy
from distcnn.config import TrainConfig
from distcnn.data import DataSplits, ImageSet
from distcnn.run_state import Best, RunState

Evaluate = Callable[[ImageSet, "shifts.Shift | None"], float]  # (images, shift) -> accuracy, on every rank


def speed_options(config: TrainConfig, device_type: str) -> dict:
    return speed.describe(config.precision, config.memory_format, config.compile, device_type)


@dataclass(frozen=True)
class Scores:
    """What a run's weights scored at its end; None where nothing was scored (a run that diverged)."""

    test_accuracy: float | None = None
    shift_images: int | None = None  # test images the shifts were scored on
    shift_clean: float | None = None  # their accuracy unshifted (None: they are the whole test set)
    shift_accuracy: dict | None = None  # {shift: {"1": accuracy, ...}}
    shift_seconds: float | None = None

    def figures(self) -> dict:
        by_shift = self.shift_accuracy
        clean = self.test_accuracy if by_shift and self.shift_clean is None else self.shift_clean
        mean = (sum(a for by in by_shift.values() for a in by.values()) / sum(len(by) for by in by_shift.values())
                if by_shift else None)
        return {"test_accuracy": self.test_accuracy, "shift_images": self.shift_images,
                "shift_clean_accuracy": clean, "shift_accuracy": by_shift, "shift_accuracy_mean": mean,
                "shift_eval_seconds": self.shift_seconds}


def score(config: TrainConfig, splits: DataSplits, evaluate: Evaluate) -> Scores:
    """The test accuracy and, with --eval-shift, the accuracy on shifted copies of the test set, or of
    --shift-images of its images. Shifts and subset are seeded by the split seed: every run of a study is
    scored on the same shifted images."""
    test_accuracy = evaluate(splits.test, None)
    names = shifts.parse_shifts(config.eval_shift)
    if not names:
        return Scores(test_accuracy)
    start = time.perf_counter()
    test, n = splits.test, config.shift_images
    if n is not None and n < len(test):
        generator = torch.Generator().manual_seed(config.split_seed)
        chosen = torch.randperm(len(test), generator=generator)[:n].sort().values
        test = ImageSet(test.images[chosen], test.labels[chosen])
    clean = evaluate(test, None) if test is not splits.test else None
    accuracy = {name: {str(severity): evaluate(test, shifts.Shift(name, severity, config.split_seed))
                       for severity in shifts.SEVERITIES} for name in names}
    return Scores(test_accuracy, len(test), clean, accuracy, time.perf_counter() - start)


def shifts_in_training(config: TrainConfig, channels: int) -> list[str]:
    """The shifts this run's augmentation (at its strength) and CutMix train on."""
    policy = get_policy(config.policy).scaled(config.aug_strength).for_channels(channels)
    return shifts.shifts_in_training(policy, config.cutmix)


def head(config: TrainConfig, splits: DataSplits, device_type: str, world_size: int) -> dict:
    """What every summary begins with: the run as configured and the data it trained on."""
    return {"name": config.run_name, "model": config.model, "policy": config.policy,
            "aug_backend": config.aug_backend, **speed_options(config, device_type), "data": splits.name,
            "world_size": world_size, "bucket_cap_mb": config.bucket_cap_mb, "train_images": len(splits.train),
            "val_images": len(splits.val), "test_images": len(splits.test), "telemetry": config.telemetry,
            "aug_strength": config.aug_strength, "target_accuracy": config.target_accuracy,
            "shifts_in_training": shifts_in_training(config, splits.channels)}


def progress(config: TrainConfig, best: Best, epochs_run: int, diverged: dict | None, clock: RunState) -> dict:
    """What a model's training did: `best` its validation, `epochs_run` the epochs that count for it, `clock`
    the loop's time, images, resumes and time to target (a local CNN's are its phase's)."""
    target = clock.target or {}
    seconds = clock.train_seconds
    return {"best_val_accuracy": best.best_val_accuracy, "best_epoch": best.best_epoch, "epochs_run": epochs_run,
            "stopped_early": epochs_run < config.epochs, "diverged": diverged is not None, "diverged_at": diverged,
            "train_seconds": seconds, "eval_seconds": sum(row.get("eval_seconds") or 0.0 for row in clock.history),
            "images_seen": clock.images_seen,
            "images_per_second": clock.images_seen / seconds if seconds else None,
            "resumed_at_epochs": clock.resumed_at, "restarts": clock.restarts,
            "time_to_target_seconds": target.get("seconds"), "epochs_to_target": target.get("epoch"),
            "images_to_target": target.get("images"),
            # True only when --stop-at-target cut the run short (a target met in the last epoch stops nothing)
            "stopped_at_target": bool(config.stop_at_target and target and clock.epoch < config.epochs)}


def achieved_flops(flops_per_image: float | None, images: int, world_size: int, seconds: float) -> float | None:
    """The training FLOP/s each rank achieved; None where the FLOPs were not counted (ranks other than 0)."""
    return flops_per_image * images / world_size / seconds if seconds and flops_per_image is not None else None


def cost(params: int, flops_per_image: float | None, clock: RunState, world_size: int,
         gradient_bytes: int | None, compile_seconds: float | None) -> dict:
    """What a model cost: its size, its FLOPs per image and the rate it trained at per rank."""
    return {"params": params, "train_flops_per_image": flops_per_image,
            "achieved_flops_per_s": achieved_flops(flops_per_image, clock.images_seen, world_size,
                                                   clock.train_seconds),
            "gradient_bytes": gradient_bytes, "compile_seconds": compile_seconds}


def build_summary(config: TrainConfig, splits: DataSplits, device_type: str, world_size: int, *parts: dict,
                  unmeasured: bool = False) -> dict:
    """The summary.json of a run record: its head, then each part in turn (a later part's figure replaces an
    earlier one's), in the declared order, checked complete. `unmeasured`: the producer measured only what its
    parts give (a CNN-DNN trained in parts); every other figure is null."""
    summary = (declared.unmeasured() if unmeasured else {}) | head(config, splits, device_type, world_size)
    for part in parts:
        summary |= part
    return declared.checked(summary)


def final_line(summary: dict, run_dir, scored_by: str | None = None) -> str:
    """The last line of a run: its test accuracy, and what it was asked to measure besides (time to target,
    robustness), so that the terminal answers the question the run was started for. `scored_by`: the aggregator
    whose accuracy it is (a CNN-DNN's)."""
    by = f" ({scored_by})" if scored_by else ""
    parts = [f"test accuracy{by} {summary['test_accuracy']:.4f} after {summary['epochs_run']} epochs "
             f"({summary['train_seconds']:.1f} s training)"]
    target = summary.get("target_accuracy")
    if target is not None:
        if summary.get("epochs_to_target") is not None:
            parts.append(f"target {target} reached at epoch {summary['epochs_to_target']} "
                         f"({summary['time_to_target_seconds']:.1f} s)")
        else:
            parts.append(f"target {target} not reached")
    if summary.get("shift_accuracy_mean") is not None:
        parts.append(f"mean shift accuracy {summary['shift_accuracy_mean']:.4f}")
    return "; ".join(parts) + f" — run record: {run_dir}"
