"""The few torch.distributed calls the project needs; each is a no-op in a single process."""
import os

import torch
import torch.distributed as tdist

from errors import UserError


def is_distributed():
    return tdist.is_available() and tdist.is_initialized()


def rank():
    return tdist.get_rank() if is_distributed() else 0


def world_size():
    return tdist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


class GpuCountError(UserError, RuntimeError):
    """torchrun started more processes on this machine than it has GPUs."""


def check_gpus_per_node():
    """Refuse before NCCL does (with a hang or an obscure error) when two processes would share
    a GPU."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    visible = torch.cuda.device_count()
    if per_node > visible:
        raise GpuCountError(
            f"torchrun started {per_node} processes on this machine but only {visible} GPU(s) "
            f"are visible: use --nproc_per_node={visible} (one process per GPU), or --device=cpu "
            "to train on the CPU")


def init(device_type):
    """Join the process group torchrun describes: NCCL on CUDA, Gloo on the CPU.

    Returns the local rank (which GPU this process drives)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    tdist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return local_rank


def shutdown():
    if is_distributed():
        tdist.destroy_process_group()


def all_reduce_sum(values):
    """Element-wise sums of a list of numbers over all processes (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    backend = tdist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def barrier():
    if is_distributed():
        tdist.barrier()


def broadcast_object(obj):
    """rank 0's object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module):
    """Copy rank 0's buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them before each forward, so the ranks' copies differ only by the last
    forward's update; aligning them makes evaluation and checkpoints rank-independent, as with
    the reference's DataParallel, whose replicas' statistics updates are dropped."""
    if is_distributed():
        for buffer in module.buffers():
            tdist.broadcast(buffer, src=0)
