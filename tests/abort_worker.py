"""A rank that crashes (SIGABRT, as a C++ std::terminate does) without training, as `python -m abort_worker
RUN_DIR` from this folder: every rank, or with ABORT_RANKS=1 only ranks other than 0, which end well (the
tests of a rank that fails after its run finished, test_launch_safety and test_cluster)."""

import os

if os.environ.get("ABORT_RANKS") != "1" or os.environ.get("RANK") != "0":
    os.abort()
