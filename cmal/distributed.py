"""The process's device and its process group: --device, torchrun, and the few torch.distributed
calls the project needs (each a no-op in a single process)."""
import os

import torch
import torch.distributed as tdist

from cmal.errors import UserError


def unwrap(net):
    """The module inside a DistributedDataParallel or torch.compile wrapper."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


def is_distributed():
    return tdist.is_available() and tdist.is_initialized()


def rank():
    return tdist.get_rank() if is_distributed() else 0


def world_size():
    return tdist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def log(*args):
    """print() on the main process alone (every process runs the same code), flushed."""
    if is_main():
        print(*args, flush=True)


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


class DeviceError(UserError, ValueError):
    """A --device that names no device, or a GPU that is not there."""


def pick_device(name):
    """torch.device for a --device setting; 'auto' is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"--device={name} is not a device name ({exc}); use auto, cpu or "
                          "cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device={name}: only cpu and cuda are supported")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device={name} but no CUDA GPU is visible; use --device=cpu")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device={name} but only {count} GPU(s) are visible "
                              f"(cuda:0 to cuda:{count - 1})")
    return device


def setup_device(cfg):
    """The device of this process, joining torchrun's process group when launched by it."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if launched_by_torchrun():
        if device.type == "cuda":
            check_gpus_per_node()
        local_rank = init(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        set_cuda_determinism(cfg.deterministic)
    return device


def set_cuda_determinism(deterministic):
    """cuDNN autotuning for speed, or deterministic algorithms so that two runs with the same
    seed end with the same weights (cuBLAS needs its workspace setting before its first use)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an operation without a deterministic CUDA kernel is named in a warning instead
    # of stopping the run.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


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


def broadcast_buffers(module):
    """Copy rank 0's buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them before each forward, so the ranks' copies differ only by the last
    forward's update; aligning them makes evaluation and checkpoints rank-independent, as with
    the reference's DataParallel, whose replicas' statistics updates are dropped."""
    if is_distributed():
        for buffer in module.buffers():
            tdist.broadcast(buffer, src=0)
