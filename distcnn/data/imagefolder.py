"""Image folders: one subfolder per class, optionally inside ``train/`` ``val/`` ``test/`` split folders.

Images are decoded once, in parallel threads (PIL releases the GIL while decoding and resizing), resized to a
square and stored as one uint8 array in a cache folder. Later loads memory-map that file, so several ranks on one
machine share one copy in the page cache instead of decoding and holding their own.

Cache layout (``cache_folder``): ``decoded-<key>.npy`` holds every image in file order; the key hashes the file
paths, sizes and modification times and the requested image size, so an edited, added or removed image gives a
new key (the number of channels is derived from the files, so it is covered by the same key). When the chosen
split is not already a contiguous run of rows (any split cut by seed), ``split-<key>.npy`` holds the rows
rearranged as train | val | test, so each set is a plain slice of a memory map and still shared, not copied.
Files are written to a temporary name and renamed into place, and a lock keeps ranks that start together from
decoding the same folder twice. Delete the folder at any time to reclaim the space.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np
import torch
from PIL import Image

from distcnn.console import say
from distcnn.data.splits import Pool
from distcnn.errors import UsageError, nearest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
MAX_AUTO_SIZE = 224  # default image_size: the most common shorter side, but no more than this
CACHE_VERSION = "distcnn-imagefolder-1"  # bump when decoding changes, so old caches are not reused
COPY_CHUNK = 1024  # rows copied at a time when rearranging a cache


@dataclass
class Folder:
    """What a directory scan finds: every image file with its class, and the rows of each split folder."""

    root: Path
    classes: list[str]
    files: list[Path]  # train files, then val files, then test files; classes sorted, files sorted
    labels: torch.Tensor
    parts: dict[str, torch.Tensor]  # "train" always; "val" / "test" when the folder has them


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$DISTCNN_CACHE/imagefolder``, else ``~/.cache/distcnn/imagefolder``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("DISTCNN_CACHE") or Path.home() / ".cache" / "distcnn"
    return Path(root).expanduser() / "imagefolder"


# ---------------------------------------------------------------------------------------------- scanning


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


# ---------------------------------------------------------------------------------------------- decoding


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def unreadable(path: Path, err: BaseException) -> UsageError:
    return UsageError(f"cannot read image {path}: {one_line(err)}; fix or remove the file")


def parallel(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` in threads; on the first error the queued rest is cancelled."""
    workers = min(32, len(os.sched_getaffinity(0)) + 4) if hasattr(os, "sched_getaffinity") else 8
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def probe(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and PIL mode from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except Exception as err:  # PIL raises many types for a bad file; each means "unreadable"
        raise unreadable(path, err) from None


def shape_of(files: Sequence[Path], image_size: int | None) -> tuple[int, int]:
    """(channels, image_size): 1 channel if every image is grayscale, else 3; the default size is the most
    common shorter side, capped at MAX_AUTO_SIZE, so typical images are cropped, not stretched."""
    headers = parallel(probe, files)
    channels = 1 if all(mode in GRAYSCALE_MODES for _, mode in headers) else 3
    if image_size is None:
        common_side = Counter(min(size) for size, _ in headers).most_common(1)[0][0]
        image_size = min(common_side, MAX_AUTO_SIZE)
        if image_size < 4:
            raise UsageError(f"the images in {files[0].parent.parent} are only {image_size} px; pass an image_size")
    return channels, image_size


def to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """An "L" or "RGB" image. 16-bit grayscale is scaled to 8 bits (PIL's own conversion would clip it);
    palette images go through RGBA so transparency is honoured; alpha is dropped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            values = values * 255 if values.max(initial=0) <= 1 else values
        elif img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


def decode_image(path: Path, channels: int, size: int) -> np.ndarray:
    """(channels, size, size) uint8: the centred square of the image, resized with PIL's antialiased
    bilinear filter (the same as resizing the shorter side, then centre-cropping)."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(None, (size, size))  # let libjpeg decode at 1/2, 1/4, 1/8 while still >= size
            img = to_8bit(img, channels)
            width, height = img.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            square = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
            pixels = np.asarray(square)
    except Exception as err:  # PIL raises many types for a bad file; each means "unreadable"
        raise unreadable(path, err) from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_into(out: np.ndarray, files: Sequence[Path]) -> None:
    """Decode every file into its row of ``out`` (N, C, S, S), in parallel."""
    channels, size = out.shape[1], out.shape[2]

    def decode_row(row: int) -> None:
        out[row] = decode_image(files[row], channels, size)

    parallel(decode_row, range(len(files)))


# ---------------------------------------------------------------------------------------------- the cache


def content_key(files: Sequence[Path], image_size: int | None) -> str:
    """Changes whenever a file is added, removed, renamed or modified, or another size is asked for."""
    digest = hashlib.sha256(f"{CACHE_VERSION}\0{image_size or 'auto'}\n".encode())
    for path in files:
        try:
            stat = path.stat()
        except OSError as err:  # gone or changed since the scan
            raise unreadable(path, err) from None
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def open_cached(path: Path, rows: int, image_size: int | None) -> np.ndarray | None:
    """The cached array memory-mapped copy-on-write (torch.from_numpy takes it without a copy), or None when
    it is missing or not what was expected."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    shape_ok = array.ndim == 4 and array.shape[0] == rows and array.shape[2] == array.shape[3]
    if array.dtype != np.uint8 or not shape_ok or (image_size is not None and array.shape[2] != image_size):
        return None
    return array


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on the cache folder, so ranks started together decode once and the others wait."""
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cached(
    path: Path,
    rows: int,
    image_size: int | None,
    plan: Callable[[], tuple[tuple[int, ...], Callable[[np.ndarray], None]]],
) -> np.ndarray:
    """The array at ``path``, built first if missing. ``plan()`` gives its shape and a function that fills it.
    Built into a temporary file renamed into place, so a reader never sees half an array. When the cache
    folder cannot be written, the array is built in memory instead (with a warning)."""
    if (array := open_cached(path, rows, image_size)) is not None:
        return array
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(path.parent))
        except OSError as err:
            warnings.warn(f"image cache {path.parent} is not writable ({one_line(err)}); decoding into memory")
            shape, fill = plan()
            array = np.empty(shape, dtype=np.uint8)
            fill(array)
            return array
        if (array := open_cached(path, rows, image_size)) is not None:  # another rank built it meanwhile
            return array
        shape, fill = plan()
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npy.tmp")
        os.close(handle)
        try:
            staged = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
            fill(staged)
            staged.flush()
            del staged
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    array = open_cached(path, rows, image_size)
    assert array is not None, f"cache file {path} unreadable right after writing it"
    return array


def decoded_images(folder: Folder, image_size: int | None, cache: Path) -> tuple[np.ndarray, str]:
    """Every image of the folder, in file order, decoded once and cached; and the cache key."""
    key = content_key(folder.files, image_size)

    def plan():
        channels, size = shape_of(folder.files, image_size)
        log.info("decoding %d images from %s (%d px, %d channels) into %s", len(folder.files), folder.root,
                 size, channels, cache)
        return (len(folder.files), channels, size, size), lambda out: decode_into(out, folder.files)

    return build_cached(cache / f"decoded-{key}.npy", len(folder.files), image_size, plan), key


def arranged(decoded: np.ndarray, key: str, parts: Sequence[torch.Tensor], cache: Path) -> list[torch.Tensor]:
    """Each part's images as a slice of one memory map: the decoded array itself when the parts are already a
    contiguous run of its rows, else a cached copy whose rows are laid out part after part."""
    order = torch.cat(list(parts))
    contiguous = len(order) > 0 and torch.equal(order, torch.arange(int(order[0]), int(order[0]) + len(order)))
    if contiguous:
        source, start = decoded, int(order[0])
    elif not isinstance(decoded, np.memmap):  # no cache folder: index in memory
        return [torch.from_numpy(decoded[p.numpy()]) for p in parts]
    else:
        digest = hashlib.sha256(key.encode())
        for p in parts:
            digest.update(len(p).to_bytes(8, "little") + p.numpy().astype("<i8").tobytes())
        order_np = order.numpy()

        def plan():
            def fill(out: np.ndarray) -> None:
                for at in range(0, len(order_np), COPY_CHUNK):
                    out[at : at + COPY_CHUNK] = decoded[order_np[at : at + COPY_CHUNK]]

            return (len(order_np), *decoded.shape[1:]), fill

        source = build_cached(cache / f"split-{digest.hexdigest()[:32]}.npy", len(order_np), decoded.shape[2], plan)
        start = 0
    views, at = [], start
    for p in parts:
        views.append(torch.from_numpy(source[at : at + len(p)]))
        at += len(p)
    return views


def load_pool(path: str, image_size: int | None, cache_dir: str | os.PathLike | None) -> Pool:
    """Scan now (layout errors surface at once); decode when the splits are known (``gather``)."""
    root = Path(path).expanduser()
    folder = scan(root)
    cache = cache_folder(cache_dir)

    def gather(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        decoded, key = decoded_images(folder, image_size, cache)
        return arranged(decoded, key, parts, cache)

    return Pool(
        name="imagefolder",
        source=str(root.resolve()),
        classes=folder.classes,
        labels=folder.labels,
        gather=gather,
        train=folder.parts["train"],
        val=folder.parts.get("val"),
        test=folder.parts.get("test"),
    )
