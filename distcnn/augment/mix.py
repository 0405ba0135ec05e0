"""Batch-level mixing: MixUp and CutMix on a device batch, with their own alphas (`--aug-strength` leaves them
as they are)."""

from __future__ import annotations

from torch import Tensor

from distcnn.errors import UsageError


class BatchMix:
    """MixUp and/or CutMix on a device batch: (x (B, C, H, W), y int64 (B,)) -> (x, soft targets (B, K)).

    torchvision v2's MixUp/CutMix (one lambda per batch, images paired with the batch rolled by one); with both
    alphas > 0 each batch uses one of them, chosen with equal odds. Both alphas 0 means no mixing: a BatchMix
    that only one-hot encodes would hide a configuration mistake, so it is refused (build_batch_mix gives None).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise UsageError(f"mixup and cutmix alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise UsageError("BatchMix needs mixup or cutmix alpha > 0 (both are 0: nothing to mix)")
        if num_classes < 2:
            raise UsageError(f"mixing labels needs at least 2 classes, got {num_classes}")
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes
        from torchvision.transforms import v2  # here: a run that mixes nothing never imports torchvision

        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self._mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __repr__(self) -> str:
        return f"BatchMix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, " \
               f"num_classes={self.num_classes})"

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._mix(x, y)


def build_batch_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> BatchMix | None:
    """The batch mixing of a run, or None when both alphas are 0."""
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return BatchMix(mixup_alpha, cutmix_alpha, num_classes)
