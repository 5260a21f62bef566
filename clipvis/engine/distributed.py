"""Process-group setup for multi-process runs: `torchrun`, or N local processes spawned by `launch`.

CPU runs use the gloo backend, CUDA runs NCCL. Single-process runs never touch torch.distributed.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipvis.errors import ClipvisError


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, which logs, writes checkpoints and merges results."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the group (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def local_device(requested: str) -> torch.device:
    """The device of this process: `cuda:<local rank>` for a CUDA run, else CPU."""
    if requested.startswith("cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_environment(device: str = "cpu") -> None:
    """Join the process group described by torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT), if any."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    main: Callable, num_processes: int, args: tuple = (), *, num_machines: int = 1, machine_rank: int = 0,
    dist_url: Optional[str] = None,
) -> None:
    """Run `main(*args)` in `num_processes` local processes per machine (like detectron2's launch), each with
    torchrun-style environment variables set, so `init_from_environment` joins them into one group."""
    world = num_processes * num_machines
    if world <= 1:
        main(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ClipvisError("--dist-url tcp://HOST:PORT (the address of machine 0) is required with several machines")
        addr, port = "127.0.0.1", free_port()
    else:
        addr, port = dist_url.replace("tcp://", "").rsplit(":", 1)
    try:
        mp.start_processes(
            _worker, args=(main, args, num_processes, machine_rank, world, addr, str(port)),
            nprocs=num_processes, start_method="spawn",
        )
    except mp.ProcessExitedException as e:
        # The worker already printed its error (one line, or its traceback); exit with its status, no second traceback.
        sys.exit(e.exit_code if isinstance(e.exit_code, int) and e.exit_code > 0 else 1)


def _worker(local_rank: int, main: Callable, args: tuple, per_machine: int, machine_rank: int, world: int, addr: str, port: str) -> None:
    os.environ.update(
        RANK=str(machine_rank * per_machine + local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
        MASTER_ADDR=addr, MASTER_PORT=port,
    )
    main(*args)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself when it is not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
