"""One node of a multi-node job on an emulated host:
`python -m distcnn.node_agent RUN_DIR ADDR ENDPOINT ID IS_HOST [WORKER]`.

The launcher starts it inside each host's network namespace; it is torchrun's node agent for the run whose
config.json is in RUN_DIR, with the c10d rendezvous at ENDPOINT. ADDR is the address the other hosts reach this
one at; IS_HOST (1 on the first host) says that this node serves the rendezvous store, which torchrun could
not infer (the emulated address is not the machine's host name). WORKER: the module every rank runs (default
distcnn.worker, the training run).
"""

from __future__ import annotations

import sys
from pathlib import Path

from distcnn import ownership
from distcnn.config import TrainConfig
from distcnn.errors import FailedAfterTheRun, UsageError, WorkersFailed
from distcnn.parallel import torchrun
from distcnn.record import RunRecord


def main(argv: list[str]) -> int:
    ownership.die_with_parent()  # the launcher's end is this agent's end, and so its ranks' (torchrun.launch
    # marks this agent as theirs)
    run_dir, address, endpoint, rdzv_id, is_host, *worker = argv
    saved = TrainConfig(**RunRecord(Path(run_dir)).read_config())
    config = saved.model_copy(update={"rdzv_endpoint": endpoint, "rdzv_id": rdzv_id})
    try:
        torchrun.launch(config, Path(run_dir), local_addr=address, rdzv_conf=f"is_host={is_host}",
                        worker=worker[0] if worker else torchrun.WORKER)
    except UsageError as error:
        print(f"distcnn: error: {error}", file=sys.stderr)
        return UsageError.exit_code
    except FailedAfterTheRun as warning:
        print(f"warning on {address}: {warning}", file=sys.stderr)
        return 0
    except WorkersFailed as error:
        print(f"distcnn: error on {address}: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
