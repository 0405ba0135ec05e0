"""Image folders decoded once and cached (the scan is distcnn.data.folder_scan's).

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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distcnn.data.folder_scan import Folder, one_line
from distcnn.errors import UsageError

log = logging.getLogger(__name__)

GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
MAX_AUTO_SIZE = 224  # default image_size: the most common shorter side, but no more than this
CACHE_VERSION = "distcnn-imagefolder-1"  # bump when decoding changes, so old caches are not reused
COPY_CHUNK = 1024  # rows copied at a time when rearranging a cache


def cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$DISTCNN_CACHE/imagefolder``, else ``~/.cache/distcnn/imagefolder``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get("DISTCNN_CACHE") or Path.home() / ".cache" / "distcnn"
    return Path(root).expanduser() / "imagefolder"


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
