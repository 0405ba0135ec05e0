"""From the class probabilities of the N local CNNs to one decision per image: a dense net, the mean, a vote.

Input everywhere: probabilities of shape (images, N local CNNs, K classes).
- mean: the class with the highest average probability;
- vote: the class most local CNNs chose; a tie goes to the tied class with the highest summed probability
  (so a vote never depends on class order);
- dnn: a small dense net on the N·K probabilities, trained in a second step on the frozen train-set
  probabilities of the local CNNs (the CNN-DNN of Klawonn, Lanser and Weber).
"""

from __future__ import annotations

import torch
from torch import nn

AGGREGATORS = ("dnn", "mean", "vote")


def mean_decision(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.mean(dim=1).argmax(dim=1)


def vote_decision(probabilities: torch.Tensor) -> torch.Tensor:
    classes = probabilities.shape[2]
    votes = nn.functional.one_hot(probabilities.argmax(dim=2), classes).sum(dim=1)  # (images, K)
    tied_best = votes == votes.max(dim=1, keepdim=True).values
    summed = probabilities.sum(dim=1).masked_fill(~tied_best, float("-inf"))
    return summed.argmax(dim=1)


class DenseAggregator(nn.Module):
    """N·K probabilities -> K class scores through small hidden layers (ReLU)."""

    def __init__(self, locals_: int, classes: int, hidden: tuple[int, ...] = (64,)):
        super().__init__()
        layers, width = [nn.Flatten()], locals_ * classes
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        return self.net(probabilities)


def train_dense(probabilities: torch.Tensor, labels: torch.Tensor, hidden: tuple[int, ...] = (64,),
                epochs: int = 30, batch_size: int = 256, lr: float = 3e-3, seed: int = 0) -> DenseAggregator:
    """Fit the dense aggregator on frozen local probabilities (cheap: a few thousand parameters)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DenseAggregator(probabilities.shape[1], probabilities.shape[2], hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(probabilities[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def dense_decision(model: DenseAggregator, probabilities: torch.Tensor) -> torch.Tensor:
    return model(probabilities).argmax(dim=1)


def accuracy(decisions: torch.Tensor, labels: torch.Tensor) -> float:
    return (decisions == labels).float().mean().item()
