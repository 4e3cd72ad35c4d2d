"""The process's place in the distributed world (rank, world size, device), set up in one way for the
trainer, the benchmark and evaluation; batches to that device; knowing a lost peer's error."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

# one per rank, made by DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp)
SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def single_process_env() -> None:
    """`python launch/pretrain.py` (or the benchmark) with no launcher: a world of one.
    MASTER_PORT 0: the rendezvous store binds a free port itself, so no other process can take it
    between choosing and binding."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: "torch.device"  # noqa: F821 (torch is imported when a world is set up, not by single_process_env's import)

    @property
    def device_type(self) -> str:
        return self.device.type

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def print0(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)


def init_world(timeout_s: Optional[float] = None, cpu_threads: bool = True, group_of_one: bool = True) -> World:
    """Join the launcher's world (deepspeed, torchrun, srun, or :func:`single_process_env`) through
    DeepSpeed, whose accelerator picks the backend (gloo on CPU, NCCL on GPUs) and the device.

    ``timeout_s``: how long a collective waits for a silent peer (torch's default: 30 min); a peer that
    died is noticed at once (gloo/NCCL see its connections close). ``cpu_threads``: on CPU, without
    OMP_NUM_THREADS, each rank takes its share of the cores (torch's default of every core per process
    makes N ranks on one machine oversubscribe it, and OpenMP's spinning threads then make small matmuls
    hundreds of times slower). ``group_of_one=False``: a world of one has no process group (evaluation)."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if (size > 1 or group_of_one) and not dist.is_initialized():
        import deepspeed

        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), **kwargs)
        if acc.device_name() == "cpu":
            release_shm_buffer(dist.get_rank(), dist.get_world_size())
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
        if cpu_threads and "OMP_NUM_THREADS" not in os.environ:
            local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    else:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    return World(rank, size, local_rank, device)


def release_shm_buffer(rank: int, size: int) -> None:
    """Unlink this rank's segment of DeepSpeed's CPU shared-memory all-reduce once every rank has mapped
    it: the mappings stay valid and the memory goes with the process. DeepSpeed never unlinks it, so each
    run left ~66 MB per rank in /dev/shm, which is RAM."""
    import torch.distributed as dist

    if size > 1:
        dist.barrier()  # init_distributed returned on every rank: each has opened its peers' segments
    Path(SHM_BUFFER.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                           port=os.environ.get("MASTER_PORT", ""), rank=rank)).unlink(missing_ok=True)


def to_device(batch: dict, device) -> dict:
    """A batch's tensors to ``device`` (the model casts images to each frozen encoder's dtype)."""
    import torch

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def is_collective_failure(e: BaseException) -> bool:
    """An error from torch.distributed because a peer is gone or silent (gloo, NCCL, the store)."""
    import torch.distributed as dist

    from msmedcap.eval.gather import RankLost

    if isinstance(e, RankLost):
        return True
    kinds = tuple(k for k in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                              getattr(dist, "DistNetworkError", None)) if k is not None)
    if kinds and isinstance(e, kinds):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Gloo", "gloo", "NCCL", "timed out",
        "Timed out", "Broken pipe", "Socket Timeout"))


def leave_now(code: int) -> None:
    """Exit now, without interpreter teardown: at exit multiprocessing terminates (SIGTERM) and joins
    the data loader's workers, which ignore SIGTERM (signals.py), so a normal exit after a failure
    mid-stage would wait forever; and destroying a process group whose peer is gone can block."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:600] if text else ""
