"""Image folders, scanned: one subfolder per class, optionally inside ``train/`` ``val/`` ``test/`` split folders.

The scan finds every class and image file and checks the layout; it decodes nothing (distcnn.data.image_cache
does). Links are followed, and each real folder and image is taken once: a link back up the tree, or two paths
to one file, add nothing. A broken link to an image, an unreadable folder, a lone class or a held-out class
with no training counterpart is one line (UsageError).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import torch

from distcnn.console import say
from distcnn.errors import UsageError, nearest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Folder:
    """What a directory scan finds: every image file with its class, and the rows of each split folder."""

    root: Path
    classes: list[str]
    files: list[Path]  # train files, then val files, then test files; classes sorted, files sorted
    labels: torch.Tensor
    parts: dict[str, torch.Tensor]  # "train" always; "val" / "test" when the folder has them


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def cannot_scan(path: Path | str, err: OSError) -> UsageError:
    return UsageError(f"imagefolder: cannot read {path} ({err.strerror or one_line(err)}); fix or remove it")


def broken_link(path: str, err: OSError) -> UsageError:
    why = "the file it points to does not exist" if isinstance(err, FileNotFoundError) else err.strerror
    return UsageError(f"imagefolder: broken link {path} -> {os.readlink(path)} ({why}); fix the link or remove it")


def note(message: str) -> None:
    """One line from the first rank only: every rank scans the folder, the reader needs to hear it once."""
    if os.environ.get("RANK", "0") == "0":
        say(message)


def listing(folder: Path) -> tuple[list, list]:
    """(subfolders, image files) of one folder with their stats (links followed), by name, hidden names skipped."""
    try:
        with os.scandir(folder) as scan_it:
            entries = sorted((e for e in scan_it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise cannot_scan(folder, err) from None
    subfolders, images = [], []
    for entry in entries:
        image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
        try:
            stat = entry.stat()
        except OSError as err:
            if not entry.is_symlink():
                raise cannot_scan(entry.path, err) from None
            if image:
                raise broken_link(entry.path, err) from None
            continue  # a broken link to something other than an image: no image is lost
        if S_ISDIR(stat.st_mode):
            subfolders.append((Path(entry.path), stat))
        elif image and S_ISREG(stat.st_mode):
            images.append((Path(entry.path), stat))
    return subfolders, images


class Walk:
    """One scan of a tree. Links are followed, but each real folder and each real file (device, inode) is taken
    once: a link back up the tree would repeat the whole tree without end, and a second link to a folder or an
    image would put the same image in two places, train and test among them."""

    def __init__(self) -> None:
        self.folders: dict[tuple[int, int], Path] = {}
        self.files: dict[tuple[int, int], Path] = {}
        self.repeats: list[tuple[Path, Path]] = []  # (a path not taken, the path its image was taken by)

    def enter(self, folder: Path, stat: os.stat_result) -> Path | None:
        """None the first time a real folder is entered; later, the path it was first entered by."""
        first = self.folders.setdefault((stat.st_dev, stat.st_ino), folder)
        return None if first is folder else first

    def images(self, folder: Path) -> list[Path]:
        """The image files below an entered folder, at any depth, in os.walk's top-down order."""
        found, stack = [], [folder]
        while stack:
            subfolders, images = listing(stack.pop())
            for path, stat in images:
                first = self.files.setdefault((stat.st_dev, stat.st_ino), path)
                found.append(path) if first is path else self.repeats.append((path, first))
            stack += reversed([path for path, stat in subfolders if self.enter(path, stat) is None])
        return found


def class_folders(walk: Walk, folder: Path, held_out: bool) -> dict[str, list[Path]]:
    """Class name → its image files; UsageError for no class folders or an empty one (allowed when held out)."""
    subfolders, loose = listing(folder)
    if not subfolders:
        found = f"found {len(loose)} images but no class folders" if loose else "no class folders"
        raise UsageError(f"{found} in {folder}; imagefolder:PATH needs one subfolder per class "
                         "(or train/ val/ test/ subfolders, each with one subfolder per class)")
    classes = {}
    for sub, stat in subfolders:
        if (first := walk.enter(sub, stat)) is not None:
            raise UsageError(f"class folder {sub} is the same folder as {first} (a link leads there); "
                             "keep one, so that each image has one class and one split")
        classes[sub.name] = files = walk.images(sub)
        if not files and not held_out:
            raise UsageError(f"class folder {sub} has no images ({' '.join(IMAGE_EXTENSIONS)}); add some or remove it")
    if held_out and not any(classes.values()):
        raise UsageError(f"{folder} has class folders but no images; add images or remove it")
    return classes


def split_folders(walk: Walk, root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by role ("train", "val", "test"); empty when it has none."""
    found: dict[str, Path] = {}
    for sub, stat in listing(root)[0]:
        role = SPLIT_FOLDERS.get(sub.name.lower())
        if role is None:
            continue
        if role in found:
            raise UsageError(f"{root} has two {role} folders ({found[role].name}/ and {sub.name}/); keep one")
        if (first := walk.enter(sub, stat)) is not None:
            raise UsageError(f"{sub} is the same folder as {first} (a link leads there); give each split its own")
        found[role] = sub
    if found and "train" not in found:
        names = ", ".join(f"{p.name}/" for p in found.values())
        raise UsageError(f"{root} has {names} but no train/ folder; add train/ with one subfolder per class")
    return found


def scan(root: Path) -> Folder:
    """Find classes and files, checking the layout; decodes nothing."""
    try:
        stat = root.stat()
    except FileNotFoundError:
        raise UsageError(f"imagefolder path {root} does not exist") from None
    except OSError as err:
        raise cannot_scan(root, err) from None
    if not S_ISDIR(stat.st_mode):
        raise UsageError(f"imagefolder path {root} is not a directory; give a folder with one subfolder per class")
    walk = Walk()
    walk.enter(root, stat)
    splits = split_folders(walk, root)
    order = [role for role in ("train", "val", "test") if role in splits]  # train first: it keeps a repeat
    per_part = {role: class_folders(walk, splits[role], role != "train") for role in order}
    if not per_part:
        per_part = {"train": class_folders(walk, root, held_out=False)}

    classes = sorted(per_part["train"])
    if len(classes) < 2:
        where = splits["train"] if splits else root
        raise UsageError(f"only one class folder ({classes[0]!r}) in {where}; a classifier needs at least two")
    for role in ("val", "test"):
        for name in per_part.get(role, {}):
            if name not in classes:
                raise UsageError(f"class folder {splits[role] / name} has no counterpart in {splits['train']}"
                                 f"{nearest(name, classes)}; rename it or remove it")
        if missing := [name for name in classes if role in per_part and not per_part[role].get(name)]:
            note(f"warning: imagefolder: {splits[role]} has no images of class {', '.join(missing)}; "
                 f"the {role} accuracy says nothing about {'them' if len(missing) > 1 else 'it'}")
    if walk.repeats:
        note(f"imagefolder: {len(walk.repeats)} image(s) reached by a second path were taken once "
             "(e.g. {} is the same file as {})".format(*walk.repeats[0]))

    files, labels, parts = [], [], {}
    for role in per_part:
        start = len(files)
        for label, name in enumerate(classes):
            members = per_part[role].get(name, [])
            files += members
            labels += [label] * len(members)
        parts[role] = torch.arange(start, len(files))
    return Folder(root, classes, files, torch.tensor(labels, dtype=torch.int64), parts)
