"""The ranks beside a profile: `python -m distcnn.forecast.alongside CONFIG_JSON THREADS READY_FILE`.

A run's ranks that share a machine (several ranks on one CPU node; every host of the emulated cluster) slow
each other down: they compete for cores, caches and memory bandwidth, the memory-bound phases (BatchNorm,
the optimizer's update) most. A profile of one rank alone would not see it, so `Alongside` starts as many
processes as there are other ranks on the machine, each training the same configuration's step the same way
(one rank, DDP over a process group of one) until it is stopped; the profile is timed while they run. Each
writes READY_FILE after its warm-up, and dies with the process that started it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distcnn.config import TrainConfig

READY_TIMEOUT = 300.0


class Alongside:
    """`count` processes training `config`'s step beside this one, from entering until leaving."""

    def __init__(self, config: TrainConfig, threads: int, count: int):
        self.config, self.threads, self.count = config, threads, count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self):
        if self.count <= 0:
            return self
        from distcnn import ownership
        from distcnn.errors import UsageError

        ownership.mark_parent()
        self.folder = Path(tempfile.mkdtemp(prefix="distcnn-alongside-"))
        (self.folder / "config.json").write_text(json.dumps(self.config.model_dump()))
        env = os.environ | {"OMP_NUM_THREADS": str(self.threads)}
        for i in range(self.count):
            with open(self.folder / f"log{i}", "wb") as log:  # a file: a pipe nobody reads could fill and block
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "distcnn.forecast.alongside", str(self.folder / "config.json"),
                     str(self.threads), str(self.folder / f"ready{i}")], env=env, stdout=subprocess.DEVNULL,
                    stderr=log))
        deadline = time.monotonic() + READY_TIMEOUT
        while not all((self.folder / f"ready{i}").exists() for i in range(self.count)):
            failed = [i for i, process in enumerate(self.processes) if process.poll() is not None]
            if failed or time.monotonic() > deadline:
                log = self.folder / f"log{failed[0]}" if failed else None
                problem = log.read_text(errors="replace").strip().splitlines() if log else []
                self.__exit__(None, None, None)
                raise UsageError("the ranks beside the profile did not start: "
                                 + (problem[-1] if problem else f"not ready after {READY_TIMEOUT:.0f} s"))
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        import shutil

        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.processes = []
        if self.count > 0:
            shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    import torch

    from distcnn import ownership
    from distcnn.forecast.profile import WARMUP_STEPS, _World, build_loop
    from distcnn.parallel.ranks import Ranks
    from distcnn.parallel.world import pick_device

    ownership.die_with_parent()
    config_path, threads, ready = argv
    config = TrainConfig(**json.loads(Path(config_path).read_text()))
    torch.set_num_threads(int(threads))
    ranks = Ranks(0, 0, 1, 1, pick_device(config.device, 0), "gloo")
    with _World():
        loop = build_loop(config, ranks)
        loop.run("allreduce", 0.0, steps=WARMUP_STEPS + 3)
        Path(ready).write_text("ready")
        while True:  # until the profile is done and kills this process
            loop.run("allreduce", 1e9)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
