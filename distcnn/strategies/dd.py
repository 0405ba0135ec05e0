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
from pathlib import Path
from typing import NoReturn

import torch

from distcnn import summary as declared
from distcnn.checkpoint import load_checkpoint
from distcnn.config import TrainConfig
from distcnn.console import loaded_line, say
from distcnn.data import DataSplits
from distcnn.decomposition.aggregators import (accuracy, dense_decision, mean_decision, train_dense,
                                               vote_decision)
from distcnn.decomposition.models import CoherentCNNDNN, build_local
from distcnn.decomposition.subimages import Grid, Layout
from distcnn.errors import TrainingDiverged, UsageError
from distcnn.models import count_params
from distcnn.parallel import world
from distcnn.parallel.ranks import Ranks
from distcnn.pipeline import EvalInputs
from distcnn.record import BEST, CHECKPOINT, RunRecord
from distcnn.run_summary import final_line
from distcnn.strategies import register_strategy
from distcnn.strategies.local_phase import SHARED_FIGURES, LocalPhase
from distcnn.trainer import Trainer, accounted, load_splits, train_run, write_environment

LOCAL = "local"


def layout_of(config: TrainConfig, splits: DataSplits) -> Layout:
    return Grid.parse(config.grid, config.overlap).layout(splits.image_size, splits.image_size)


def hidden_layers(config: TrainConfig) -> tuple[int, ...]:
    """--aggregator-hidden '64,32' -> (64, 32); '' -> no hidden layer."""
    return tuple(int(size) for size in config.aggregator_hidden.split(",") if size.strip())


def local_record(run_dir: Path, index: int) -> RunRecord:
    return RunRecord(Path(run_dir) / LOCAL / f"k{index:02d}")


def subdomains_of(rank: int, world_size: int, count: int) -> list[int]:
    """Round-robin: rank r trains subdomains r, r + N, r + 2N, … (balanced to within one)."""
    return list(range(rank, count, world_size))


def validate(config: TrainConfig, splits: DataSplits) -> None:
    """The grid, the local CNN, the ranks and the starting point of transfer, before anything starts."""
    layout = layout_of(config, splits)
    build_local(config.model, splits.channels, splits.num_classes, layout, 0, config.width, config.local_width)
    world = config.nproc_per_node * config.nnodes
    count = Grid.parse(config.grid).count
    if config.dd_mode in ("independent", "transfer") and not config.init_from and 1 < count < world:
        raise UsageError(f"{world} ranks for {count} subdomains ({config.grid}): independent training gives each "
                         f"rank whole local CNNs; use at most {count} ranks, or a finer --grid")
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


def local_builder(config: TrainConfig, layout: Layout, index: int):
    """What the training loop calls to build local CNN `index` for the data it loaded."""
    def build(splits: DataSplits):
        return build_local(config.model, splits.channels, splits.num_classes, layout, index, config.width,
                           config.local_width)
    return build


class DomainDecomposition:
    name = "dd"

    def validate(self, config: TrainConfig, splits: DataSplits) -> None:
        validate(config, splits)

    def run(self, config: TrainConfig, record: RunRecord, ranks: Ranks) -> None:
        if config.dd_mode == "independent":
            train_independent(config, record, ranks, load_splits(config))
            return
        # coherent or transfer: the whole CNN-DNN is the model; the run's accounting starts first, so its setup
        # phase holds the loading of the data and a transfer run's independent phase
        with accounted(config, record, ranks) as accounting:
            splits = load_splits(config)
            if config.dd_mode == "transfer":
                config = transfer_start(config, record, ranks, splits)
            Trainer(config, record, ranks, accounting, splits=splits,
                    build_model=functools.partial(coherent_model, config),
                    summary_extra=functools.partial(coherent_extra, config)).fit()


def train_independent(config: TrainConfig, record: RunRecord, ranks: Ranks, splits: DataSplits) -> None:
    """Raises TrainingDiverged on every rank, after writing the summary, when a local CNN's loss diverged: the
    rank's local CNNs stop together, and all ranks learn of it at the gather."""
    layout = layout_of(config, splits)
    count = len(layout.boxes)
    started = time.perf_counter()
    indices = subdomains_of(ranks.rank, ranks.world_size, count)
    if count > 1:  # (a 1x1 grid's one local CNN says it through the loop)
        say(loaded_line(splits, f"{config.model} CNN-DNN {config.grid}: {count} local CNNs", ranks.world_size,
                        ranks.device.type), ranks)
    if count == 1:  # a 1x1 grid: its one local CNN is the global CNN, trained data-parallel on every rank
        train_global_local(config, record, ranks, splits, layout)
        indices = [0] if ranks.is_main else []
    elif indices and not all(local_record(record.dir, k).finished for k in indices):
        train_local_phase(config, record, ranks, splits, layout, indices)
    local_seconds = time.perf_counter() - started
    summaries = {k: local_record(record.dir, k).read_summary() for k in indices if local_record(record.dir, k).finished}
    diverged = any(summary.get("diverged") for summary in summaries.values())
    mine = {} if diverged else {k: _probabilities(config, record, splits, layout, k, ranks) for k in indices}
    # the rank's local CNNs trained together: their (shared) training seconds are the rank's
    training = max((summary["train_seconds"] for summary in summaries.values()), default=0.0)
    # gathered, not read from rank 0's disk: machines of a multi-node job need not share a filesystem
    everyone = world.gather({"seconds": training, "wall_seconds": local_seconds, "probabilities": mine,
                                "summaries": summaries}, ranks)
    first = next(({**summary["diverged_at"], "local_cnn": k} for rank in everyone
                  for k, summary in sorted(rank["summaries"].items()) if summary.get("diverged")), None)
    if first is not None:
        stop_diverged(config, record, ranks, splits, first)
    write_environment(config, record, ranks)
    if ranks.is_main:
        _aggregate(config, record, splits, layout, everyone)
    world.barrier(ranks)


def train_local_phase(config: TrainConfig, record: RunRecord, ranks: Ranks, splits: DataSplits, layout: Layout,
                      indices: list[int]) -> None:
    """This rank's local CNNs, together, on this rank alone (no gradient communication); resumes from the
    phase's checkpoint. A loss that diverged leaves the summaries saying where (TrainingDiverged is caught)."""
    locals_ = []
    for index in indices:
        sub = local_record(record.dir, index)
        sub.dir.mkdir(parents=True, exist_ok=True)
        sub.write_config(config.recorded | {"subdomain": index})
        locals_.append(sub)
    phase = RunRecord(record.dir / LOCAL / f"rank{ranks.rank}")
    phase.dir.mkdir(parents=True, exist_ok=True)
    alone = Ranks.single(ranks.device, ranks.local_rank)
    try:
        with accounted(config, phase, alone) as accounting:
            LocalPhase(config, phase, locals_, alone, accounting, splits, layout, indices, shown=ranks).fit()
    except TrainingDiverged:
        pass


def train_global_local(config: TrainConfig, record: RunRecord, ranks: Ranks, splits: DataSplits,
                       layout: Layout) -> None:
    """The one local CNN of a 1x1 grid, on every rank of the job (DDP): the global CNN, as the baseline of a
    grid study, with its aggregator on top."""
    sub = local_record(record.dir, 0)
    if sub.finished:
        return
    sub.dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        sub.write_config(config.recorded | {"subdomain": 0})
    world.barrier(ranks)
    try:
        train_run(config, sub, ranks, build_model=local_builder(config, layout, 0), splits=splits)
    except TrainingDiverged:
        pass


def stop_diverged(config: TrainConfig, record: RunRecord, ranks: Ranks, splits: DataSplits, at: dict) -> NoReturn:
    """A CNN-DNN whose local CNN diverged: rank 0 writes its summary (`diverged_at`: that local CNN's), so the run
    is finished and nothing retries it, then every rank raises TrainingDiverged."""
    write_environment(config, record, ranks)
    if ranks.is_main:
        record.write_summary(declared.checked(summary_head(config, splits) | {
            "world_size": ranks.world_size, "test_accuracy": None, "diverged": True, "diverged_at": at}))
    world.barrier(ranks)
    raise TrainingDiverged.at(at, config.resolved_lr, record.dir)


@torch.no_grad()
def _probabilities(config, record, splits, layout, index, ranks) -> dict[str, torch.Tensor]:
    """Local CNN `index`'s class probabilities on every split (its best validation weights)."""
    sub = local_record(record.dir, index)
    model = build_local(config.model, splits.channels, splits.num_classes, layout, index, config.width,
                        config.local_width).to(ranks.device)
    alone = Ranks.single(ranks.device)
    model.load_state_dict(load_checkpoint(_weights(sub), alone)["model"])
    model.eval()
    result = {}
    for name in ("train", "val", "test"):
        images = getattr(splits, name)
        batches = EvalInputs(images, splits.mean, splits.std, max(256, config.batch_size), alone)
        parts = [model(x).softmax(dim=1).cpu() for x, _ in batches]
        result[name] = torch.cat(parts) if parts else torch.empty(0, splits.num_classes)
    return result


def _aggregate(config: TrainConfig, record: RunRecord, splits: DataSplits, layout: Layout, everyone: list) -> None:
    """Rank 0: train the dense aggregator on frozen train probabilities, score every aggregator, write the summary."""
    count = len(layout.boxes)
    by_index = {k: p for rank in everyone for k, p in rank["probabilities"].items()}
    stacked = {name: torch.stack([by_index[k][name] for k in range(count)], dim=1) for name in ("train", "val", "test")}
    started = time.perf_counter()
    chosen = ("dnn", "mean", "vote") if config.aggregator == "all" else (config.aggregator,)
    labels = {name: getattr(splits, name).labels for name in ("train", "val", "test")}
    aggregators = {}
    if "dnn" in chosen:
        dense = train_dense(stacked["train"], labels["train"], hidden_layers(config), seed=config.seed)
        aggregators["dnn"] = {"test_accuracy": accuracy(dense_decision(dense, stacked["test"]), labels["test"]),
                              "params": count_params(dense)}
        torch.save({"model": dense.state_dict()}, record.path("aggregator.pt"))
    for name, decide in (("mean", mean_decision), ("vote", vote_decision)):
        if name in chosen:
            aggregators[name] = {"test_accuracy": accuracy(decide(stacked["test"]), labels["test"])}
    aggregator_seconds = time.perf_counter() - started
    summary = independent_summary(config, splits, layout, everyone, aggregators, aggregator_seconds)
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


def independent_summary(config: TrainConfig, splits: DataSplits, layout: Layout, everyone: list, aggregators: dict,
                        aggregator_seconds: float) -> dict:
    """The summary.json of an independent run, assembled here and only here: its local CNNs' runs (each with
    the loop's own summary) and its aggregators; `everyone`: what each rank gathered of its local CNNs."""
    count = len(layout.boxes)
    summaries = {k: summary for rank in everyone for k, summary in rank["summaries"].items()}
    locals_ = [summaries[k] for k in range(count)]
    local_seconds = [rank["seconds"] for rank in everyone]  # training steps only, as a run's train_seconds
    summary = summary_head(config, splits) | {
        "local_test_accuracy": [s["test_accuracy"] for s in locals_],
        "local_params": [s["params"] for s in locals_],
        "params": sum(s["params"] for s in locals_),
        "train_flops_per_image": sum(s["train_flops_per_image"] for s in locals_),
        "epochs_run": max(s["epochs_run"] for s in locals_),
        "test_accuracy": aggregators["dnn" if config.aggregator == "all" else config.aggregator]["test_accuracy"],
        "aggregators": aggregators,
        "train_seconds": max(local_seconds) + aggregator_seconds,
        "phases": {"local": {"seconds": max(local_seconds), "seconds_per_rank": local_seconds,
                             "wall_seconds_per_rank": [rank["wall_seconds"] for rank in everyone],
                             "seconds_sequential": sum(local_seconds),
                             "comm_bytes": sum(s.get("comm_bytes_total") or 0 for s in locals_)},
                   "aggregator": {"seconds": aggregator_seconds}},
        "world_size": len(everyone),
        "comm_bytes_total": sum(s.get("comm_bytes_total") or 0 for s in locals_),
        "diverged": False, "diverged_at": None,
    }
    for figure in SHARED_FIGURES:  # the local phase's resources: mean over the local CNNs' runs
        values = [s[figure] for s in locals_ if s.get(figure) is not None]
        summary[figure] = sum(values) / len(values) if values else None
    return declared.checked(summary)


def summary_head(config: TrainConfig, splits: DataSplits) -> dict:
    """What every summary of a CNN-DNN that is not trained as one model begins with: the run and its data."""
    layout = layout_of(config, splits)
    return {"name": config.run_name, "model": config.model, "policy": config.policy, "data": splits.name,
            "strategy": "dd", "grid": config.grid, "overlap": config.overlap, "dd_mode": config.dd_mode,
            "subimage_size": [layout.sub_height, layout.sub_width], "bucket_cap_mb": config.bucket_cap_mb,
            "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test)}


def coherent_model(config: TrainConfig, splits: DataSplits) -> CoherentCNNDNN:
    layout = layout_of(config, splits)
    locals_ = [build_local(config.model, splits.channels, splits.num_classes, layout, k, config.width,
                           config.local_width) for k in range(len(layout.boxes))]
    if config.dd_mode == "transfer":
        for k, local in enumerate(locals_):
            weights = load_checkpoint(_weights(local_record(Path(config.init_from), k)),
                                      Ranks.single(torch.device("cpu")))
            local.load_state_dict(weights["model"])
    return CoherentCNNDNN(locals_, splits.num_classes, hidden_layers(config))


INDEPENDENT = "independent"  # where a transfer run without --init-from trains its local CNNs first


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
        try:
            train_independent(independent, first, ranks, splits)
        except TrainingDiverged:
            pass  # its summary says where; this run's says it too, below
    # a local CNN that diverged ends this run as well, now or when it is run again; rank 0 wrote the summary
    at = world.gather(first.read_summary().get("diverged_at") if ranks.is_main else None, ranks)[0]
    if at is not None:
        stop_diverged(config, record, ranks, splits, at)
    return config.model_copy(update={"init_from": str(first.dir)})


def coherent_extra(config: TrainConfig, model: CoherentCNNDNN, summary: dict) -> dict:
    """What a coherent or transfer run's summary adds to the loop's own: its aggregator is the dense net."""
    local = {"seconds": 0.0, "comm_bytes": 0}
    if config.dd_mode == "transfer":  # the local CNNs it started from were trained first: their time counts
        started_from = RunRecord(config.init_from).read_summary() if RunRecord(config.init_from).finished else {}
        local = started_from.get("phases", {}).get("local", local)
    return {"strategy": "dd", "grid": config.grid, "overlap": config.overlap, "dd_mode": config.dd_mode,
            "aggregators": {"dnn": {"test_accuracy": summary["test_accuracy"]}},
            "local_params": [count_params(local_cnn) for local_cnn in model.locals.locals],
            "aggregator_params": count_params(model.aggregator),
            "phases": {"local": local, "coherent": {"seconds": summary["train_seconds"]}}}


register_strategy(DomainDecomposition())
