"""Process-group setup: torchrun, SLURM, or a single process; NCCL with CUDA, gloo without.

This module is the one place that reads megatron-core's ``parallel_state`` getters. Everything
else receives a :class:`ParallelContext` (sizes, ranks, process groups, device) as an argument.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_tempnet.parallel import cpu


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def slurm_first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list ("node[01-04,07],gpu2" -> "node01").

    Uses ``scontrol show hostnames`` when available (it knows every syntax), else parses the
    common ``prefix[a-b,c]`` form.
    """
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
        if out:
            return out[0]
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (bind port 0 on ``addr``, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))
        except OSError:  # an address of another host: any local interface will do
            s.bind(("", 0))
        return s.getsockname()[1]


def detect_launch_env(environ=None) -> LaunchEnv:
    """torchrun (RANK/WORLD_SIZE/LOCAL_RANK) wins; then SLURM (one task per GPU); else single.

    The port is MASTER_PORT when set. Otherwise torchrun and SLURM launches use 29500 (every
    rank must agree on it); a single process picks a free port, so it does not collide with
    another job on the machine holding 29500.
    """
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or slurm_first_host(env["SLURM_JOB_NODELIST"])
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        port = free_port(addr)
    return LaunchEnv(0, 1, 0, addr, port, "single")


@dataclass(frozen=True)
class ParallelContext:
    """Sizes, ranks and groups of one process; passed to everything that communicates."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Data-parallel size for a layout; errors name the values and the fix."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and "
                         f"--pipeline-model-parallel-size ({pp}) must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-parallel size {tp} x "
            f"pipeline-parallel size {pp} = {tp * pp}: launch a multiple of {tp * pp} processes "
            "or change --tensor-model-parallel-size / --pipeline-model-parallel-size")
    return world_size // (tp * pp)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and megatron-core's model-parallel RNG tracker.

    Megatron convention: the tracker's tensor-parallel stream is offset by TP rank, so dropout
    inside TP regions differs per rank while everything else agrees.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None,
               timeout_minutes: int = 30, environ=None,
               virtual_pp: int | None = None) -> ParallelContext:
    """Start torch.distributed and megatron-core's parallel state; return this rank's context.
    ``virtual_pp``: model chunks per pipeline rank (the interleaved schedule; None or 1: off)."""
    from megatron.core import parallel_state as ps

    launch = detect_launch_env(environ)
    validate_layout(launch.world_size, tp, pp)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu.activate()
        device = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank, world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=(
                                     virtual_pp if virtual_pp and virtual_pp > 1 else None),
                                 distributed_timeout_minutes=timeout_minutes,
                                 create_gloo_process_groups=not use_cuda)
    ctx = ParallelContext(
        tp_size=tp, pp_size=pp, dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(), tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        device=device, rank=launch.rank, world_size=launch.world_size)
    set_seed(seed)
    return ctx


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
