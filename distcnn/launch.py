"""Starting a run: validate, prepare the run directory, apply the resume rules, launch the ranks.

`run(config)` is the whole job as the CLI, the study runner and the benchmarks see it: validate everything that
can be checked before any process starts, prepare the run directory, train (in this process, on torchrun's
workers, or on emulated hosts), and return the summary. `train(config, run_dir)` is what each rank executes
(`python -m distcnn.worker RUN_DIR` under torchrun): its place in the job, then the run's strategy.
"""

from __future__ import annotations

import shlex
import shutil
from datetime import datetime
from pathlib import Path

import torch

from distcnn import ownership, shifts, speed
from distcnn.augment import build_augment, build_batch_mix
from distcnn.checkpoint import read_checkpoint
from distcnn.config import OPTIMIZER_DEFAULTS, TrainConfig, make_config
from distcnn.console import say
from distcnn.data import DataSplits
from distcnn.errors import (CollectiveTimeout, FailedAfterTheRun, RunInterrupted, TrainingDiverged, UsageError,
                            WorkersFailed)
from distcnn.models import check_input_size, create_model
from distcnn.ownership import DirectoryLock, filesystem_problem
from distcnn.parallel import checks, emulated, torchrun, world
from distcnn.record import CHECKPOINT, STALLED, RunRecord, write_atomic
from distcnn.strategies import get_strategy
from distcnn.trainer import DATA_OPTIONS, load_splits

# Options that may differ when a run is resumed: how it runs, not what it computes.
RESUMABLE_DIFFERENCES = {"resume", "out", "threads", "workers", "device", "max_restarts", "collective_timeout",
                         "rdzv_endpoint",
                         "rdzv_backend", "rdzv_id", "node_rank", "telemetry", "sample_interval", "cluster", "oversubscribe",
                         "bandwidth", "delay", "prepare_only", "tensorboard"}


def data_options(config: TrainConfig) -> tuple:
    """What decides the data a run loads: runs that agree on these share their splits."""
    return tuple(getattr(config, name) for name in DATA_OPTIONS)


def validate(config: TrainConfig, splits: DataSplits | None = None, on_this_machine: bool = True) -> DataSplits:
    """Check data, model, augmentation and parallelism before anything is written or started (`splits`: the
    data already loaded for these data options, as a study checking many configurations passes it).
    `on_this_machine=False`: the run will train elsewhere (a Slurm job), so this machine's GPUs, cores and
    memory are not checked here; the job checks its own."""
    if on_this_machine:
        check_machine(config)
    if config.cluster == "emulated" and on_this_machine:
        from distcnn import cluster

        cluster.ready_hosts(config.nnodes)  # root, iproute2 and enough hosts
    splits = splits if splits is not None else load_splits(config)
    build_augment(config.policy, config.aug_backend, splits.channels, splits.image_size, config.aug_strength)
    shifts.parse_shifts(config.eval_shift)
    build_batch_mix(config.mixup, config.cutmix, splits.num_classes)
    model = create_model(config.model, in_chans=splits.channels, num_classes=splits.num_classes, width=config.width)
    check_input_size(model, splits.channels, splits.image_size, config.model)
    get_strategy(config.strategy).validate(config, splits)
    if on_this_machine:
        checks.check_ranks(config)  # cores and memory for the ranks (--oversubscribe: start them anyway)
        checks.check_endpoint(config)  # a rendezvous port another program took would wait without end
    job_ranks = config.nproc_per_node * config.nnodes
    if len(splits.train) < 2 * job_ranks:
        raise UsageError(f"{len(splits.train)} training images are too few for {job_ranks} ranks (need 2 per rank)")
    return splits


def check_machine(config: TrainConfig) -> None:
    """What this machine must have for the run: the GPUs asked for, and precision/compile support."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible here; use --device cpu or auto")
    checks.check_gpus(config)
    speed.check(config.precision, config.compile, world.device_type(config.device))


def config_from(options: dict) -> TrainConfig:
    """The run's options from those given. With --resume and an --out that holds a run, what was not given comes
    from the run's own config.json: `distcnn train --out RUN_DIR --resume` continues the run as it was started."""
    given = {key.replace("-", "_"): value for key, value in options.items()}
    if given.get("resume") and given.get("out") and RunRecord(given["out"]).path("config.json").is_file():
        saved = RunRecord(given["out"]).read_config()
        given = {key: value for key, value in saved.items()
                 if key in TrainConfig.model_fields and key != "prepare_only"} | given
    return make_config(given)


def default_run_dir(config: TrainConfig) -> Path:
    """runs/<time>-<name>, created here (a folder of its own even when two runs start in the same second)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{config.run_name}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")
        except OSError as error:
            raise filesystem_problem(error, "cannot create the run directory") from None


def prepare_run_dir(config: TrainConfig) -> tuple[RunRecord, bool, DirectoryLock]:
    """The run directory, created if needed, locked for this process, and checked against what it already
    holds; returns (record, created_now, lock). Nothing is left behind when it is refused."""
    if config.out is None:
        if config.resume:
            raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
        run_dir, created = default_run_dir(config), True
    else:
        run_dir = Path(config.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"--out {run_dir} is a file, not a directory")
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise filesystem_problem(error, "--out: cannot create the run directory") from None
    lock = DirectoryLock(run_dir, "run", ownership.lock_name(config.nnodes, config.cluster, config.node_rank))
    lock.acquire()  # refused: another process owns the folder (it may have created it a moment ago): keep it
    try:
        record = RunRecord(run_dir)
        check_existing(config, record)
        if not record.path("config.json").exists():
            try:
                record.write_config(config.recorded | {"out": str(run_dir)})
            except OSError as error:
                raise filesystem_problem(error, "cannot write the run record in") from None
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return record, created, lock


def check_existing(config: TrainConfig, record: RunRecord) -> None:
    """A run directory that holds a run already: continued with --resume (or joined by the other machines of
    its multi-node job) only with the options it was started with."""
    if not record.path("config.json").exists():
        return
    saved, current = resolved(record.read_config()), config.recorded
    changed = sorted(k for k in current if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current[k])
    # The other machines of a multi-node job may share this folder: they join the same unfinished run.
    joining = config.nnodes > 1 and not changed and not record.finished
    if not (config.resume or joining):
        state = "a finished run" if record.finished else "an unfinished run (pass --resume to continue it)"
        raise UsageError(f"{record.dir} already holds {state}; choose another --out")
    if changed:
        raise UsageError(f"--resume: {record.dir} was started with other options: {', '.join(changed)}")


def resolved(saved: dict) -> dict:
    """A saved config with its learning rate and weight decay resolved as the run resolved them: a record
    written before config.json held them (null: the optimizer's default) compares equal to one that does."""
    defaults = OPTIMIZER_DEFAULTS.get(saved.get("optimizer"), {})
    return saved | {key: defaults.get(key) for key in ("lr", "weight_decay") if saved.get(key) is None}


def run(config: TrainConfig) -> dict | None:
    """Validate, prepare and lock the run directory, train, and return the summary. Raises UsageError on bad
    input, and when another process works in the run directory.

    Returns None on a machine of a multi-node job that does not see rank 0's summary (another filesystem), and
    with --prepare-only (the run directory then holds config.json, for torchrun to start the workers on)."""
    validate(config)
    record, created, lock = prepare_run_dir(config)
    try:
        if config.prepare_only:
            command = shlex.join(["torchrun", *torchrun.torchrun_args(config, record.dir)])
            say(f"prepared {record.dir}; start the run with: {command}")
            return None
        if record.finished:
            say(f"{record.dir} is already finished; nothing to do")
            return finished_summary(config, record)
        if record.has_checkpoint:  # a damaged one is found (or replaced by the one before it) before any rank
            read_checkpoint(record.path(CHECKPOINT))
        try:
            if config.cluster == "emulated":
                emulated.launch_emulated(config, record.dir)
            elif torchrun.needs_torchrun(config):
                torchrun.launch(config, record.dir)
            else:
                train(config, record.dir)
        except FailedAfterTheRun as warning:
            say(f"warning: {warning}")
        except (UsageError, WorkersFailed) as error:
            # A mistake found only by the workers: leave nothing half-written behind.
            if created and not record.has_checkpoint and getattr(error, "exit_code", 2) == 2:
                lock.release()
                shutil.rmtree(record.dir, ignore_errors=True)
            raise
        except OSError as error:  # the disk filled up, the folder became read-only: resumable from the checkpoint
            problem = filesystem_problem(error, "the run stopped on a file-system error at")
            raise RunInterrupted(f"{problem}; after fixing it, continue the run with "
                                 f"`distcnn train --out {record.dir} --resume`") from None
        return finished_summary(config, record) if record.finished else None
    finally:
        lock.release()


def finished_summary(config: TrainConfig, record: RunRecord) -> dict:
    """The summary of a finished run; a run that diverged raises TrainingDiverged (its ranks wrote where and
    returned normally, so torchrun restarted nothing), each time it is asked for."""
    summary = record.read_summary()
    if summary.get("diverged"):
        raise TrainingDiverged.at(summary["diverged_at"], config.resolved_lr, record.dir)
    return summary


def train(config: TrainConfig, run_dir: Path) -> None:
    """What every rank runs: join the job, run the config's strategy on this rank, and leave the job."""
    ranks = world.setup(config)
    try:
        get_strategy(config.strategy).run(config, RunRecord(run_dir), ranks)
    except RuntimeError as error:
        if not (ranks.distributed and world.is_timeout(error)):
            raise
        raise stalled(config, RunRecord(run_dir), ranks) from None
    finally:
        world.teardown(ranks)


def stalled(config: TrainConfig, record: RunRecord, ranks) -> CollectiveTimeout:
    """This rank's collective timed out: name the ranks that stopped making progress, in the line the launcher
    prints (record STALLED), and how the run goes on."""
    stopped = world.stopped_ranks(ranks)
    waited = f"{config.collective_timeout:g} s (--collective-timeout)" if config.collective_timeout else \
        "its collective timeout (--collective-timeout; default: 10x the slowest epoch, at least 120 s)"
    who = ", ".join(f"rank {rank} (host {where.split(' ')[0]}, pid {where.partition(' ')[2]})"
                    for rank, where in stopped.items()) or "another rank"
    line = (f"{who} stopped making progress: rank {ranks.rank} waited {waited} for it in a collective; continue "
            f"the run with `distcnn train --out {record.dir} --resume` (--max-restarts N restarts it by itself)")
    try:
        write_atomic(record.path(STALLED), lambda handle: handle.write(line))
    except OSError:
        pass  # the launcher then names the failure by exit codes
    return CollectiveTimeout(line)
