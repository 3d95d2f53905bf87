"""Distributed data-parallel training under ``torchrun``: NCCL on GPUs, gloo on CPUs, one process per device."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from monai.utils import set_determinism


def local_device() -> torch.device:
    """This process's device: ``cuda:$LOCAL_RANK`` when GPUs are present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(seed: int) -> None:
    """Join the ``torchrun`` process group (once), pin the GPU, and seed each rank differently (``seed + rank``).

    Different seeds per rank keep augmentation and diffusion noise independent across processes; the
    ``DistributedSampler`` already gives each rank different images.
    """
    if "RANK" not in os.environ and not dist.is_initialized():
        raise RuntimeError(
            "multi_gpu_train.json needs the processes that torchrun starts: run "
            "`torchrun --nproc_per_node=N -m monai.bundle run --config_file \"[...,'configs/multi_gpu_train.json']\"`."
        )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    set_determinism(seed=seed + dist.get_rank())


def data_parallel(network: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``network`` on ``device`` wrapped in ``DistributedDataParallel`` (``device_ids`` only on GPUs)."""
    network = network.to(device)
    device_ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def finalize_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
