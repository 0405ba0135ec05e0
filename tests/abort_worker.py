"""A rank that crashes (SIGABRT, as a C++ std::terminate does) without training: started by torchrun in
test_launch_safety as `python -m abort_worker RUN_DIR`, from this folder."""

import os

os.abort()
