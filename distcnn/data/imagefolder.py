"""``imagefolder:PATH``: a folder of images, one subfolder per class, optionally inside ``train/`` ``val/``
``test/`` split folders: scanned at once (distcnn.data.folder_scan), decoded once into a cache shared by the
ranks of a machine when the splits are known (distcnn.data.image_cache)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from distcnn.data.folder_scan import scan
from distcnn.data.image_cache import arranged, cache_folder, decoded_images
from distcnn.data.splits import Pool


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
