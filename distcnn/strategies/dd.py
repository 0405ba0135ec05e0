"""`--strategy dd`: a CNN-DNN trained on the ranks of a job, through the same training loop as every run.
(The grid and subimages, the local CNNs and the aggregators are distcnn.decomposition's; this is how they train.)

independent  local phase: the subdomains are dealt to the ranks round-robin; each rank trains its local
             CNNs together as one model (strategies.local_phase: one batch, one step for all; whole training
             set, no gradient communication), each with its own run record in RUN_DIR/local/kNN/; a 1x1 grid's
             one local CNN is the global CNN, data-parallel on every rank. Aggregator phase: every local CNN's class
             probabilities on train, validation and test are gathered on rank 0, the dense aggregator is
             trained on the frozen train-set probabilities, and dnn, mean and vote are scored on the test set.
coherent     the local CNNs and the dense aggregator as one model, trained end to end, data-parallel (DDP).
transfer     coherent, with the local CNNs initialised from an independent run: --init-from RUN_DIR, or
             without it both phases in one run (the independent one in RUN_DIR/independent/).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

from distcnn.checkpoint import load_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import loaded_line, say
from distcnn.data import DataSplits
from distcnn.decomposition.aggregators import (accuracy, dense_decision, mean_decision, train_dense,
                                               vote_decision)
from distcnn.decomposition.models import CoherentCNNDNN
from distcnn.errors import TrainingDiverged, UsageError
from distcnn.models import count_params
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs
from distcnn.record import BEST, CHECKPOINT, RunRecord
from distcnn.run_state import RunState
from distcnn.run_summary import Scores, build_summary, final_line
from distcnn.strategies import register_strategy
from distcnn.strategies.local_phase import SHARED_FIGURES, LocalCNNs
from distcnn.strategies.subdomains import Decomposition, local_record, phase_record, subdomains_of
from distcnn.trainer import OneModel, Trainer, accounted, load_splits, train_run, write_environment

INDEPENDENT = "independent"  # where a transfer run without --init-from trains its local CNNs first


def validate(config: TrainConfig, splits: DataSplits) -> None:
    """The grid, the local CNN, the ranks and the starting point of transfer, before anything starts."""
    parts = Decomposition.of(config, splits)
    parts.local(0)
    world_size, count = config.nproc_per_node * config.nnodes, parts.count
    if config.dd_mode in ("independent", "transfer") and not config.init_from and 1 < count < world_size:
        raise UsageError(f"{world_size} ranks for {count} subdomains ({config.grid}): independent training gives "
                         f"each rank whole local CNNs; use at most {count} ranks, or a finer --grid")
    if config.dd_mode == "transfer" and config.init_from:
        missing = [k for k in range(count) if not _weights(local_record(Path(config.init_from), k))]
        if missing:
            raise UsageError(f"--init-from {config.init_from}: no trained local CNN for subdomain(s) "
                             f"{', '.join(map(str, missing))} of grid {config.grid}")
    elif config.init_from:
        raise UsageError("--init-from is for --dd-mode transfer")


def _weights(record: RunRecord) -> Path | None:
    for name in (BEST, CHECKPOINT):
        if record.path(name).exists():
            return record.path(name)
    return None


@contextmanager
def divergence_recorded() -> Iterator[None]:
    """A part of a CNN-DNN (a local phase, the global CNN, a transfer run's independent run) whose loss
    diverged has written where into its summary before raising: the CNN-DNN reads it there and stops with it
    (stop_diverged), on every rank at once."""
    try:
        yield
    except TrainingDiverged:
        pass


class DomainDecomposition:
    name = "dd"

    def validate(self, config: TrainConfig, splits: DataSplits) -> None:
        validate(config, splits)

    def run(self, config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
        if config.dd_mode == "independent":
            splits = load_splits(config)
            train_independent(Decomposition.of(config, splits), record, ranks, splits)
            return
        # coherent or transfer: the whole CNN-DNN is the model; the run's accounting starts first, so its setup
        # phase holds the loading of the data and a transfer run's independent phase
        with accounted(config, record, ranks) as accounting:
            splits = load_splits(config)
            if config.dd_mode == "transfer":
                config = transfer_start(config, record, ranks, splits)
            parts = Decomposition.of(config, splits)
            Trainer(config, record, ranks, accounting, build_model=functools.partial(coherent_model, parts),
                    splits=splits, outcome=OneModel(config, functools.partial(coherent_extra, config))).fit()


def train_independent(parts: Decomposition, record: RunRecord, ranks: Ranks, splits: DataSplits) -> None:
    """Raises TrainingDiverged on every rank, after writing the summary, when a local CNN's loss diverged: the
    rank's local CNNs stop together, and all ranks learn of it at the gather."""
    config, count = parts.config, parts.count
    started = time.perf_counter()
    indices = subdomains_of(ranks.rank, ranks.world_size, count)
    if count > 1:  # (a 1x1 grid's one local CNN says it through the loop)
        say(loaded_line(splits, f"{config.model} CNN-DNN {config.grid}: {count} local CNNs", ranks.world_size,
                        ranks.device.type), ranks)
    if count == 1:  # a 1x1 grid: its one local CNN is the global CNN, trained data-parallel on every rank
        train_global_local(parts, record, ranks, splits)
        indices = [0] if ranks.is_main else []
    elif indices and not all(local_record(record.dir, k).finished for k in indices):
        train_local_phase(parts, record, ranks, splits, indices)
    local_seconds = time.perf_counter() - started
    summaries = {k: local_record(record.dir, k).read_summary() for k in indices if local_record(record.dir, k).finished}
    diverged = any(summary.get("diverged") for summary in summaries.values())
    mine = {} if diverged else {k: _probabilities(parts, record, splits, k, ranks) for k in indices}
    # the rank's local CNNs trained together: their (shared) training seconds are the rank's
    training = max((summary["train_seconds"] for summary in summaries.values()), default=0.0)
    # gathered, not read from rank 0's disk: machines of a multi-node job need not share a filesystem
    everyone = world.gather({"seconds": training, "wall_seconds": local_seconds, "probabilities": mine,
                             "summaries": summaries}, ranks)
    first = next(({**summary["diverged_at"], "local_cnn": k} for rank in everyone
                  for k, summary in sorted(rank["summaries"].items()) if summary.get("diverged")), None)
    if first is not None:
        stop_diverged(parts, record, ranks, splits, first)
    write_environment(config, record, ranks)
    if ranks.is_main:
        _aggregate(parts, record, splits, everyone, ranks)
    world.barrier(ranks)


def train_local_phase(parts: Decomposition, record: RunRecord, ranks: Ranks, splits: DataSplits,
                      indices: list[int]) -> None:
    """This rank's local CNNs, together, on this rank alone (no gradient communication); resumes from the
    phase's checkpoint."""
    config, locals_ = parts.config, []
    for index in indices:
        sub = local_record(record.dir, index)
        sub.dir.mkdir(parents=True, exist_ok=True)
        sub.write_config(config.recorded | {"subdomain": index})
        locals_.append(sub)
    phase = phase_record(record.dir, ranks.rank)
    phase.dir.mkdir(parents=True, exist_ok=True)
    with divergence_recorded():
        train_run(config, phase, Ranks.single(ranks.device, ranks.local_rank),
                  build_model=lambda data: parts.stacked(indices), splits=splits,
                  outcome=LocalCNNs(config, locals_, indices, shown=ranks))


def train_global_local(parts: Decomposition, record: RunRecord, ranks: Ranks, splits: DataSplits) -> None:
    """The one local CNN of a 1x1 grid, on every rank of the job (DDP): the global CNN, as the baseline of a
    grid study, with its aggregator on top."""
    sub = local_record(record.dir, 0)
    if sub.finished:
        return
    sub.dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        sub.write_config(parts.config.recorded | {"subdomain": 0})
    world.barrier(ranks)
    with divergence_recorded():
        train_run(parts.config, sub, ranks, build_model=parts.builder(0), splits=splits)


def stop_diverged(parts: Decomposition, record: RunRecord, ranks: Ranks, splits: DataSplits, at: dict) -> NoReturn:
    """A CNN-DNN whose local CNN diverged: rank 0 writes its summary (`diverged_at`: that local CNN's), so the run
    is finished and nothing retries it, then every rank raises TrainingDiverged."""
    config = parts.config
    write_environment(config, record, ranks)
    if ranks.is_main:
        record.write_summary(build_summary(config, splits, ranks.device.type, ranks.world_size, parts.figures(),
                                           {"diverged": True, "diverged_at": at}, unmeasured=True))
    world.barrier(ranks)
    raise TrainingDiverged.at(at, config.resolved_lr, record.dir)


@torch.no_grad()
def _probabilities(parts: Decomposition, record: RunRecord, splits: DataSplits, index: int,
                   ranks: Ranks) -> dict[str, torch.Tensor]:
    """Local CNN `index`'s class probabilities on every split (its best validation weights)."""
    model = parts.local(index).to(ranks.device)
    alone = Ranks.single(ranks.device)
    model.load_state_dict(load_checkpoint(_weights(local_record(record.dir, index)), alone)["model"])
    model.eval()
    result = {}
    for name in ("train", "val", "test"):
        images = getattr(splits, name)
        batches = EvalInputs(images, splits.mean, splits.std, max(256, parts.config.batch_size), alone)
        batch_probabilities = [model(x).softmax(dim=1).cpu() for x, _ in batches]
        result[name] = torch.cat(batch_probabilities) if batch_probabilities else torch.empty(0, splits.num_classes)
    return result


def _aggregate(parts: Decomposition, record: RunRecord, splits: DataSplits, everyone: list, ranks: Ranks) -> None:
    """Rank 0: train the dense aggregator on frozen train probabilities, score every aggregator, write the summary."""
    config = parts.config
    by_index = {k: p for rank in everyone for k, p in rank["probabilities"].items()}
    stacked = {name: torch.stack([by_index[k][name] for k in range(parts.count)], dim=1)
               for name in ("train", "val", "test")}
    started = time.perf_counter()
    chosen = ("dnn", "mean", "vote") if config.aggregator == "all" else (config.aggregator,)
    labels = {name: getattr(splits, name).labels for name in ("train", "val", "test")}
    aggregators = {}
    if "dnn" in chosen:
        dense = train_dense(stacked["train"], labels["train"], parts.hidden_layers, seed=config.seed)
        aggregators["dnn"] = {"test_accuracy": accuracy(dense_decision(dense, stacked["test"]), labels["test"]),
                              "params": count_params(dense)}
        torch.save({"model": dense.state_dict()}, record.path("aggregator.pt"))
    for name, decide in (("mean", mean_decision), ("vote", vote_decision)):
        if name in chosen:
            aggregators[name] = {"test_accuracy": accuracy(decide(stacked["test"]), labels["test"])}
    aggregator_seconds = time.perf_counter() - started
    summary = independent_summary(parts, splits, ranks.device.type, everyone, aggregators, aggregator_seconds)
    record.write_summary(summary)
    say(aggregator_table(summary))
    say(final_line(summary, record.dir, "dnn" if config.aggregator == "all" else config.aggregator))


def aggregator_table(summary: dict) -> str:
    """What an independent CNN-DNN ends with: how good its local CNNs are alone, and what each aggregator makes
    of them, all on the test set, in fixed columns."""
    local = [a for a in summary["local_test_accuracy"] if a is not None]
    lines = [f"{'test accuracy':<16}{'mean':>8}{'min':>8}{'max':>8}"]
    if local:
        lines.append(f"{f'local CNNs ({len(local)})':<16}{sum(local) / len(local):>8.4f}{min(local):>8.4f}"
                     f"{max(local):>8.4f}")
    lines += [f"{name:<16}{figures['test_accuracy']:>8.4f}" for name, figures in summary["aggregators"].items()]
    return "\n".join(lines)


def independent_summary(parts: Decomposition, splits: DataSplits, device_type: str, everyone: list,
                        aggregators: dict, aggregator_seconds: float) -> dict:
    """The summary.json of an independent run: its local CNNs' runs (each with the loop's own summary) and its
    aggregators; `everyone`: what each rank gathered of its local CNNs. It trained in parts, so what no part
    measures for the whole (one loop's resources, step times, time to target) is null."""
    config = parts.config
    summaries = {k: summary for rank in everyone for k, summary in rank["summaries"].items()}
    locals_ = [summaries[k] for k in range(parts.count)]
    local_seconds = [rank["seconds"] for rank in everyone]  # training steps only, as a run's train_seconds
    comm_bytes = sum(s.get("comm_bytes_total") or 0 for s in locals_)
    figures = {
        "local_test_accuracy": [s["test_accuracy"] for s in locals_],
        "local_params": [s["params"] for s in locals_],
        "params": sum(s["params"] for s in locals_),
        "train_flops_per_image": sum(s["train_flops_per_image"] for s in locals_),
        "epochs_run": max(s["epochs_run"] for s in locals_),
        "aggregators": aggregators,
        "train_seconds": max(local_seconds) + aggregator_seconds,
        "phases": {"local": {"seconds": max(local_seconds), "seconds_per_rank": local_seconds,
                             "wall_seconds_per_rank": [rank["wall_seconds"] for rank in everyone],
                             "seconds_sequential": sum(local_seconds), "comm_bytes": comm_bytes},
                   "aggregator": {"seconds": aggregator_seconds}},
        "comm_bytes_total": comm_bytes, "diverged": False, "target_accuracy": None,
    }
    for figure in SHARED_FIGURES:  # the local phase's resources: mean over the local CNNs' runs
        values = [s[figure] for s in locals_ if s.get(figure) is not None]
        figures[figure] = sum(values) / len(values) if values else None
    chosen = aggregators["dnn" if config.aggregator == "all" else config.aggregator]["test_accuracy"]
    return build_summary(config, splits, device_type, len(everyone), parts.figures(),
                         Scores(chosen).figures(), figures, unmeasured=True)


def coherent_model(parts: Decomposition, splits: DataSplits) -> CoherentCNNDNN:
    locals_ = [parts.local(k) for k in range(parts.count)]
    if parts.config.dd_mode == "transfer":
        for k, local in enumerate(locals_):
            weights = load_checkpoint(_weights(local_record(Path(parts.config.init_from), k)),
                                      Ranks.single(torch.device("cpu")))
            local.load_state_dict(weights["model"])
    return CoherentCNNDNN(locals_, splits.num_classes, parts.hidden_layers)


def transfer_start(config: TrainConfig, record: RunRecord, ranks: Ranks, splits: DataSplits) -> TrainConfig:
    """The config of the coherent phase of a transfer run; trains the independent phase first when needed."""
    if config.init_from:
        return config
    first = RunRecord(record.dir / INDEPENDENT)
    if not first.finished:
        first.dir.mkdir(parents=True, exist_ok=True)
        # time to target and shifted test sets belong to the coherent phase, the one model trained end to end
        independent = config.model_copy(update={"dd_mode": "independent", "target_accuracy": None,
                                                "stop_at_target": False, "eval_shift": None})
        with divergence_recorded():  # its summary says where; this run's says it too, below
            train_independent(Decomposition.of(independent, splits), first, ranks, splits)
    # a local CNN that diverged ends this run as well, now or when it is run again; rank 0 wrote the summary
    at = world.gather(first.read_summary().get("diverged_at") if ranks.is_main else None, ranks)[0]
    if at is not None:
        stop_diverged(Decomposition.of(config, splits), record, ranks, splits, at)
    return config.model_copy(update={"init_from": str(first.dir)})


def coherent_extra(config: TrainConfig, model: CoherentCNNDNN, state: RunState, scores: Scores) -> dict:
    """What a coherent or transfer run's summary adds to the loop's own: its aggregator is the dense net."""
    local = {"seconds": 0.0, "comm_bytes": 0}
    if config.dd_mode == "transfer":  # the local CNNs it started from were trained first: their time counts
        started_from = RunRecord(config.init_from).read_summary() if RunRecord(config.init_from).finished else {}
        local = started_from.get("phases", {}).get("local", local)
    return {"strategy": "dd", "grid": config.grid, "overlap": config.overlap, "dd_mode": config.dd_mode,
            "aggregators": {"dnn": {"test_accuracy": scores.test_accuracy}},
            "local_params": [count_params(local_cnn) for local_cnn in model.locals.locals],
            "aggregator_params": count_params(model.aggregator),
            "phases": {"local": local, "coherent": {"seconds": state.train_seconds}}}


register_strategy(DomainDecomposition())
