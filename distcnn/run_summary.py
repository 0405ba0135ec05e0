"""What a run trained by the loop (distcnn.trainer.Trainer) leaves at its end: its scores on shifted test sets,
its summary.json, and the last line it prints.

Kept apart from the loop so that the loop stays one screen per concern; it reads the trainer it is given and
imports nothing of distcnn.trainer (the loop imports this module).
"""

from __future__ import annotations

from typing import Any

import torch

from distcnn import comm, shifts, speed
from distcnn import summary as declared
from distcnn.augment import get_policy
from distcnn.config import TrainConfig
from distcnn.data import ImageSet
from distcnn.parallel.ranks import Ranks


def speed_options(config: TrainConfig, ranks: Ranks) -> dict:
    return speed.describe(config.precision, config.memory_format, config.compile, ranks.device.type)


def evaluate_shifts(trainer: Any) -> tuple[int | None, float | None, dict[str, dict[str, float]] | None]:
    """--eval-shift: (images scored, their unshifted accuracy, {shift: {"1": accuracy, ...}}) on shifted copies
    of the test set, or of --shift-images of its images. Shifts and subset are seeded by the split seed: every
    run of a study is scored on the same shifted images."""
    config, splits = trainer.config, trainer.splits
    names = shifts.parse_shifts(config.eval_shift)
    if not names:
        return None, None, None
    test, n = splits.test, config.shift_images
    if n is not None and n < len(test):
        generator = torch.Generator().manual_seed(config.split_seed)
        chosen = torch.randperm(len(test), generator=generator)[:n].sort().values
        test = ImageSet(test.images[chosen], test.labels[chosen])
    clean = trainer.evaluate(test) if test is not splits.test else None
    accuracy = {name: {str(severity): trainer.evaluate(test, shifts.Shift(name, severity, config.split_seed))
                       for severity in shifts.SEVERITIES} for name in names}
    return len(test), clean, accuracy


def shifts_in_training(config: TrainConfig, channels: int) -> list[str]:
    """The shifts this run's augmentation (at its strength) and CutMix train on."""
    policy = get_policy(config.policy).scaled(config.aug_strength).for_channels(channels)
    return shifts.shifts_in_training(policy, config.cutmix)


def run_summary(trainer: Any, test_accuracy: float, shift_images: int | None, shift_clean: float | None,
                shift_accuracy: dict | None, shift_seconds: float | None) -> dict:
    """The summary.json of a run trained by the loop, assembled here and only here: the loop's own figures,
    then accounting's (collective: every rank calls this), then what the run's strategy adds."""
    config, splits, ranks, state = trainer.config, trainer.splits, trainer.ranks, trainer.state
    target = state.target or {}
    summary = {
        "name": config.run_name,
        "model": config.model,
        "policy": config.policy,
        "aug_backend": config.aug_backend,
        **speed_options(config, ranks),
        "data": splits.name,
        "world_size": ranks.world_size,
        "test_accuracy": test_accuracy,
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < config.epochs,
        "diverged": state.diverged is not None,
        "diverged_at": state.diverged,
        "train_seconds": state.train_seconds,
        "eval_seconds": sum(row.get("eval_seconds") or 0.0 for row in state.history),
        "compile_seconds": trainer.compile_seconds,
        "images_seen": state.images_seen,
        "images_per_second": state.images_seen / state.train_seconds if state.train_seconds else None,
        "params": trainer.params,
        "train_flops_per_image": trainer.flops_per_image,
        "achieved_flops_per_s": (trainer.flops_per_image * state.images_seen / ranks.world_size
                                 / state.train_seconds) if state.train_seconds else None,
        "gradient_bytes": comm.gradient_bytes(trainer.model),
        "bucket_cap_mb": config.bucket_cap_mb,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "resumed_at_epochs": state.resumed_at,
        "restarts": state.restarts,
        "telemetry": config.telemetry,
        "aug_strength": config.aug_strength,
        "target_accuracy": config.target_accuracy,
        "time_to_target_seconds": target.get("seconds"),
        "epochs_to_target": target.get("epoch"),
        "images_to_target": target.get("images"),
        # True only when --stop-at-target cut the run short (a target met in the last epoch stops nothing)
        "stopped_at_target": bool(config.stop_at_target and target and state.epoch < config.epochs),
        "shift_images": shift_images,
        "shift_clean_accuracy": test_accuracy if shift_accuracy and shift_clean is None else shift_clean,
        "shift_accuracy": shift_accuracy,
        "shift_accuracy_mean": (sum(a for by in shift_accuracy.values() for a in by.values())
                                / sum(len(by) for by in shift_accuracy.values())) if shift_accuracy else None,
        "shifts_in_training": shifts_in_training(config, splits.channels),
        "shift_eval_seconds": shift_seconds,
    } | trainer.accounting.summary(state.history)
    if trainer.summary_extra is not None:
        summary |= trainer.summary_extra(trainer.model, summary)
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
