"""The networks of a CNN-DNN: a local CNN that sees one subimage of the (augmented) whole image, and the
coherent model — every local CNN plus the dense aggregator on their class probabilities — trained end to end.

Both take whole images, so the data pipeline, augmentation, evaluation and accounting of the training loop
serve them unchanged; the subimage is cut inside the forward, on the device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from distcnn.decomposition import local_width
from distcnn.decomposition.aggregators import DenseAggregator
from distcnn.decomposition.subimages import Layout
from distcnn.models import check_input_size, create_model


class LocalCNN(nn.Module):
    """Local CNN k of a grid: classifies subimage k of each image into the classes of the whole image."""

    def __init__(self, cnn: nn.Module, layout: Layout, index: int):
        super().__init__()
        self.cnn, self.layout, self.index = cnn, layout, index
        self.top, self.left = layout.boxes[index]

    def subimage(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., self.top:self.top + self.layout.sub_height, self.left:self.left + self.layout.sub_width]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cnn(self.subimage(images))


class StackedLocals(nn.Module):
    """Several local CNNs as one model: one forward of a batch of whole images gives every local CNN's logits,
    (N, classes, K), the layout a cross-entropy over K predictions per image takes. One batch, one
    augmentation, one backward and one optimizer step serve them all; their parameters stay disjoint, so each
    receives exactly the gradient it would alone (SummedLoss).

    `batched`: run them as one network with torch.func.vmap over their stacked weights (batched, i.e. grouped,
    convolutions) instead of one after another. Each local CNN keeps its own parameters and BatchNorm
    statistics (stacked for the step, written back after it), so checkpoints and optimizers see K networks
    either way. On a CPU one after another measured faster for 2 to 16 local CNNs of 7x7 and 14x14
    (benchmarks/stacking.py: vmap 0.46x to 0.85x), so it is the default; vmap is there for devices where
    grouped convolutions pay (to be measured on a GPU)."""

    def __init__(self, locals_: list[LocalCNN], batched: bool = False):
        super().__init__()
        self.locals = nn.ModuleList(locals_)
        self.batched = batched
        # the network vmap calls with each local CNN's weights: in a list, so not a submodule and holding no state
        self._skeleton = [copy.deepcopy(locals_[0].cnn).to("meta")] if batched else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.batched:
            return torch.stack([local(images) for local in self.locals], dim=2)
        subimages = torch.stack([local.subimage(images) for local in self.locals])  # (K, N, C, h, w)
        own_params = [dict(local.cnn.named_parameters()) for local in self.locals]
        own_buffers = [dict(local.cnn.named_buffers()) for local in self.locals]
        params = {name: torch.stack([own[name] for own in own_params]) for name in own_params[0]}
        buffers = {name: torch.stack([own[name] for own in own_buffers]) for name in own_buffers[0]}
        skeleton = self._skeleton[0].train(self.training)

        def one(p, b, x):
            return functional_call(skeleton, (p, b), (x,))

        logits = vmap(one, randomness="different")(params, buffers, subimages.contiguous())  # (K, N, classes)
        if self.training:  # BatchNorm's running statistics, updated in the stacked copies, back to each
            with torch.no_grad():
                for k, local in enumerate(self.locals):
                    for name, buffer in local.cnn.named_buffers():
                        buffer.copy_(buffers[name][k])
        return logits.permute(1, 2, 0)


class SummedLoss(nn.Module):
    """Cross-entropy of each local CNN (mean over the batch, as alone), summed over the local CNNs, so that the
    gradient of each is its own. Hard labels (N,) or soft ones (N, classes: MixUp, CutMix) serve all K. The
    per-local losses of the epoch are summed on the device (`local_sums`), read once at its end."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.local_sums: torch.Tensor | None = None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        count = logits.shape[-1]
        targets = targets.unsqueeze(-1).expand(*targets.shape, count)
        each = nn.functional.cross_entropy(logits, targets, reduction="none",
                                           label_smoothing=self.label_smoothing).mean(dim=0)  # (K,)
        batch = each.detach() * logits.shape[0]
        self.local_sums = batch if self.local_sums is None else self.local_sums + batch
        return each.sum()

    def take(self) -> torch.Tensor | None:
        """The per-local loss sums since the last take (images x mean loss), and start again."""
        sums, self.local_sums = self.local_sums, None
        return sums


class CoherentCNNDNN(nn.Module):
    """All local CNNs and the dense aggregator as one model: logits of the aggregator on the local softmaxes."""

    def __init__(self, locals_: list[LocalCNN], classes: int, hidden: tuple[int, ...], batched: bool = False):
        super().__init__()
        self.locals = StackedLocals(locals_, batched)
        self.aggregator = DenseAggregator(len(locals_), classes, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = self.locals(images).softmax(dim=1).transpose(1, 2)  # (N, K, classes)
        return self.aggregator(probabilities)


def build_local(name: str, in_chans: int, classes: int, layout: Layout, index: int, base_width: float,
                width: float | None = None) -> LocalCNN:
    """Local CNN `index` of the model family `name`, its width scaled with its share of the image."""
    chosen = width if width is not None else local_width(base_width, layout.share())
    cnn = create_model(name, in_chans=in_chans, num_classes=classes, width=chosen)
    check_input_size(cnn, in_chans, min(layout.sub_height, layout.sub_width), name)
    return LocalCNN(cnn, layout, index)
