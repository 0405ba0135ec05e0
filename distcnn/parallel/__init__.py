"""Ranks and how they are started, one concept per module; this package itself imports nothing.

    ranks       where a process stands in the job (Ranks): no torch.distributed, so printing a line needs none
    world       the process group of one rank: device, setup and teardown, the few collectives the loop needs
    checks      before launch: how many ranks this machine can hold (GPUs, cores, memory)
    torchrun    the launch through torchrun's own launcher, and its failures as one line
    addresses   this machine's address towards a peer, and torchrun's stores bound to it only
    emulated    one torchrun node agent inside each host of the emulated cluster

One code path for 1 and N ranks (as in nanoGPT): a worker reads what torchrun put in its environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE); without it, it is the single rank of a one-process run.
"""
