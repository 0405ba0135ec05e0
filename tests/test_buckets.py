"""--bucket-cap-mb: checked at the edge, a study factor like any option, recorded in config.json, summary.json
and gradients.json, and really DDP's bucket size: the counted comm hook makes one allreduce per bucket, so a
small cap shows as several collectives per step where DDP's default makes one."""

from __future__ import annotations

import csv
import json

import pytest

from distcnn.config import make_config
from distcnn.errors import UsageError
from distcnn.study.spec import parse_spec
from helpers import TINY_STUDY, read_summary, run_cli, usage_error

BUCKETS_STUDY = TINY_STUDY.replace('model = ["lenet", "simplecnn"]', "bucket_cap_mb = [1, 25]")


def epochs(run_dir) -> list[dict]:
    with open(run_dir / "epochs.csv") as handle:
        return list(csv.DictReader(handle))


def test_the_bucket_size_is_a_positive_number_or_ddps_default():
    assert make_config({}).bucket_cap_mb is None, "default: DDP's own buckets"
    assert make_config({"bucket-cap-mb": "5"}).bucket_cap_mb == 5.0  # as the CLI hands it over: text
    for bad in ("0", "-1", "inf", "many"):
        with pytest.raises(UsageError) as error:
            make_config({"bucket_cap_mb": bad})
        assert str(error.value).startswith("--bucket-cap-mb:") and "\n" not in str(error.value), bad


def test_a_bad_bucket_size_on_the_command_line_is_one_line(capsys, tmp_path):
    line = usage_error(capsys, "train", "--bucket-cap-mb", "0", "--out", tmp_path / "run")
    assert "--bucket-cap-mb" in line and "greater than 0" in line
    assert not (tmp_path / "run").exists()


def test_a_study_may_take_the_bucket_size_as_a_factor(tmp_path):
    spec = parse_spec(BUCKETS_STUDY, "buckets")
    assert spec.factors == {"policy": ["none", "flip-crop"], "bucket_cap_mb": [1, 25]}
    configs = [spec.run_config(levels, 0, tmp_path / "run", "run") for levels in spec.configurations()]
    assert sorted({config.bucket_cap_mb for config in configs}) == [1.0, 25.0]
    with pytest.raises(UsageError) as error:
        parse_spec(BUCKETS_STUDY.replace("[1, 25]", "[0, 25]"), "buckets")
    assert "--bucket-cap-mb" in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def small_buckets(tmp_path_factory):
    """A real 2-rank lenet run (246,824 gradient bytes) with 0.01 MB buckets: (run directory, summary)."""
    out = tmp_path_factory.mktemp("buckets") / "run"
    result = run_cli("train", "--data", "synthetic:n=400", "--model", "lenet", "--nproc-per-node", "2",
                     "--epochs", "2", "--batch-size", "32", "--sample-interval", "0.1", "--bucket-cap-mb", "0.01",
                     "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, read_summary(out)


@pytest.mark.slow
def test_ddp_gets_the_bucket_size_and_records_it(small_buckets, two_rank_run):
    out, summary = small_buckets
    assert json.loads((out / "config.json").read_text())["bucket_cap_mb"] == 0.01
    assert summary["bucket_cap_mb"] == 0.01 and summary["world_size"] == 2
    gradients = json.loads((out / "gradients.json").read_text())
    assert gradients["bucket_cap_mb"] == 0.01 and gradients["world_size"] == 2
    first, second = (float(row["comm_calls_per_step"]) for row in epochs(out))
    params = len(gradients["parameters"])
    assert 1 < second <= params, "0.01 MB buckets: several allreduces per step, at most one per parameter"
    assert first < second, "step 1 runs on DDP's initial single bucket; it rebuilds them after it"
    for row in epochs(out):  # bucketing changes how many collectives, not how many bytes
        assert int(row["comm_bytes"]) == int(row["steps"]) * 2 * summary["gradient_bytes"]
    default_out, default = two_rank_run  # simplecnn's 634,024 bytes fit DDP's default first bucket (1 MB)
    assert default["bucket_cap_mb"] is None
    assert [float(row["comm_calls_per_step"]) for row in epochs(default_out)] == [1.0, 1.0]
