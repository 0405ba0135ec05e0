"""Where a study's numbers come from: the study file it ran (the spec study.db recorded, written back as TOML
that `distcnn study` reads as the same study) and the environment (library versions, host, CPU model, the git
commit), as the runs recorded it; what they did not record is looked up when the report is written and marked so.
"""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path

from distcnn.errors import UsageError
from distcnn.record import ENVIRONMENT, cpu_model, git_commit, read_object
from distcnn.study.document import Code, Heading, Table, Text
from distcnn.study.report.common import Study, plain
from distcnn.study.store import option_name

ANALYSIS_LIBRARIES = ("numpy", "pandas", "scipy", "statsmodels", "matplotlib")
AT_REPORT_TIME = " (at report time)"


# ---- the study file ----------------------------------------------------------------------------------------

def toml_value(value) -> str:
    """A TOML value: strings quoted (JSON's escapes are TOML's), numbers, booleans, arrays of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # str, int, float


def _key(name: str) -> str:
    return name if all(c.isalnum() or c in "-_" for c in name) else json.dumps(name)


def study_text(spec: dict) -> str:
    """The study file of `spec` (study.db's record of it): [base], [factors] and [study], keys as written."""
    lines = ["[base]"]
    lines += [f"{_key(option_name(key))} = {toml_value(value)}" for key, value in spec.get("base", {}).items()
              if value is not None]
    lines += ["", "[factors]"]
    lines += [f"{_key(option_name(key))} = {toml_value(levels)}" for key, levels in spec.get("factors", {}).items()]
    lines += ["", "[study]"]
    lines += [f"{key} = {toml_value(spec[key])}" for key in ("name", "replicates", "design", "responses", "seed")
              if spec.get(key) is not None]
    return "\n".join(lines) + "\n"


def study_file_section(study: Study) -> list:
    return [Heading("Study file"), Text(
        f"The study as {study.directory / 'study.db'} recorded it, written back as the TOML file it was read "
        f"from (comments and key order aside, distcnn study reads it as the same study):"),
        Code(study_text(study.spec), "toml")]


# ---- the environment ---------------------------------------------------------------------------------------

def _environments(study: Study) -> dict[str, tuple[Path, dict]]:
    found = {}
    for _, row in study.table.iterrows():
        try:
            environment = read_object(study.run_dir(row) / ENVIRONMENT)
        except UsageError:
            environment = None
        if environment:
            found[row["run_id"]] = (study.run_dir(row) / ENVIRONMENT, environment)
    return found


def environment_section(study: Study) -> list:
    blocks = [Heading("Environment")]
    environments = _environments(study)
    if not environments:
        path = study.run_dir(study.table.iloc[0]) / ENVIRONMENT
        return blocks + [Text(f"No run recorded its environment (e.g. {path} is missing or unreadable).")]
    first_id, (path, environment) = next(iter(environments.items()))
    rows = [[key, plain(value)] for key, value in environment.items()]
    commit = environment.get("git_commit")
    rows.insert(0, ["git commit", plain(commit) if commit else (git_commit() or "unavailable") + AT_REPORT_TIME])
    model = environment.get("cpu_model")
    rows.insert(1, ["CPU model", plain(model) if model else
                    f"{cpu_model() or 'unavailable'}{AT_REPORT_TIME}, on {platform.node()}"])
    for name in ANALYSIS_LIBRARIES:
        try:
            rows.append([f"{name} (analysis)", metadata.version(name) + AT_REPORT_TIME])
        except metadata.PackageNotFoundError:
            continue
    differ = sorted({key for _, other in environments.values() for key in set(other) | set(environment)
                     if other.get(key) != environment.get(key)})
    same = (f"The runs differ in: {', '.join(differ)}." if differ else
            f"All {len(environments)} runs recorded the same environment.")
    blocks.append(Text(f"As recorded by run {first_id} ({path}); figures marked 'at report time' were not "
                       f"recorded by the run and are this machine's now. {same}"))
    return blocks + [Table(["figure", "value"], rows)]
