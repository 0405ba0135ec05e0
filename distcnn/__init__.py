"""distcnn: train CNNs with torchrun DDP and measure what each design choice costs.

The Python API does what the command line does, for a notebook or a script:

    from distcnn import train, load_run, run_study, analyze
    summary = train({"data": "synthetic:n=200", "epochs": 1, "out": "runs/tiny"})
    run = load_run("runs/tiny")

Everything heavy (torch, pandas) is imported inside the functions, so `import distcnn` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distcnn.config import TrainConfig

if TYPE_CHECKING:  # only for the annotations: importing them here would pull in torch and pandas
    import pandas as pd

    from distcnn.study.analysis import Analyses
    from distcnn.study.spec import StudySpec

__version__ = "0.1.0"
__all__ = ["TrainConfig", "Run", "train", "load_run", "run_study", "analyze", "__version__"]


def train(config: TrainConfig | dict[str, Any]) -> dict | None:
    """Run one training as `distcnn train` does; options as a dict take the flag names, with - or _.
    The summary; None only with prepare_only or on a node that does not see rank 0's summary."""
    from distcnn.config import make_config
    from distcnn.launch import run

    return run(config if isinstance(config, TrainConfig) else make_config(config))


@dataclass(frozen=True)
class Run:
    """A run directory as read back: what it was asked to do, what it measured per epoch and in the end."""

    dir: Path
    config: dict
    summary: dict | None  # None while the run is unfinished (interrupted, or still training)
    epochs: list[dict] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.summary is not None


def load_run(run_dir: str | Path) -> Run:
    """A run's record (config.json, epochs.csv, summary.json), epoch figures as numbers."""
    from distcnn.errors import UsageError
    from distcnn.record import CONFIG, RunRecord

    record = RunRecord(run_dir)
    if not record.path(CONFIG).is_file():
        raise UsageError(f"not a run directory: no {CONFIG} in {run_dir}")
    return Run(record.dir, record.read_config(), record.read_summary() if record.finished else None,
               record.read_epochs())


def run_study(study: str | Path | StudySpec, out: str | Path, retries: int = 1) -> list[dict]:
    """Run (or resume) a study file or spec into `out` as `distcnn study` does, without its report; every
    run of the study as the database holds it (status, levels, seed, summary, error)."""
    from distcnn.study.runner import run_study as run
    from distcnn.study.spec import StudySpec, load_spec

    return run(study if isinstance(study, StudySpec) else load_spec(study), Path(out), retries)


def analyze(source: str | Path | pd.DataFrame, factors: list[str] | None = None,
            responses: list[str] | None = None, alpha: float = 0.05) -> Analyses:
    """Each response's allocation of variation (or ANOVA), as `distcnn analyze` computes it. A study directory
    supplies its own factors and responses; a CSV/Parquet file or a DataFrame needs both."""
    import pandas as pd

    from distcnn.study.analysis import analyse_responses
    from distcnn.study.analysis_command import load_source, require_names, study_responses

    if isinstance(source, pd.DataFrame):
        table, level_order = source, {}
    else:
        table, level_order = load_source(source)
    study = not isinstance(source, pd.DataFrame) and Path(source).is_dir()
    require_names(study, factors, responses, called=("factors", "responses"))
    if responses is None:
        responses = study_responses(source)
    return analyse_responses(table, list(factors or level_order), list(responses), level_order, alpha)
