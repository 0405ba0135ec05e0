"""The networks of a CNN-DNN: a local CNN that sees one subimage of the (augmented) whole image, and the
coherent model — every local CNN plus the dense aggregator on their class probabilities — trained end to end.

Both take whole images, so the data pipeline, augmentation, evaluation and accounting of the training loop
serve them unchanged; the subimage is cut inside the forward, on the device.
"""

from __future__ import annotations

import torch
from torch import nn

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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        sub = images[..., self.top:self.top + self.layout.sub_height, self.left:self.left + self.layout.sub_width]
        return self.cnn(sub)


class CoherentCNNDNN(nn.Module):
    """All local CNNs and the dense aggregator as one model: logits of the aggregator on the local softmaxes."""

    def __init__(self, locals_: list[LocalCNN], classes: int, hidden: tuple[int, ...]):
        super().__init__()
        self.locals = nn.ModuleList(locals_)
        self.aggregator = DenseAggregator(len(locals_), classes, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([local(images).softmax(dim=1) for local in self.locals], dim=1)
        return self.aggregator(probabilities)


def build_local(name: str, in_chans: int, classes: int, layout: Layout, index: int, base_width: float,
                width: float | None = None) -> LocalCNN:
    """Local CNN `index` of the model family `name`, its width scaled with its share of the image."""
    chosen = width if width is not None else local_width(base_width, layout.share())
    cnn = create_model(name, in_chans=in_chans, num_classes=classes, width=chosen)
    check_input_size(cnn, in_chans, min(layout.sub_height, layout.sub_width), name)
    return LocalCNN(cnn, layout, index)
