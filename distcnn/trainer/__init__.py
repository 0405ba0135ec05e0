"""The one training loop of every run, and what it is given (distcnn.trainer.loop's docstring tells how):

    loop     Trainer (the epochs), train_run (a run record trained and accounted), accounted, compile_warmup
    outcome  what a run keeps of each epoch and leaves at its end: OneModel (one model, one record)
    setup    the data, the optimiser and schedule, DDP's wrapper, environment.json
"""

from distcnn.trainer.loop import BuildModel, Trainer, accounted, compile_warmup, seed_for, train_run
from distcnn.trainer.outcome import OneModel, Outcome
from distcnn.trainer.setup import (DATA_OPTIONS, build_optimizer, build_scheduler, data_parallel, load_splits,
                                   write_environment)

__all__ = ["BuildModel", "DATA_OPTIONS", "OneModel", "Outcome", "Trainer", "accounted", "build_optimizer",
           "build_scheduler", "compile_warmup", "data_parallel", "load_splits", "seed_for", "train_run",
           "write_environment"]
