"""Image folders reached through symbolic links: nothing lost, nothing counted twice.

A link back up the tree once turned 40 images into 18,040 "files", the same images in train, validation and
test; two such links never finished scanning. Each real folder and image is now taken once, a broken link to an
image is one line, and a class with no held-out images is named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import make_imagefolder, usage_error

from distcnn.data import folder_scan, load_data
from distcnn.errors import UsageError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test writes into the user's ~/.cache; no test is a non-first rank unless it says so."""
    monkeypatch.setenv("DISTCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANK", raising=False)


def tiny(root: Path, splits: bool = False) -> Path:
    """Two classes of four 8-px images (with splits: four train, two val, two test per class)."""
    return make_imagefolder(root, classes=2, per_class=4, size=8, splits=splits)


def identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def real_images(root: Path) -> set[tuple[int, int]]:
    """The real image files under `root` (device, inode), found without following any link."""
    return {identity(Path(here, name)) for here, _, names in os.walk(root) for name in names
            if name.endswith(".png") and not Path(here, name).is_symlink()}


def assert_each_image_once(folder: folder_scan.Folder, real: set[tuple[int, int]]) -> None:
    """Every real image scanned, exactly once, in exactly one of train / val / test."""
    everywhere = [identity(folder.files[i]) for rows in folder.parts.values() for i in rows.tolist()]
    assert len(everywhere) == len(folder.files) == len(real)
    assert set(everywhere) == real


# ---------------------------------------------------------------------------------------------- loops


def test_a_link_back_up_the_tree_is_scanned_once(tmp_path, capsys):
    root = tiny(tmp_path / "flat")
    (root / "class0" / "up").symlink_to("..")
    folder = folder_scan.scan(root)
    assert_each_image_once(folder, real_images(root))
    assert len(folder.files) == 8 and "same file" not in capsys.readouterr().out

    data = load_data(f"imagefolder:{root}", val_fraction=0.25)  # the cut by seed: 8 images, each in one set
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)


def test_two_loops_finish_and_count_right(tmp_path):
    root = tiny(tmp_path / "loops")
    (root / "class0" / "up").symlink_to("..")
    (root / "class1" / "deep").mkdir()
    (root / "class1" / "deep" / "back").symlink_to("../..")
    (root / "class1" / "deep" / "sideways").symlink_to("../../class0")
    (root / "class1" / "self").symlink_to(".")
    assert_each_image_once(folder_scan.scan(root), real_images(root))


def test_split_layout_loops_do_not_leak_between_splits(tmp_path):
    root = tiny(tmp_path / "split", splits=True)
    (root / "train" / "class0" / "up").symlink_to("../..")  # the whole tree again, val/ and test/ with it
    (root / "test" / "class1" / "peek").symlink_to("../../train/class1")  # train's images inside test/
    (root / "val" / "class1" / "loop").symlink_to("../../val")
    folder = folder_scan.scan(root)
    assert_each_image_once(folder, real_images(root))
    assert {role: len(rows) for role, rows in folder.parts.items()} == {"train": 8, "val": 4, "test": 4}


def test_a_split_or_class_folder_linked_to_another_is_refused(tmp_path):
    root = tiny(tmp_path / "split", splits=True)
    for name in ("class0", "class1"):
        for image in (root / "test" / name).iterdir():
            image.unlink()
        (root / "test" / name).rmdir()
    (root / "test" / "class1").symlink_to("../train/class1")
    message = str(pytest.raises(UsageError, folder_scan.scan, root).value)
    assert "test/class1" in message and "train/class1" in message and "same folder" in message


# ---------------------------------------------------------------------------------------------- linked images


def test_an_image_linked_twice_is_taken_once(tmp_path, capsys):
    root = tiny(tmp_path / "split", splits=True)
    (root / "train" / "class1" / "again.png").symlink_to("img0000.png")
    (root / "test" / "class0" / "leak.png").symlink_to("../../train/class0/img0001.png")
    os.link(root / "train" / "class0" / "img0002.png", root / "val" / "class0" / "hard.png")
    folder = folder_scan.scan(root)
    assert_each_image_once(folder, real_images(root))
    assert {role: len(rows) for role, rows in folder.parts.items()} == {"train": 8, "val": 4, "test": 4}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "3 image(s)" in lines[0] and "same file" in lines[0], lines


def test_a_linked_image_counts_like_a_real_one(tmp_path):
    elsewhere = tiny(tmp_path / "elsewhere")
    root = tiny(tmp_path / "root")
    (root / "class0" / "linked.png").symlink_to(elsewhere / "class1" / "img0000.png")
    folder = folder_scan.scan(root)
    assert len(folder.files) == 9 and folder.labels.tolist().count(0) == 5


# ---------------------------------------------------------------------------------------------- broken links


def test_a_broken_image_link_is_one_line_naming_it(tmp_path, capsys):
    root = tiny(tmp_path / "broken")
    link = root / "class1" / "gone.png"
    link.symlink_to("nowhere.png")
    message = str(pytest.raises(UsageError, folder_scan.scan, root).value)
    assert f"broken link {link} -> nowhere.png" in message and "does not exist" in message

    line = usage_error(capsys, "train", "--data", f"imagefolder:{root}", "--out", tmp_path / "run")
    assert str(link) in line and "broken link" in line
    assert not (tmp_path / "run").exists()


def test_a_broken_link_to_no_image_is_skipped(tmp_path):
    root = tiny(tmp_path / "notes")
    (root / "class0" / "README").symlink_to("missing.txt")
    (root / "class1" / "old-folder").symlink_to("missing")
    assert len(folder_scan.scan(root).files) == 8


def test_an_unreadable_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    root = tiny(tmp_path / "locked")
    locked = root / "class1" / "locked"
    locked.mkdir()
    scandir = os.scandir

    def denied(path):  # chmod does not stop root, so the refusal is simulated
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(folder_scan.os, "scandir", denied)
    message = str(pytest.raises(UsageError, folder_scan.scan, root).value)
    assert str(locked) in message and "Permission denied" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- held-out classes


def test_a_class_without_test_images_is_named(tmp_path, capsys, monkeypatch):
    root = make_imagefolder(tmp_path / "split", classes=3, per_class=4, size=8, splits=True)
    folder_scan.scan(root)
    assert capsys.readouterr().out == ""  # every class in every split: nothing to say

    for image in (root / "test" / "class2").iterdir():
        image.unlink()
    (root / "test" / "class2").rmdir()  # absent
    for image in (root / "test" / "class1").iterdir():
        image.unlink()  # present but empty
    folder = folder_scan.scan(root)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:"), lines
    assert "class1, class2" in lines[0] and str(root / "test") in lines[0] and "class0" not in lines[0]
    assert len(folder.parts["test"]) == 2 and len(folder.parts["train"]) == 12

    monkeypatch.setenv("RANK", "1")  # the other ranks scan too, but stay quiet
    folder_scan.scan(root)
    assert capsys.readouterr().out == ""


def test_a_test_folder_without_any_image_is_refused(tmp_path):
    root = tiny(tmp_path / "split", splits=True)
    for image in (root / "test").glob("*/*.png"):
        image.unlink()
    assert "has class folders but no images" in str(pytest.raises(UsageError, folder_scan.scan, root).value)
