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


def subimages(layout, images: torch.Tensor) -> list[torch.Tensor]:
    """Each local CNN's subimage of `images`, cut as training cuts it (LocalCNN.subimage), row-major."""
    from distcnn.decomposition.models import LocalCNN

    return [LocalCNN(torch.nn.Identity(), layout, k).subimage(images) for k in range(len(layout.boxes))]


@pytest.mark.parametrize("grid, size", [("2x2", 28), ("4x4", 28), ("3x3", 28), ("2x4", 32), ("1x1", 28),
                                        ("3x2", 31)])
def test_the_local_cnns_subimages_cover_the_image_exactly(grid, size):
    images = torch.rand(5, 3, size, size + 1)
    layout = Grid.parse(grid).layout(size, size + 1)
    pieces = subimages(layout, images)
    assert len(pieces) == Grid.parse(grid).rows * Grid.parse(grid).cols
    assert all(piece.shape == (5, 3, layout.sub_height, layout.sub_width) for piece in pieces)
    covered = torch.zeros(size, size + 1, dtype=torch.long)
    put_back = torch.full_like(images, float("nan"))
    for piece, (top, left) in zip(pieces, layout.boxes):  # each piece is the image's pixels at its box
        assert torch.equal(piece, images[..., top:top + layout.sub_height, left:left + layout.sub_width])
        put_back[..., top:top + layout.sub_height, left:left + layout.sub_width] = piece
        covered[top:top + layout.sub_height, left:left + layout.sub_width] += 1
    assert torch.equal(put_back, images) and bool((covered >= 1).all())  # no pixel lost (a grid that does not
    # divide the image makes neighbours share a band)


def test_a_grid_that_divides_the_image_is_a_plain_partition():
    layout = Grid.parse("4x4").layout(28, 28)
    assert (layout.sub_height, layout.sub_width) == (7, 7)
    assert layout.row_starts == [0, 7, 14, 21] and layout.share() == pytest.approx(1 / 16)


def test_with_overlap_neighbours_share_equal_bands_at_least_that_wide():
    images = torch.rand(2, 1, 28, 28)
    layout = Grid.parse("2x2", overlap=3).layout(28, 28)
    pieces = subimages(layout, images)
    (top0, left0), (top1, left1) = layout.boxes[0], layout.boxes[1]  # neighbours along a row
    band = left0 + layout.sub_width - left1
    assert band >= 3
    assert torch.equal(pieces[0][..., -band:], pieces[1][..., :band])
    below = layout.boxes[2][0]
    band = top0 + layout.sub_height - below
    assert band >= 3 and torch.equal(pieces[0][..., -band:, :], pieces[2][..., :band, :])


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


# ---- the dd strategy, end to end through the command line -------------------------------------------------

import json  # noqa: E402

from helpers import cli, read_summary, run_cli, usage_error  # noqa: E402

DD = ("train", "--strategy", "dd", "--data", "synthetic:n=600", "--epochs", "2", "--batch-size", "32",
      "--sample-interval", "0.1")


@pytest.fixture(scope="module")
def independent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dd") / "independent"
    result = run_cli(*DD, "--grid", "2x2", "--nproc-per-node", "2", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, read_summary(out)


@pytest.mark.slow
def test_independent_local_cnns_exchange_no_gradient_bytes_and_every_aggregator_is_scored(independent_run):
    out, summary = independent_run
    assert summary["strategy"] == "dd" and summary["world_size"] == 2
    assert summary["phases"]["local"]["comm_bytes"] == 0 and summary["comm_bytes_total"] == 0
    assert len(summary["phases"]["local"]["seconds_per_rank"]) == 2, "both ranks trained local CNNs"
    assert set(summary["aggregators"]) == {"dnn", "mean", "vote"}
    assert summary["test_accuracy"] == summary["aggregators"]["dnn"]["test_accuracy"]
    assert len(summary["local_test_accuracy"]) == 4 and all(a > 0.2 for a in summary["local_test_accuracy"])
    assert summary["aggregators"]["dnn"]["test_accuracy"] > 0.5, "10 classes: chance is 0.1"
    assert summary["params"] == sum(summary["local_params"])
    for k in range(4):  # each local CNN has its own run record, trained alone: no DDP, nothing sent
        local = read_summary(out / "local" / f"k{k:02d}")
        assert local["world_size"] == 1 and local["comm_bytes_total"] == 0
        assert (out / "local" / f"k{k:02d}" / "best.pt").exists()


@pytest.mark.slow
def test_coherent_and_transfer_train_the_whole_cnn_dnn(independent_run, tmp_path, capsys):
    out, _ = independent_run  # one rank each: in this process
    code, _, err = cli(capsys, *DD, "--grid", "2x2", "--dd-mode", "coherent", "--out", tmp_path / "c")
    assert code == 0, err
    code, _, err = cli(capsys, *DD, "--grid", "2x2", "--dd-mode", "transfer", "--init-from", out,
                       "--out", tmp_path / "t")
    assert code == 0, err
    for name in ("c", "t"):
        summary = read_summary(tmp_path / name)
        assert set(summary["aggregators"]) == {"dnn"} and len(summary["local_params"]) == 4
        assert summary["test_accuracy"] > 0.1
    assert json.loads((tmp_path / "t" / "config.json").read_text())["init_from"] == str(out)


@pytest.mark.slow
def test_transfer_without_a_starting_run_trains_both_phases_in_one_command(tmp_path, capsys):
    code, _, err = cli(capsys, *DD, "--grid", "1x2", "--dd-mode", "transfer", "--out", tmp_path / "both")
    assert code == 0, err
    first = read_summary(tmp_path / "both" / "independent")
    summary = read_summary(tmp_path / "both")
    assert first["dd_mode"] == "independent" and len(first["local_test_accuracy"]) == 2
    assert summary["dd_mode"] == "transfer" and summary["phases"]["local"]["seconds"] > 0


@pytest.mark.parametrize("args, message", [
    (("--grid", "40x40"), "larger than the 28×28 image"),
    (("--grid", "2x2", "--overlap", "14"), "as large as a subimage"),
    (("--aggregator", "median"), "--aggregator"),
    (("--dd-mode", "parallel"), "--dd-mode"),
    (("--dd-mode", "transfer", "--init-from", "/nonexistent"), "no trained local CNN for subdomain(s) 0, 1, 2, 3"),
    (("--grid", "1x2", "--nproc-per-node", "3"), "3 ranks for 2 subdomains"),
])
def test_bad_decomposition_input_is_one_line_and_exit_2(tmp_path, args, message, capsys):
    assert message in usage_error(capsys, *DD, *args, "--out", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
