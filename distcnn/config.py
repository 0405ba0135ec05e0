"""The one validated description of a run.

Every run option is a field of `TrainConfig`; the CLI's flags are generated from these fields (field
`nproc_per_node` is flag `--nproc-per-node`) and a study file uses the same names, so an option is declared
exactly once. Validation happens here, at the edge: a bad value becomes one `UsageError` line.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distcnn.errors import UsageError, nearest

# CPU threads of a rank that trains on a GPU: its CPU work is launching kernels and a few small tensor ops;
# per-sample augmentation runs in DataLoader workers, which have their own processes.
GPU_THREADS_PER_RANK = 2

OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.05, "weight_decay": 5e-4}, "adamw": {"lr": 2e-3, "weight_decay": 0.05}}

# Link caps of an emulated cluster, as tc takes them.
NO_CAP = ("none", "uncapped")
RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$", re.IGNORECASE)
DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$", re.IGNORECASE)
UNIT_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


# Run and study names become folder names: a name, never a path (`--out` is the only way to choose a folder).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
NAME_LENGTH = 100


def check_name(name: str, what: str) -> str:
    """`name` if it is a safe folder name; otherwise a ValueError saying what is allowed."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name or len(name) > NAME_LENGTH:
        raise ValueError(f"{what} must be a name, not a path: up to {NAME_LENGTH} letters, digits and . _ + -, "
                         "starting with a letter or digit, without '..' (choose folders with --out)")
    return name


def slug(text: str) -> str:
    """A safe folder name made from any text (a timm name like 'hf-hub:org/model' included)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-+")
    return re.sub(r"\.{2,}", ".", cleaned)[:NAME_LENGTH] or "run"


def parse_bandwidth(text: str | None) -> float | None:
    """Bits per second of a tc rate ('100mbit'); None for no cap ('none', or not given)."""
    if text is None or text.lower() in NO_CAP:
        return None
    match = RATE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"bandwidth {text!r}: use a rate like 100mbit, 1gbit or 500kbit (or none for no cap)")
    return float(match.group(1)) * UNIT_BITS[match.group(2).lower()]


def parse_delay(text: str | None) -> str | None:
    """A tc delay ('1ms'); None for none."""
    if text is None or text.lower() in ("none", "0", "0ms"):
        return None
    if not DELAY.match(text.strip()):
        raise ValueError(f"delay {text!r}: use a time like 1ms, 500us or 0.2s (or none)")
    return text.strip().lower()


class TrainConfig(BaseModel):
    """Options of one training run. `batch_size` is per rank: the global batch is batch_size × world size."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # data
    data: str = Field("fashion-mnist", description="fashion-mnist | imagefolder:PATH | synthetic[:k=v,...]")
    data_dir: str | None = Field(None, description="folder with the Fashion-MNIST IDX files")
    download: bool = Field(False, description="let torchvision download Fashion-MNIST when it is missing")
    image_size: int | None = Field(None, description="square input size in pixels (default: the data's own)")
    train_subset: int | None = Field(None, description="train on a stratified subset of N images")
    val_fraction: float = Field(0.1, description="share of the training pool held out for validation")
    test_fraction: float = Field(0.2, description="share held out for testing when the data has no test split")
    split_seed: int = Field(0, description="seed of the train/val/test split (kept fixed across replicates)")
    # model
    model: str = Field("simplecnn", description="a distcnn net or any timm model name (see `distcnn models`)")
    width: float = Field(1.0, gt=0, description="width multiplier of distcnn's own nets")
    # augmentation
    policy: str = Field("none", description="augmentation policy: none, flip-crop, paper, trivialaugment, randaugment")
    aug_backend: Literal["batched", "per-sample"] = Field(
        "batched", description="batched: whole batches on the training device; per-sample: torchvision v2 in DataLoader workers"
    )
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off)")
    workers: int | None = Field(None, ge=0, description="DataLoader workers per rank for the per-sample backend")
    # optimisation
    epochs: int = Field(2, ge=1, description="number of epochs")
    batch_size: int = Field(128, ge=1, description="images per step per rank (global batch = this × world size)")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="sgd (with momentum) or adamw")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False,
                             description="peak learning rate (default: sgd 0.05, adamw 2e-3)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float | None = Field(None, ge=0, description="weight decay (default: sgd 5e-4, adamw 0.05)")
    schedule: Literal["onecycle", "cosine"] = Field("onecycle", description="learning-rate schedule over all steps")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    seed: int = Field(0, description="seed of initialisation, shuffling and augmentation")
    patience: int | None = Field(None, ge=1, description="stop after N epochs without a better validation accuracy")
    # parallelism
    nproc_per_node: int = Field(1, description="ranks (processes) per machine, launched by torchrun")
    nnodes: int = Field(1, ge=1, description="number of machines")
    node_rank: int | None = Field(None, ge=0, description="this machine's rank (static rendezvous)")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of the rendezvous for several machines")
    rdzv_backend: Literal["c10d", "static"] = Field("c10d", description="torchrun rendezvous backend")
    rdzv_id: str = Field("distcnn", description="rendezvous id shared by all machines of one job")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts of the workers after a failure")
    collective_timeout: float | None = Field(
        None, gt=0, description="seconds a rank waits in a collective for the others before the run ends naming "
        "the rank that stopped (default: 600 until the first epoch ends, then 10x the slowest epoch, at least 120)")
    threads: int | None = Field(None, ge=1, description="threads per rank (default: cores / ranks on this machine)")
    oversubscribe: bool = Field(False, description="start more ranks than this machine has cores (CPU), which "
                                "is otherwise refused")
    cluster: Literal["none", "emulated"] = Field(
        "none", description="emulated: one torchrun node agent per host of `distcnn cluster up` (needs root)")
    bandwidth: str | None = Field(None, description="emulated cluster: cap every link at this rate for the run, "
                                  "e.g. 100mbit (none: uncapped; default: leave the cluster's caps)")
    delay: str | None = Field(None, description="emulated cluster: one-way delay added per link, e.g. 1ms "
                              "(needs the kernel's netem)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is present")
    # speed of the step itself
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or mixed precision: autocast of forward and loss to bf16 or fp16 (fp16 with "
                            "a gradient scaler)")
    memory_format: Literal["auto", "channels-last", "contiguous"] = Field(
        "auto", description="layout of images and conv weights (auto: the one measured faster on the device)")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the model with this mode (reduce-overhead: CUDA graphs, GPU only)")
    # domain decomposition (CNN-DNN)
    strategy: Literal["ddp", "dd"] = Field("ddp", description="ddp: one model, data-parallel; dd: a CNN-DNN of "
                                           "local CNNs on subimages (see --grid, --dd-mode)")
    grid: str = Field("2x2", description="dd: subdomains PxQ of each image")
    overlap: int = Field(0, ge=0, description="dd: pixels neighbouring subimages share")
    aggregator: Literal["dnn", "mean", "vote", "all"] = Field(
        "all", description="dd: what combines the local probabilities (all: score the three, report dnn)")
    aggregator_hidden: str = Field("64", description="dd: hidden layer sizes of the dense aggregator, e.g. 64,32")
    dd_mode: Literal["independent", "coherent", "transfer"] = Field(
        "independent", description="dd: local CNNs trained apart then aggregated; as one model; or one model "
                                   "started from an independent run's local CNNs (--init-from)")
    local_width: float | None = Field(None, gt=0, description="dd: width of each local CNN (default: width × "
                                      "sqrt(subimage share of the image))")
    init_from: str | None = Field(None, description="dd transfer: the independent run whose local CNNs start it")
    # what augmentation buys
    aug_strength: float = Field(1.0, ge=0, allow_inf_nan=False, description=(
        "scale every augmentation op's magnitudes and probability (1: the policy as defined, 0: none)"))
    target_accuracy: float | None = Field(None, gt=0, le=1, description=(
        "record wall time, epochs and images until the validation accuracy first reaches this"))
    stop_at_target: bool = Field(False, description="end training at the epoch that reaches --target-accuracy")
    eval_shift: str | None = Field(None, description=(
        "score the final model on shifted test sets: rotation,translation,noise,blur,contrast,occlusion or all"))
    shift_images: int | None = Field(None, ge=1, description=(
        "score the shifted test sets on a fixed random subset of N test images (default: all of them)"))
    # accounting
    telemetry: Literal["on", "off"] = Field(
        "on", description="resource sampling, step timers and byte counting (off only to measure their cost)")
    sample_interval: float = Field(0.5, gt=0, description="seconds between resource samples")
    tensorboard: bool = Field(False, description=(
        "also write TensorBoard event files (RUN_DIR/tensorboard/) from the epochs.csv rows and the telemetry "
        "series"))
    comm_hook: Literal["allreduce", "fp16", "bf16", "powersgd"] = Field(
        "allreduce", description="DDP gradient communication hook (torch's own)")
    powersgd_rank: int = Field(1, ge=1, description="matrix approximation rank of the powersgd hook")
    bucket_cap_mb: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "DDP gradient bucket size in MB (default: DDP's own, 25 MB with a 1 MB first bucket)"))
    # record
    name: str | None = Field(None, description="run name: letters, digits and . _ + - (default: model-policy)")
    out: str | None = Field(None, description="run directory (default: runs/<time>-<name>)")
    resume: bool = Field(False, description="continue the run in --out from its last checkpoint")
    prepare_only: bool = Field(False, description="write RUN_DIR/config.json for `torchrun -m distcnn.worker "
                               "RUN_DIR` and exit")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str | None) -> str | None:
        if name is not None:
            check_name(name, "the run name")
        return name

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {self.nproc_per_node}")
        if self.cluster == "emulated":
            if self.rdzv_endpoint or self.node_rank is not None:
                raise ValueError("--cluster emulated picks the rendezvous itself: leave out rdzv_endpoint and "
                                 "node_rank")
            if self.rdzv_backend != "c10d":
                raise ValueError("--cluster emulated rendezvouses with c10d over the emulated network")
            parse_bandwidth(self.bandwidth), parse_delay(self.delay)  # ValueError: one line
        elif self.bandwidth is not None or self.delay is not None:
            raise ValueError("bandwidth and delay cap the links of the emulated cluster: add --cluster emulated")
        elif self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several machines (nnodes > 1) need rdzv_endpoint HOST:PORT")
        if self.rdzv_backend == "static" and self.nnodes > 1 and self.node_rank is None:
            raise ValueError("the static rendezvous needs node_rank")
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("patience needs a validation split: set val_fraction > 0")
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError("stop-at-target needs target-accuracy (the validation accuracy to stop at)")
        if self.target_accuracy is not None and self.val_fraction == 0:
            raise ValueError("target-accuracy needs a validation split: set val-fraction > 0")
        if self.shift_images is not None and not self.eval_shift:
            raise ValueError("shift-images needs eval-shift (the shifted test sets to score)")
        if self.strategy == "dd" and self.dd_mode == "independent" and (
                self.target_accuracy is not None or self.eval_shift):
            raise ValueError("target-accuracy and eval-shift need one model trained end to end: with strategy "
                             "dd use dd-mode coherent or transfer")
        return self

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZER_DEFAULTS[self.optimizer]["lr"]

    @property
    def resolved_weight_decay(self) -> float:
        wd = self.weight_decay
        return wd if wd is not None else OPTIMIZER_DEFAULTS[self.optimizer]["weight_decay"]

    @property
    def recorded(self) -> dict:
        """The options as config.json records them: the learning rate and weight decay resolved, so the record
        says what trained (a default that changes later does not change what an old run says it used)."""
        return self.model_dump() | {"lr": self.resolved_lr, "weight_decay": self.resolved_weight_decay}

    @property
    def run_name(self) -> str:
        return self.name or slug(f"{self.model}-{self.policy}")

    def threads_per_rank(self, local_ranks: int | None = None, gpu: bool = False) -> int:
        """Cores shared evenly by the ranks of one machine, or ranks fight for cores. A rank that trains on a
        GPU needs few CPU threads (GPU_THREADS_PER_RANK): more only spin while the GPU works."""
        if self.threads:
            return self.threads
        if gpu:
            return max(1, min(GPU_THREADS_PER_RANK, available_cores()))
        return max(1, available_cores() // self.ranks_on_cores(local_ranks))

    def ranks_on_machine(self, per_host: int | None = None) -> int:
        """The ranks that share this machine's cores, memory and GPUs (the one place this rule is written):
        one host's (`per_host`, default --nproc-per-node), and every emulated host's ranks run here too."""
        per_host = per_host or self.nproc_per_node
        return per_host * (self.nnodes if self.cluster == "emulated" else 1)

    def ranks_on_cores(self, per_host: int | None = None) -> int:
        """The ranks that share the cores this process may use: the machine's (ranks_on_machine), but inside an
        emulated host only that host's, since each host is pinned to cores of its own (share_of_cores)."""
        inside_host = self.cluster == "emulated" and os.environ.get(HOST_ENV)
        return (per_host or self.nproc_per_node) if inside_host else self.ranks_on_machine(per_host)


HOST_ENV = "DISTCNN_HOST"  # set inside an emulated host, to its name: the machine's own is not the host's


def share_of_cores(index: int, count: int, cores: list[int] | None = None) -> list[int]:
    """Share `index` (0..count−1) of `count` even shares of `cores` (default: this process's CPU affinity), the
    cores left over unused: each emulated host's, each of a study's runs side by side. With more shares than
    cores, one core each, round robin (they share)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if count > len(cores):
        return [cores[index % len(cores)]]
    share = len(cores) // count
    return cores[index * share:(index + 1) * share]


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, and inside a Slurm job no more than the job's CPUs
    on this node (a cluster without task pinning leaves the affinity at the whole machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    granted = os.environ.get("SLURM_CPUS_PER_TASK") if os.environ.get("SLURM_JOB_ID") else None
    return min(cores, int(granted)) if granted and granted.isdigit() and int(granted) > 0 else cores


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def make_config(options: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from option names (`nproc-per-node` or `nproc_per_node`), one clear line on error."""
    normalised = {key.replace("-", "_"): value for key, value in options.items()}
    fields = TrainConfig.model_fields
    for key in normalised:
        if key not in fields:
            raise UsageError(f"unknown option {flag(key)}{nearest(flag(key), [flag(f) for f in fields])}")
    try:
        return TrainConfig(**normalised)
    except ValidationError as error:
        raise UsageError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as one line that names the flag."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "__root__"]
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if location:
        value = first.get("input")
        shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
        return f"{flag(location[0])}: {message}{shown}"
    return message
