"""A study file (TOML): the options every run shares, the factors and their levels, replicates, responses.

    [base]                       # options every run shares (the flag names of `distcnn train`, no `--`)
    epochs = 2
    [factors]                    # each factor: a list of levels; any run option can be a factor
    policy = ["none", "paper"]
    model = ["simplecnn", "deepcnn"]
    [study]
    replicates = 3               # repeats with different seeds
    responses = ["test_accuracy", "cpu_percent_mean"]
    design = "full"              # or "2k": two levels per factor, signs -/+ by order
    executor = "local"           # or "slurm": each run a Slurm job (the [slurm] table: distcnn/study/slurm.py)
    parallel = 1                 # local: runs at once on this machine, on disjoint GPUs or cores

Everything is checked here, before anything runs; a mistake is one line naming the option.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from distcnn.config import TrainConfig, check_name, flag, make_config, slug
from distcnn.errors import UsageError, nearest
from distcnn.study import slurm
from distcnn.study.store import KNOWN_RESPONSES, is_known_response

SECTIONS = ("base", "factors", "study", "slurm")
STUDY_KEYS = ("replicates", "responses", "design", "seed", "name", "executor", "parallel")
EXECUTORS = ("local", "slurm")
DESIGNS = ("full", "2k")
SET_BY_THE_STUDY = ("out", "resume", "name", "seed")  # each run's directory, name and replicate seed
DEFAULT_RESPONSES = ["test_accuracy", "train_seconds", "cpu_percent_mean", "mem_percent_mean",
                     "net_packets_per_s_mean"]


@dataclass(frozen=True)
class StudySpec:
    name: str
    base: dict[str, Any]
    factors: dict[str, list]  # option field name -> its levels, in the order given (first level = "-")
    replicates: int = 1
    responses: list[str] = field(default_factory=lambda: list(DEFAULT_RESPONSES))
    design: str = "full"
    seed: int = 0
    # How the runs are executed, not what they compute: not part of the study's identity (as_dict), so a study
    # started here can go on through Slurm, or with more runs at once.
    executor: str = "local"
    parallel: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)

    def configurations(self) -> list[dict[str, Any]]:
        """Every combination of factor levels, in the order of the factors and of their levels."""
        names = list(self.factors)
        return [dict(zip(names, levels)) for levels in itertools.product(*self.factors.values())]

    def run_config(self, levels: dict[str, Any], seed: int, out: Path, name: str) -> TrainConfig:
        return make_config(self.options(levels) | {"seed": seed, "out": str(out), "name": name, "resume": True})

    def options(self, levels: dict[str, Any]) -> dict[str, Any]:
        """A configuration's run options; under Slurm a multi-node run meets at its job's first node."""
        options = self.base | levels
        return slurm.with_endpoint(options) if self.executor == "slurm" else options

    def as_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "factors": self.factors, "replicates": self.replicates,
                "responses": self.responses, "design": self.design, "seed": self.seed}


def default_study_text() -> str:
    return resources.files("distcnn.study").joinpath("default.toml").read_text(encoding="utf-8")


def load_spec(path: str | Path | None, execution: dict | None = None) -> StudySpec:
    """The study in FILE, or the built-in default study when no file is given. `execution`: what the command
    line sets over the file's [study] executor/parallel and [slurm] (keys executor, parallel, slurm)."""
    if path is None:
        return parse_spec(default_study_text(), "default", execution=execution)
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"study file {path} is a directory; give a .toml file")
    if not path.exists():
        raise UsageError(f"study file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"study file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"study file {path} is not UTF-8 text "
                         f"(byte 0x{error.object[error.start]:02x} at position {error.start})") from None
    except OSError as error:
        raise UsageError(f"study file {path} cannot be read: {error.strerror or error}") from None
    return parse_spec(text, default_name(path), source=f"study file {path}", execution=execution)


def default_name(path: Path) -> str:
    """A study without [study] name is named after its file; a stem that is no safe name becomes one."""
    try:
        return check_name(path.stem, "the file name")
    except ValueError:
        return slug(path.stem)


def _option_name(key: str, where: str) -> str:
    """`nproc-per-node` or `nproc_per_node` -> the TrainConfig field; an unknown one is a UsageError."""
    name = key.replace("-", "_")
    if name not in TrainConfig.model_fields:
        options = [flag(f)[2:] for f in TrainConfig.model_fields]
        raise UsageError(f"{where}: unknown option {key!r}{nearest(key.replace('_', '-'), options)}")
    if name in SET_BY_THE_STUDY:
        extra = " (set [study] seed; replicates get seeds from it)" if name == "seed" else ""
        raise UsageError(f"{where}: {key!r} is set by the study for each run{extra}")
    return name


def parse_spec(text: str, default_name: str, source: str = "the study", execution: dict | None = None) -> StudySpec:
    """`source` names where `text` came from in an error line (`study file X`)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{source} is not valid TOML: {error}") from None
    for section in document:
        if section not in SECTIONS:
            raise UsageError(f"unknown section [{section}]{nearest(section, SECTIONS)} (allowed: {', '.join(SECTIONS)})")
    for section in SECTIONS:
        if section in document and not isinstance(document[section], dict):
            raise UsageError(f"[{section}] must be a table of key = value lines")
    base = {_option_name(k, "[base]"): v for k, v in document.get("base", {}).items()}
    factors = {}
    for key, levels in document.get("factors", {}).items():
        name = _option_name(key, "[factors]")
        if not isinstance(levels, list) or not levels:
            raise UsageError(f"[factors] {key}: give a non-empty list of levels, e.g. {key} = [\"a\", \"b\"]")
        if len(set(map(repr, levels))) != len(levels):
            raise UsageError(f"[factors] {key}: a level is listed twice: {levels}")
        factors[name] = levels
    if not factors:
        raise UsageError("the study has no [factors]: give at least one option with a list of levels")
    overlap = sorted(set(base) & set(factors))
    if overlap:
        raise UsageError(f"{flag(overlap[0])[2:]!r} is both in [base] and a factor; keep it in one place")
    study = document.get("study", {})
    for key in study:
        if key not in STUDY_KEYS:
            raise UsageError(f"[study]: unknown key {key!r}{nearest(key, STUDY_KEYS)} (allowed: {', '.join(STUDY_KEYS)})")
    execution = execution or {}
    spec = StudySpec(
        name=_name(study.get("name", default_name), source),
        base=base,
        factors=factors,
        replicates=_positive_int(study.get("replicates", 1), "replicates"),
        responses=_responses(study.get("responses", DEFAULT_RESPONSES)),
        design=_design(study.get("design", "full")),
        seed=_int(study.get("seed", 0), "seed"),
        executor=_executor(execution.get("executor") or study.get("executor", "local")),
        parallel=_positive_int(execution.get("parallel") or study.get("parallel", 1), "parallel"),
        slurm=slurm.parse_options(document.get("slurm", {})) | slurm.parse_options(execution.get("slurm", {}),
                                                                                  "slurm option"),
    )
    if spec.executor == "slurm" and spec.parallel > 1:
        raise UsageError("parallel is for the local executor; under Slurm every run is a job of its own and "
                         "the cluster runs as many at once as it has room for")
    if spec.design == "2k":
        for name, levels in factors.items():
            if len(levels) != 2:
                raise UsageError(f"design \"2k\" needs two levels per factor; {flag(name)[2:]} has {len(levels)}: "
                                 f"{levels}")
    for levels in spec.configurations():  # every option value checked before anything runs
        make_config(spec.options(levels))
    return spec


def _executor(value) -> str:
    if value not in EXECUTORS:
        raise UsageError(f"[study] executor {value!r} is not one of {', '.join(EXECUTORS)}"
                         f"{nearest(str(value), EXECUTORS)}")
    return value


def _name(value, source: str) -> str:
    """The study's folder is runs/study-<name> by default: a name, never a path."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # name = 2024
    try:
        return check_name(value, "[study] name")
    except ValueError as error:
        raise UsageError(f"{source}: {error} (got {value!r})") from None


def _int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"[study] {key} must be an integer, got {value!r}")
    return value


def _positive_int(value, key: str) -> int:
    if _int(value, key) < 1:
        raise UsageError(f"[study] {key} must be at least 1, got {value}")
    return value


def _design(value) -> str:
    if value not in DESIGNS:
        raise UsageError(f"[study] design {value!r} is not one of {', '.join(DESIGNS)}{nearest(str(value), DESIGNS)}")
    return value


def _responses(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UsageError("[study] responses: give a non-empty list of summary figures, e.g. [\"test_accuracy\"]")
    for response in value:
        if not is_known_response(response):
            raise UsageError(f"[study] unknown response {response!r}{nearest(str(response), KNOWN_RESPONSES)}")
    return list(value)
