"""Domain decomposition building blocks: cutting subimages exactly, the local width rule, the aggregators."""

from __future__ import annotations

import pytest
import torch

from distcnn.decomposition import local_width
from distcnn.decomposition.aggregators import (accuracy, dense_decision, mean_decision, train_dense,
                                               vote_decision)
from distcnn.decomposition.subimages import Grid
from distcnn.errors import UsageError
from distcnn.models import count_params, create_model


@pytest.mark.parametrize("grid, size", [("2x2", 28), ("4x4", 28), ("3x3", 28), ("2x4", 32), ("1x1", 28),
                                        ("3x2", 31)])
def test_cutting_and_putting_back_gives_the_image_exactly(grid, size):
    images = torch.rand(5, 3, size, size + 1)
    layout = Grid.parse(grid).layout(size, size + 1)
    pieces = layout.cut(images)
    rows, cols = Grid.parse(grid).rows, Grid.parse(grid).cols
    assert pieces.shape == (5, rows * cols, 3, layout.sub_height, layout.sub_width)
    assert torch.equal(layout.assemble(pieces), images)


def test_a_grid_that_divides_the_image_is_a_plain_partition():
    layout = Grid.parse("4x4").layout(28, 28)
    assert (layout.sub_height, layout.sub_width) == (7, 7)
    assert layout.row_starts == [0, 7, 14, 21] and layout.share() == pytest.approx(1 / 16)


def test_with_overlap_neighbours_share_equal_bands_at_least_that_wide():
    images = torch.rand(2, 1, 28, 28)
    layout = Grid.parse("2x2", overlap=3).layout(28, 28)
    pieces = layout.cut(images)
    (top0, left0), (top1, left1) = layout.boxes[0], layout.boxes[1]  # neighbours along a row
    band = left0 + layout.sub_width - left1
    assert band >= 3
    assert torch.equal(pieces[:, 0, ..., -band:], pieces[:, 1, ..., :band])
    below = layout.boxes[2][0]
    band = top0 + layout.sub_height - below
    assert band >= 3 and torch.equal(pieces[:, 0, :, -band:, :], pieces[:, 2, :, :band, :])


@pytest.mark.parametrize("grid, overlap, message", [
    ("40x2", 0, "larger than the 28×28 image"),
    ("2x2", 14, "--overlap 14: as large as a subimage"),
    ("2by2", 0, "give PxQ"),
    ("0x2", 0, "at least 1"),
    ("2x2", -1, "0 or more"),
])
def test_a_grid_that_cannot_cut_the_image_is_one_clear_line(grid, overlap, message):
    with pytest.raises(UsageError, match=message):
        Grid.parse(grid, overlap).layout(28, 28)


def test_local_cnns_shrink_with_their_share_of_the_image():
    whole = count_params(create_model("simplecnn", in_chans=1, num_classes=10))
    quarter = count_params(create_model("simplecnn", in_chans=1, num_classes=10, width=local_width(1.0, 0.25)))
    assert 0.2 < quarter / whole < 0.35


def test_mean_and_vote_equal_hand_computed_decisions():
    probabilities = torch.tensor([
        [[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]],     # mean: 1 (0.50 vs 0.40); votes 0, 1, 0 -> 0
        [[0.1, 0.5, 0.4], [0.2, 0.5, 0.3], [0.0, 0.2, 0.8]],     # mean: 2 (0.50 vs 0.40); votes 1, 1, 2 -> 1
        [[0.3, 0.7, 0.0], [0.5, 0.45, 0.05], [0.1, 0.3, 0.6]],   # votes 1, 0, 2: a tie, broken by the summed
    ])                                                           # probabilities 0.9, 1.45, 0.65 -> 1; mean 1
    assert mean_decision(probabilities).tolist() == [1, 2, 1]
    assert vote_decision(probabilities).tolist() == [0, 1, 1]


def test_the_dense_aggregator_learns_what_mean_and_vote_cannot():
    """Only local CNN 2 knows the class; the other three are confidently wrong at random. A dense net learns
    to trust local 2; averaging and voting follow the crowd."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1200,), generator=generator)
    noise = torch.randint(0, 3, (1200, 4), generator=generator)
    probabilities = torch.nn.functional.one_hot(noise, 3).float() * 0.9 + 0.1 / 3
    probabilities[:, 2] = torch.nn.functional.one_hot(labels, 3).float() * 0.6 + 0.4 / 3
    train, test = slice(0, 900), slice(900, None)
    model = train_dense(probabilities[train], labels[train], hidden=(32,), epochs=40)
    dnn = accuracy(dense_decision(model, probabilities[test]), labels[test])
    assert dnn > 0.95, "chance is 1/3"
    assert accuracy(mean_decision(probabilities[test]), labels[test]) < 0.6
    assert accuracy(vote_decision(probabilities[test]), labels[test]) < 0.6
