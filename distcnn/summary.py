"""The declared run summary: every field of summary.json — its name, type, unit and meaning — in one table.

A run writes summary.json last (its presence means the run finished); the study store flattens it into one row
per run, the analysis and the report read that row, `distcnn show` prints it. All of them take the names, units
and the list of study responses from here, so a new figure is one entry in `FIELDS` (and `DERIVED` when the
store makes a column of it). A figure that was not measured is null, never 0.

    FIELDS           the top-level keys of summary.json, in order
    DERIVED          the study columns the store derives from nested fields (patterns: step_<phase>_s, …)
    RESPONSES        every name a study may take as a response
    field(name)      the Field of a key or of a derived column (None when not declared); unit(name) its unit

No torch here: the study store, the analysis and the report import this module.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

# The names the summary is keyed by, owned here so that readers of the summary need no torch: the shifted test
# sets and their severities (distcnn.shifts), the timed phases of a step (distcnn.telemetry.steps) and a
# CNN-DNN's aggregators (distcnn.decomposition).
SHIFT_NAMES = ("rotation", "translation", "noise", "blur", "contrast", "occlusion")
SEVERITIES = (1, 2, 3)
PHASES = ("data_wait", "augmentation", "forward", "backward", "optimizer")
STEP_PHASES = (*PHASES, "step")  # the phases and the whole step, as step_time_breakdown holds them
AGGREGATORS = ("dnn", "mean", "vote")

# Units: "" a label or flag; "fraction" 0..1 (accuracies); "%" 100 = one core or the whole; "s" seconds;
# "B" bytes; "B/s" bytes per second; "1/s" packets per second; "J" joules; "FLOP" and "FLOP/s";
# "images", "images/s", "epochs", "parameters", "ranks": counts; "MB" 2^20 bytes, as DDP's bucket_cap_mb counts.
PLACEHOLDERS = {"phase": STEP_PHASES, "aggregator": AGGREGATORS, "name": SHIFT_NAMES, "severity": SEVERITIES}
GROUPS = ("run", "time", "compute", "resources", "network", "communication")  # how `distcnn show` groups them


@dataclass(frozen=True)
class Field:
    """One figure of the summary. `name` may be a pattern of PLACEHOLDERS (`shift_<name>_accuracy`).

    response: a study may analyse it; optional: not in every summary (only a CNN-DNN's, say); group and
    label: where `distcnn show` prints it (no group: in `other`, or in a section of its own)."""

    name: str
    type: type
    unit: str
    meaning: str
    response: bool = False
    optional: bool = False
    group: str = ""
    label: str = ""

    @property
    def placeholders(self) -> list[str]:
        return re.findall(r"<(\w+)>", self.name)

    def column(self, **values) -> str:
        """The name with its placeholders filled: step_<phase>_s, phase="forward" -> step_forward_s."""
        return re.sub(r"<(\w+)>", lambda match: str(values[match.group(1)]), self.name)

    def names(self) -> list[str]:
        """Every name the field stands for (one, or one per value of its placeholders)."""
        keys = self.placeholders
        return [self.column(**dict(zip(keys, values)))
                for values in itertools.product(*(PLACEHOLDERS[key] for key in keys))]


F = Field
FIELDS: tuple[Field, ...] = (
    # -- the run ---------------------------------------------------------------------------------------------
    F("name", str, "", "the run's name", group="run", label="name"),
    F("model", str, "", "the model (--model)", group="run", label="model"),
    F("policy", str, "", "the augmentation policy", group="run", label="policy"),
    F("aug_backend", str, "", "where augmentation runs: batched or per-sample"),
    F("precision", str, "", "fp32, bf16 or fp16"),
    F("memory_format", str, "", "the memory format as resolved for the device"),
    F("compile", str, "", "the torch.compile mode, or off"),
    F("data", str, "", "the dataset", group="run", label="data"),
    F("world_size", int, "ranks", "ranks that trained", group="run", label="world size"),
    F("epochs_run", int, "epochs", "epochs trained", response=True, group="run", label="epochs"),
    F("strategy", str, "", "dd for a CNN-DNN (absent: ddp, one model)", optional=True),
    F("grid", str, "", "a CNN-DNN's subdomains PxQ", optional=True),
    F("overlap", int, "pixels", "pixels neighbouring subimages share", optional=True),
    F("dd_mode", str, "", "independent, coherent or transfer", optional=True),
    F("subimage_size", list, "pixels", "[height, width] of a subimage (independent)", optional=True),
    # -- accuracy and time -----------------------------------------------------------------------------------
    F("test_accuracy", float, "fraction", "test accuracy of the best validation weights (a CNN-DNN: the "
      "chosen aggregator's)", response=True, group="run", label="test accuracy"),
    F("best_val_accuracy", float, "fraction", "the best validation accuracy of any epoch", response=True,
      group="run", label="best val accuracy"),
    F("best_epoch", int, "epochs", "the epoch of the best validation accuracy"),
    F("stopped_early", bool, "", "fewer epochs than --epochs ran"),
    F("diverged", bool, "", "the training loss became NaN or infinite: the run stopped after that epoch, "
      "unscored (a study records it as failed)"),
    F("diverged_at", dict, "", "where: {epoch, step (in the epoch), global_step (counted from 1), loss}, with "
      "local_cnn for a CNN-DNN's local CNN (null: it did not diverge)"),
    F("train_seconds", float, "s", "training steps' wall time (a CNN-DNN: slowest local phase + aggregator)",
      response=True, group="time", label="train seconds"),
    F("eval_seconds", float, "s", "validation time, summed over the epochs", response=True),
    F("compile_seconds", float, "s", "time torch.compile took before the first epoch", response=True),
    F("warmup_seconds", float, "s", "training time of the first epoch above what its steps take at the "
      "steady-state median step: the one-time cost of kernel selection, first-touch allocation and caches "
      "(as measured, so about 0 or slightly negative when there is none; null: the first epoch had fewer than "
      "4 steps, or telemetry off)", response=True),
    F("step_seconds_steady", float, "s", "median step wall time after warm-up (steps of epochs after the first, "
      "else of the first from its 4th step), all ranks pooled", response=True),
    F("images_seen", int, "images", "training images processed, all ranks"),
    F("images_per_second", float, "images/s", "training throughput, all ranks", response=True, group="time",
      label="images/s"),
    F("step_time_breakdown", dict, "s", "mean seconds per step of each phase of STEP_PHASES (null: not timed)"),
    # -- model cost ------------------------------------------------------------------------------------------
    F("params", int, "parameters", "parameters (a CNN-DNN: all local CNNs)", response=True, group="compute",
      label="params"),
    F("train_flops_per_image", float, "FLOP", "training FLOPs per image (forward + backward)", response=True,
      group="compute", label="train GFLOPs/image"),
    F("achieved_flops_per_s", float, "FLOP/s", "training FLOPs per second per rank", response=True,
      group="compute", label="achieved GFLOP/s"),
    F("local_test_accuracy", list, "fraction", "each local CNN's test accuracy, row-major", optional=True),
    F("local_params", list, "parameters", "each local CNN's parameters", optional=True),
    F("aggregator_params", int, "parameters", "the dense aggregator's parameters (coherent, transfer)",
      optional=True),
    F("aggregators", dict, "", "aggregator -> {test_accuracy, params}", optional=True),
    F("phases", dict, "", "a CNN-DNN's phases: local {seconds, seconds_per_rank, wall_seconds_per_rank, "
      "seconds_sequential, comm_bytes}, aggregator or coherent {seconds}", optional=True),
    # -- data ------------------------------------------------------------------------------------------------
    F("train_images", int, "images", "training images"),
    F("val_images", int, "images", "validation images"),
    F("test_images", int, "images", "test images"),
    F("resumed_at_epochs", list, "epochs", "epochs a resumed run started after"),
    F("restarts", list, "", "each restart and the epoch it resumed after"),
    F("telemetry", str, "", "on or off (--telemetry)"),
    # -- what augmentation buys ------------------------------------------------------------------------------
    F("aug_strength", float, "", "the policy's strength (0: none, 1: as defined)"),
    F("target_accuracy", float, "fraction", "the validation accuracy to time (null: none)"),
    F("time_to_target_seconds", float, "s", "wall seconds until validation reached the target", response=True),
    F("epochs_to_target", int, "epochs", "epochs until validation reached the target", response=True),
    F("images_to_target", int, "images", "training images until validation reached the target", response=True),
    F("stopped_at_target", bool, "", "--stop-at-target cut the run short"),
    F("shift_images", int, "images", "test images the shifts were scored on"),
    F("shift_clean_accuracy", float, "fraction", "accuracy on those images unshifted", response=True),
    F("shift_accuracy", dict, "fraction", "shift -> severity -> accuracy"),
    F("shift_accuracy_mean", float, "fraction", "mean over every shift and severity", response=True),
    F("shifts_in_training", list, "", "the shifts the policy itself trains on"),
    F("shift_eval_seconds", float, "s", "time scoring the shifted test sets took", response=True),
    # -- resources (training phase; time-weighted means) -----------------------------------------------------
    F("cpu_percent_mean", float, "%", "system CPU, mean over hosts", response=True, group="resources",
      label="system CPU"),
    F("process_cpu_percent_mean", float, "%", "process CPU (100 = one core), mean over ranks", response=True,
      group="resources", label="process CPU"),
    F("cpu_seconds_total", float, "s", "CPU seconds of every rank", response=True, group="resources",
      label="CPU seconds"),
    F("mem_percent_mean", float, "%", "system memory, mean over hosts", response=True, group="resources",
      label="system memory"),
    F("rss_peak_bytes", int, "B", "the largest peak RSS of any rank", response=True, group="resources",
      label="peak RSS"),
    F("gpu_util_percent_mean", float, "%", "GPU utilisation, mean over ranks", response=True, group="resources",
      label="GPU util"),
    F("gpu_memory_peak_bytes", int, "B", "the largest GPU memory of any rank", response=True,
      group="resources", label="GPU memory peak"),
    F("net_packets_per_s_mean", float, "1/s", "packets rx + tx of the run's interfaces, summed over hosts",
      response=True, group="network", label="packets/s"),
    F("net_bytes_per_s_mean", float, "B/s", "bytes rx + tx per second, summed over hosts", response=True,
      group="network", label="bytes/s"),
    F("net_bytes_total", float, "B", "bytes rx + tx, summed over hosts", response=True, group="network",
      label="bytes total"),
    F("energy_joules", float, "J", "energy: RAPL + NVML", response=True),
    F("energy_sources", list, "", "where energy_joules comes from (rapl, nvml)"),
    F("hosts", dict, "", "host -> its ranks, interfaces and figures"),
    # -- communication ---------------------------------------------------------------------------------------
    F("comm_hook", str, "", "the DDP comm hook (null on one rank)", group="communication", label="hook"),
    F("gradient_bytes", int, "B", "bytes of the gradients", group="communication", label="gradient bytes"),
    F("bucket_cap_mb", float, "MB", "DDP gradient bucket size (null: DDP's default, 25 MB with a 1 MB first "
      "bucket)"),
    F("comm_bytes_per_step", float, "B", "counted gradient bytes per step per rank", response=True,
      group="communication", label="bytes/step (counted)"),
    F("comm_bytes_total", int, "B", "counted gradient bytes, all ranks, all steps", response=True,
      group="communication", label="bytes total, all ranks"),
    F("comm_ring_bytes_per_step_formula", float, "B", "2(N-1)/N x bytes per step: a ring allreduce's bytes "
      "sent per rank", group="communication", label="ring bytes sent/step/rank (formula)"),
    F("ddp_comm_seconds_mean", float, "s", "DDP's allreduce time per step", response=True,
      group="communication", label="DDP comm time"),
    F("ddp_overlap_seconds_mean", float, "s", "the part of it overlapped with backward", response=True,
      group="communication", label="DDP compute/comm overlap"),
    F("ddp_backward_compute_seconds_mean", float, "s", "backward computation per step", response=True,
      group="communication", label="DDP backward compute"),
)

# Study columns the store derives from nested fields (study.store.flatten_summary).
STEP = F("step_<phase>_s", float, "s", "step_time_breakdown's phase", response=True)
AGGREGATOR_ACCURACY = F("<aggregator>_test_accuracy", float, "fraction", "a CNN-DNN aggregator's test accuracy",
                        response=True)
LOCAL_PHASE = F("local_phase_seconds", float, "s", "a CNN-DNN's local phase (phases.local.seconds)", response=True)
SHIFT = F("shift_<name>_accuracy", float, "fraction", "a shift's mean accuracy over its severities", response=True)
SHIFT_SEVERITY = F("shift_<name>_s<severity>_accuracy", float, "fraction", "a shift's accuracy at one severity")
DERIVED: tuple[Field, ...] = (STEP, AGGREGATOR_ACCURACY, LOCAL_PHASE, SHIFT, SHIFT_SEVERITY)

_BY_NAME = {name: declared for declared in (*FIELDS, *DERIVED) for name in declared.names()}
RESPONSES: tuple[str, ...] = tuple(name for declared in (*FIELDS, *DERIVED) if declared.response
                                   for name in declared.names())


def field(name: str) -> Field | None:
    """The declared field of a summary key or a derived column; None for a name not declared."""
    return _BY_NAME.get(name)


def unit(name: str) -> str:
    """The unit of a summary key or derived column ('' when not declared)."""
    declared = field(name)
    return declared.unit if declared else ""


def is_response(name: str) -> bool:
    return name in RESPONSES


def shown(group: str) -> list[Field]:
    """The fields `distcnn show` prints in `group`, in the table's order."""
    return [declared for declared in FIELDS if declared.group == group]


def key(name: str) -> str:
    """`name`, checked to be a declared key or column: a consumer that names a figure fails at import, not
    silently, when the figure is renamed."""
    if field(name) is None:
        raise KeyError(f"{name!r} is not a declared field of the run summary (distcnn.summary)")
    return name


_ORDER = tuple(name for declared in FIELDS for name in declared.names())  # summary.json's keys, in order
REQUIRED = tuple(name for declared in FIELDS if not declared.optional for name in declared.names())


def unmeasured() -> dict:
    """Every required figure, null: the start of a summary whose producer measured only what it then sets
    (a CNN-DNN trained in parts, or stopped before anything was scored)."""
    return dict.fromkeys(REQUIRED)


def checked(summary: dict) -> dict:
    """A summary as its producer assembled it, in the declared order; refused when it holds a key not declared
    in FIELDS or lacks a required one (not `optional`). Producers call this last, so a figure cannot reach
    summary.json (and the studies) without a declared unit, nor be left out silently: one not measured is
    there as null."""
    undeclared = [name for name in summary if name not in _ORDER]
    if undeclared:
        raise KeyError(f"summary keys not declared in distcnn.summary.FIELDS: {', '.join(undeclared)}")
    missing = [name for name in REQUIRED if name not in summary]
    if missing:
        raise KeyError(f"summary lacks required fields of distcnn.summary.FIELDS: {', '.join(missing)}")
    return {name: summary[name] for name in _ORDER if name in summary}
