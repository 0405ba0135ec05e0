"""Names are names, never paths: a run or study name cannot put anything outside the folder it belongs in, and a
study file that cannot be read is one clear line. Every refusal is checked through the CLI in this process, run
from a folder deep inside tmp_path, so that anything written where it should not be is seen in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from distcnn.config import check_name, make_config
from distcnn.errors import UsageError
from distcnn.study.runner import plan_runs
from distcnn.study.spec import load_spec, parse_spec
from helpers import TINY_STUDY, stub_training, usage_error, write_study

REFUSED = "must be a name, not a path"


def everything_under(folder: Path) -> set[Path]:
    return set(Path(folder).rglob("*"))


@pytest.fixture
def deep_cwd(tmp_path, monkeypatch) -> Path:
    """The working directory, four folders below tmp_path: '../../../x' from it still lands in tmp_path."""
    cwd = tmp_path / "a" / "b" / "c" / "d"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("name", ["../../../x", "/abs/path", "", "a" * 300, "x/y", "..", ".hidden"],
                         ids=["traversal", "absolute", "empty", "300 chars", "nested", "dotdot", "hidden"])
def test_a_run_name_that_is_a_path_is_refused_and_nothing_is_written(name, tmp_path, deep_cwd, capsys):
    if name == "/abs/path":
        name = str(tmp_path / "abs" / "path")  # where it would land is inside tmp_path, so it would be seen
    before = everything_under(tmp_path)
    line = usage_error(capsys, "train", "--data", "synthetic", "--epochs", "1", "--name", name)
    assert line.startswith(f"distcnn: error: --name: the run name {REFUSED}") and "--out" in line
    assert everything_under(tmp_path) == before, "a refused run writes nothing, in runs/ or anywhere else"


@pytest.mark.parametrize("name", ["baseline", "exp-1.a_b+c", "c00-r1", "A" * 100])
def test_a_normal_run_name_is_kept(name):
    config = make_config({"name": name, "data": "synthetic"})
    assert config.name == config.run_name == name


@pytest.mark.parametrize("model", ["hf-hub:org/x", "timm/vit_tiny_patch16_224.augreg_in21k", "a:b/../../c"])
def test_a_model_name_with_slashes_or_colons_gives_a_safe_default_run_name(model):
    run_name = make_config({"model": model}).run_name
    assert "/" not in run_name and ":" not in run_name and ".." not in run_name
    assert check_name(run_name, "the default run name") == run_name


def test_a_study_name_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, deep_cwd, capsys, monkeypatch):
    calls = stub_training(monkeypatch)  # were it not refused, nothing would train for real
    study = write_study(deep_cwd, TINY_STUDY + 'name = "x/../../../escaped"\n')
    before = everything_under(tmp_path)
    line = usage_error(capsys, "study", study, "--no-report")
    assert line.startswith(f"distcnn: error: study file {study}: [study] name {REFUSED}")
    assert "x/../../../escaped" in line
    assert everything_under(tmp_path) == before and not calls, "nothing run, nothing written, in or outside runs/"


@pytest.mark.parametrize("name", ["/tmp/abs", "", "a" * 101, "..", True, ["x"]])
def test_every_unsafe_study_name_is_one_line(tmp_path, name):
    value = f'"{name}"' if isinstance(name, str) else str(name).lower().replace("'", '"')
    with pytest.raises(UsageError) as error:
        load_spec(write_study(tmp_path, TINY_STUDY + f"name = {value}\n"))
    message = str(error.value)
    assert message.startswith(f"study file {tmp_path / 'tiny.toml'}: [study] name {REFUSED}") and "\n" not in message


@pytest.mark.parametrize("stem, name", [("tiny", "tiny"), ("my study (v2)", "my_study_v2"), ("..hidden", "hidden"),
                                        ("a" * 150, "a" * 100), ("näme", "n_me")])
def test_a_study_without_a_name_is_named_after_its_file_made_safe(tmp_path, stem, name):
    path = tmp_path / f"{stem}.toml"
    path.write_text(TINY_STUDY)
    assert load_spec(path).name == name
    assert parse_spec(TINY_STUDY + 'name = "2024"\n', "x").name == parse_spec(TINY_STUDY + "name = 2024\n", "x").name


def test_the_run_names_of_a_study_are_safe_names(tmp_path):
    spec = parse_spec(TINY_STUDY.replace("replicates = 2", "replicates = 12"), "tiny")
    for run in plan_runs(spec):
        assert check_name(run["run_id"], "a study's run name") == run["run_id"]
        config = spec.run_config(run["levels"], run["seed"], tmp_path / "runs" / run["run_id"], run["run_id"])
        assert config.run_name == run["run_id"]


def test_a_study_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    study = tmp_path / "latin1.toml"
    study.write_bytes(TINY_STUDY.encode() + "# café\n".encode("latin-1"))
    position = len(TINY_STUDY.encode()) + len("# caf")
    line = usage_error(capsys, "study", study, "--out", tmp_path / "out")
    assert line == f"distcnn: error: study file {study} is not UTF-8 text (byte 0xe9 at position {position})"
    assert not (tmp_path / "out").exists()


def test_a_directory_as_study_file_says_so(tmp_path, capsys):
    line = usage_error(capsys, "study", tmp_path, "--out", tmp_path / "out")
    assert line.startswith(f"distcnn: error: study file {tmp_path} is a directory") and "does not exist" not in line
    assert "does not exist" in usage_error(capsys, "study", tmp_path / "nope.toml")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_study_file_is_one_line(tmp_path, capsys, monkeypatch):
    study = write_study(tmp_path)
    original = Path.read_text

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, who runs the tests in CI containers
        if self == study:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    line = usage_error(capsys, "study", study, "--out", tmp_path / "out")
    assert line == f"distcnn: error: study file {study} cannot be read: Permission denied"
    assert not (tmp_path / "out").exists()
