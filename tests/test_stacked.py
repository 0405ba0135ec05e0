"""A rank's local CNNs trained together (StackedLocals + SummedLoss, one optimizer step for all) end where each
would alone: same initial weights and batches give the same weights, with SGD and with AdamW, schedule and
weight decay included; and an independent CNN-DNN keeps a run record per local CNN."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import read_summary
from torch import nn

from distcnn import summary as declared
from distcnn.config import make_config
from distcnn.decomposition.models import StackedLocals, SummedLoss, build_local
from distcnn.decomposition.subimages import Grid
from distcnn.launch import run
from distcnn.trainer import build_optimizer, build_scheduler

STEPS = 6


def local_cnns(count: int = 4) -> list[nn.Module]:
    layout = Grid.parse("2x2").layout(28, 28)
    cnns = []
    for index in range(count):
        torch.manual_seed(index)  # different weights, so a mix-up of local CNNs would show
        cnns.append(build_local("simplecnn", 1, 10, layout, index, 1.0))
    return cnns


def batches(soft: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        x = torch.randn(16, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        y = torch.softmax(torch.randn(16, 10, generator=generator), dim=1) if soft else labels
        out.append((x, y))
    return out


@pytest.mark.parametrize("batched", [False, True], ids=["one-after-another", "vmap"])
@pytest.mark.parametrize("optimizer, soft", [("sgd", False), ("adamw", False), ("adamw", True)])
def test_local_cnns_trained_together_end_with_the_weights_each_gets_alone(optimizer, soft, batched):
    config = make_config({"optimizer": optimizer, "epochs": 1, "label_smoothing": 0.1})
    alone = local_cnns()
    together = StackedLocals(copy.deepcopy(alone), batched)
    data = batches(soft)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for cnn in alone:  # each as its own run: its optimizer, schedule, loss
        step = build_optimizer(cnn, config, "cpu")
        schedule = build_scheduler(step, config, STEPS)
        for x, y in data:
            criterion(cnn(x), y).backward()
            step.step()
            schedule.step()
            step.zero_grad()
    step = build_optimizer(together, config, "cpu")
    schedule = build_scheduler(step, config, STEPS)
    summed = SummedLoss(config.label_smoothing)
    for x, y in data:  # one forward, one backward, one optimizer step for all four
        summed(together(x), y).backward()
        step.step()
        schedule.step()
        step.zero_grad()
    for cnn, stacked in zip(alone, together.locals):
        expected, got = cnn.state_dict(), stacked.state_dict()
        assert expected.keys() == got.keys()
        for name in expected:  # weights, and BatchNorm's running statistics
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(cnn.state_dict()["cnn.classifier.weight"], local_cnns()[0].state_dict()[
            "cnn.classifier.weight"]), "they trained"


def test_the_summed_loss_keeps_each_local_cnns_loss_for_its_record():
    logits = torch.randn(8, 10, 3)
    labels = torch.randint(0, 10, (8,))
    summed = SummedLoss()
    total = summed(logits, labels)
    each = [nn.functional.cross_entropy(logits[..., k], labels) for k in range(3)]
    torch.testing.assert_close(total, sum(each))
    torch.testing.assert_close(summed.take(), torch.stack(each) * 8)
    assert summed.take() is None


def test_an_independent_cnn_dnn_keeps_a_record_per_local_cnn_and_trains_them_in_one_phase(tmp_path):
    out = tmp_path / "run"
    summary = run(make_config({"data": "synthetic:n=400", "epochs": 2, "batch_size": 32, "threads": 1,
                               "strategy": "dd", "grid": "2x2", "out": str(out)}))
    for k in range(4):
        local = read_summary(out / "local" / f"k{k:02d}")
        rows = (out / "local" / f"k{k:02d}" / "epochs.csv").read_text().splitlines()
        assert len(rows) == 3 and (out / "local" / f"k{k:02d}" / "best.pt").exists()
        assert declared.checked(local) == local, "every required field, declared"
        assert local["target_accuracy"] is None and local["cpu_seconds_total"] is None  # the phase's, not its own
        assert local["epochs_run"] == 2 and 0 <= local["test_accuracy"] <= 1 and local["comm_bytes_total"] == 0
        assert local["best_epoch"] in (1, 2)
        assert summary["local_test_accuracy"][k] == local["test_accuracy"]
    phase = out / "local" / "rank0"
    assert (phase / "checkpoint.pt").exists() and len((phase / "epochs.csv").read_text().splitlines()) == 3
    assert summary["phases"]["local"]["comm_bytes"] == 0
    assert declared.checked(summary) == summary and summary["step_time_breakdown"] is None  # trained in parts
    assert summary["train_flops_per_image"] == sum(
        read_summary(out / "local" / f"k{k:02d}")["train_flops_per_image"] for k in range(4))
    assert set(summary["aggregators"]) == {"dnn", "mean", "vote"}
    assert json.loads((out / "local" / "k00" / "config.json").read_text())["subdomain"] == 0


def test_every_shipped_study_parses_and_the_scaling_study_has_every_grid_at_every_rank_count():
    from helpers import ROOT

    from distcnn import launch
    from distcnn.study.spec import load_spec

    specs = {path.stem: load_spec(path) for path in sorted((ROOT / "studies").glob("*.toml"))}
    scaling = specs["decomposition-scaling"]
    assert scaling.factors == {"grid": ["1x1", "2x2", "4x4"], "nproc_per_node": [1, 2]}
    for levels in scaling.configurations():  # 1x1 on 2 ranks too: the global CNN, data-parallel
        config = scaling.run_config(levels | {"data": "synthetic:n=400", "train_subset": None}, 0, ROOT / "runs" / "check",
                                    "check")
        launch.validate(config)


def test_a_local_cnn_whose_patience_ran_out_keeps_the_best_of_the_epochs_it_would_have_trained_alone():
    from types import SimpleNamespace

    from distcnn.strategies.local_phase import LocalCNNs

    from distcnn.run_state import LocalState, RunState

    trainer = SimpleNamespace(config=SimpleNamespace(patience=1),
                              state=RunState(locals=[LocalState(), LocalState()]))
    outcome = LocalCNNs(SimpleNamespace(label_smoothing=0.0), [], [0, 1], shown=None)
    improved = []
    for epoch, val in enumerate([[0.5, 0.5], [0.4, 0.6], [0.9, 0.7]], start=1):
        row = {"epoch": epoch, "train_seconds": 1.0, "eval_seconds": 0.1, "lr": 0.1}
        outcome.losses, outcome.val = [1.0, 1.0], val
        improved.append(outcome.note(trainer, row)[0])
    first, second = trainer.state.locals
    assert improved == [[0, 1], [1], [1]]
    assert first.stopped_at == 2 and first.best_epoch == 1 and first.best_val_accuracy == 0.5
    assert len(first.history) == 2, "alone it stopped after epoch 2: epoch 3's 0.9 is not its"
    assert second.stopped_at is None and second.best_epoch == 3 and len(second.history) == 3
