"""The declared run summary (distcnn/summary.py) against what is written and read: the README's table of
summary.json fields, a real run's summary.json, and the study store that must load without torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from distcnn import summary as declared
from distcnn.cli import main


def readme_fields() -> list[str]:
    """The first column of the README's table of summary.json fields (the one whose header starts `| field |`)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| field | type | unit |"))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names.append(re.fullmatch(r"`([^`]+)`", line.strip("|").split("|")[0].strip()).group(1))
    return names


def test_the_readme_lists_exactly_the_declared_fields_in_order():
    assert readme_fields() == [field.name for field in (*declared.FIELDS, *declared.DERIVED)]


def test_names_are_declared_once_and_every_response_has_a_unit_and_a_field():
    names = [name for field in (*declared.FIELDS, *declared.DERIVED) for name in field.names()]
    assert len(names) == len(set(names))
    assert declared.RESPONSES and all(declared.field(name).response for name in declared.RESPONSES)
    assert declared.unit("test_accuracy") == "fraction" and declared.unit("step_forward_s") == "s"
    assert declared.field("shift_noise_s2_accuracy") is declared.SHIFT_SEVERITY
    assert all(field.group in ("", *declared.GROUPS) and bool(field.group) == bool(field.label)
               for field in declared.FIELDS)
    with pytest.raises(KeyError):
        declared.key("test_acuracy")


def test_a_summary_is_refused_with_a_key_not_declared_or_a_required_one_missing():
    complete = declared.unmeasured() | {"test_accuracy": 0.5}
    assert list(declared.checked(dict(reversed(complete.items())))) == list(complete), "the declared order"
    with pytest.raises(KeyError, match="test_acuracy"):
        declared.checked(complete | {"test_acuracy": 0.5})
    del complete["epochs_run"], complete["params"]
    with pytest.raises(KeyError, match="lacks required fields.*epochs_run, params"):
        declared.checked(complete)
    assert "grid" not in declared.REQUIRED and "grid" not in declared.unmeasured()  # optional: a CNN-DNN's only


def test_the_name_lists_it_owns_are_the_ones_the_producers_use():
    from distcnn import shifts
    from distcnn.telemetry import steps

    assert tuple(shifts.SHIFTS) == declared.SHIFT_NAMES and shifts.SEVERITIES == declared.SEVERITIES
    assert steps.PHASES == declared.PHASES


def test_the_study_store_loads_without_torch():
    code = ("import sys, distcnn.study.store, distcnn.summary; "
            "print(sorted(m for m in ('torch', 'kornia', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def check_declared(summary: dict, every: bool) -> None:
    fields = {field.name: field for field in declared.FIELDS}
    assert [key for key in summary if key not in fields] == []
    if every:
        assert [name for name, field in fields.items() if not field.optional and name not in summary] == []
    for key, value in summary.items():
        kind = fields[key].type
        assert value is None or isinstance(value, kind) or (kind is float and type(value) is int), (key, value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("summary") / "run"
    assert main(["train", "--data", "synthetic:n=600", "--train-subset", "300", "--epochs", "1",
                 "--eval-shift", "rotation,noise", "--shift-images", "40", "--target-accuracy", "0.2",
                 "--out", str(out)]) == 0
    return out


def test_a_real_runs_summary_holds_every_declared_field_and_nothing_else(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    check_declared(summary, every=True)
    from distcnn.study.store import flatten_summary

    flat = flatten_summary(summary)
    assert all(declared.field(name) is not None for name in flat)
    assert {"shift_rotation_accuracy", "shift_noise_s3_accuracy", "step_forward_s"} <= set(flat)
