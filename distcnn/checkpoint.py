"""Checkpoints: written atomically by rank 0, read safely (weights_only) and shared with every rank.

A checkpoint is serialised in memory first, then written through a temporary file and renamed into place: a
full disk is an OSError naming the file and the bytes it needed (record.NoSpace), never half a file. The
epoch checkpoint keeps the one before it (checkpoint.prev.pt, a hard link where the file system has them):
when the newest is damaged (a copy cut short, a disk error), a resume takes the previous one and says so.
A checkpoint that cannot be read, with nothing to fall back on, is one line (DamagedFile) naming the file and
what to do.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from distcnn.console import say
from distcnn.errors import UsageError
from distcnn.parallel.ranks import Ranks
from distcnn.record import BEST, CHECKPOINT, NoSpace, write_atomic

PREVIOUS = "checkpoint.prev.pt"  # the epoch checkpoint before the newest, beside it


class DamagedFile(UsageError):
    """A file distcnn wrote and reads back that cannot be read."""


def previous_of(path: Path) -> Path | None:
    """Where the checkpoint before `path` is kept (only the epoch checkpoint keeps one)."""
    return path.with_name(PREVIOUS) if path.name == CHECKPOINT else None


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    previous = previous_of(Path(path))
    if previous is not None and Path(path).exists():
        _keep(Path(path), previous)
    try:
        write_atomic(path, lambda handle: handle.write(buffer.getbuffer()), binary=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(error, buffer.getbuffer().nbytes) from None
        raise


def _keep(path: Path, previous: Path) -> None:
    """`previous` becomes the file now at `path` (which stays), replaced atomically."""
    tmp = previous.with_name(f".{previous.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links: a copy
        tmp.write_bytes(path.read_bytes())
    os.replace(tmp, previous)


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        if isinstance(error, OSError) and not path.exists():
            raise
        raise DamagedFile(f"{path} is damaged ({_first_line(error)})") from None
    if not isinstance(state, dict):
        raise DamagedFile(f"{path} is damaged (not a distcnn checkpoint)")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0].split(". ")[0]
    return text or type(error).__name__


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`. When it is damaged and the one before it is kept and readable, that one takes
    its place (the damaged file is kept as checkpoint.pt.damaged) and the resume says so in one line; else
    DamagedFile, one line with what to do. The launcher calls it before a resume starts any rank, so a
    damaged checkpoint on this machine is found before torchrun starts."""
    path = Path(path)
    try:
        return _read(path)
    except DamagedFile as damaged:
        if path.name == BEST:
            return _best_from_checkpoint(path, damaged)
        previous = previous_of(path)
        if previous is None or not previous.exists():
            raise DamagedFile(f"{damaged}; delete it to start the run over, or put back a good copy") from None
        try:
            state = _read(previous)
        except DamagedFile:
            raise DamagedFile(f"{damaged}, and so is {previous.name}; delete both to start the run over") from None
        os.replace(path, path.with_name(f"{path.name}.damaged"))
        _keep(previous, path)
        epoch = state.get("state", {}).get("epoch")
        say(f"warning: {damaged}; resuming from the previous checkpoint instead ({previous.name}, after epoch "
            f"{epoch}; the damaged file is kept as {path.name}.damaged)")
        return state


def _best_from_checkpoint(path: Path, damaged: DamagedFile) -> dict:
    """The best weights when best.pt is damaged: an epoch checkpoint beside it whose epoch was the best one holds
    the same weights, and stands in for it, saying so; else one line: the best weights are nowhere else."""
    for name in (CHECKPOINT, PREVIOUS):
        try:
            state = _read(path.with_name(name))
        except (DamagedFile, OSError):
            continue
        epoch = state.get("state", {}).get("epoch")
        if "model" in state and epoch is not None and epoch == state["state"].get("best_epoch"):
            say(f"warning: {damaged}; its weights, the best epoch's ({epoch}), are taken from {name} instead")
            return {"model": state["model"], "epoch": epoch}
    raise DamagedFile(f"{damaged}, and no checkpoint beside it holds the best epoch's weights; put back a good copy "
                      f"of it, or train the run again (a new --out)") from None


def load_checkpoint(path: Path, ranks: Ranks | None = None) -> dict:
    """Rank 0 reads the file (read_checkpoint) and sends it to the others, so machines without the file resume
    too; a damaged one ends every rank with the same one line."""
    state: dict | None = None
    if ranks is None or ranks.is_main:
        try:
            state = read_checkpoint(path)
        except DamagedFile as damaged:
            if ranks is None or not ranks.distributed:
                raise
            state = {"damaged": str(damaged)}
    if ranks is not None and ranks.distributed:
        box = [state]
        dist.broadcast_object_list(box, src=0, device=ranks.device if ranks.device.type == "cuda" else None)
        state = box[0]
    if set(state) == {"damaged"}:
        damaged = DamagedFile(state["damaged"])
        damaged.said_by_rank_0 = True  # (every rank ends with it; one line is enough)
        raise damaged
    return state
