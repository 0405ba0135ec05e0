"""What the benchmarks train on: real Fashion-MNIST when it is installed, generated images otherwise."""

from __future__ import annotations

from distcnn.data import load_data
from distcnn.errors import UsageError


def data_spec() -> str:
    try:
        load_data("fashion-mnist", val_fraction=0.0, train_subset=100)
        return "fashion-mnist"
    except UsageError:
        return "synthetic:n=6000"
