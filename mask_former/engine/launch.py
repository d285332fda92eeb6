"""Multi-process launch that also works without GPUs.

detectron2 v0.6's ``launch`` asserts CUDA and always uses NCCL; detectron2 main falls back to gloo
only when no GPU is visible, so ``MODEL.DEVICE cpu`` on a GPU machine would still pick NCCL. For a
CPU device (or a machine without CUDA) :func:`launch` spawns the workers itself with the gloo
backend and sets up detectron2's per-machine process group as detectron2 does; in every other case
it calls detectron2's ``launch`` unchanged.
"""

import logging
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)


def _free_local_port():
    """A port that is free on localhost now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _uses_cuda(device):
    """Whether workers for ``device`` (``cfg.MODEL.DEVICE``; None: CUDA if available) need CUDA
    and NCCL."""
    if not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    *,
    device=None,
):
    """
    Runs ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``
    machines, like detectron2's ``launch`` (same arguments), on CPU as well as on GPUs.

    Args:
        main_func (callable): the function each worker runs; picklable (a module-level function).
        num_gpus_per_machine (int): worker processes per machine (GPUs, or CPU workers).
        num_machines (int): machines taking part.
        machine_rank (int): rank of this machine.
        dist_url (str): rendezvous URL, e.g. "tcp://127.0.0.1:8686"; "auto" picks a free local port.
        args (tuple): arguments of ``main_func``.
        timeout (timedelta): timeout of collective operations.
        device (str or None): the device the workers train on (``cfg.MODEL.DEVICE``); a CPU device
            selects gloo workers. None: CPU only when CUDA is unavailable.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or _uses_cuda(device):
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on a single machine")
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    logger.info("Launching %d CPU worker processes (gloo) at %s", num_gpus_per_machine, dist_url)
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _create_local_process_group(num_workers_per_machine):
    """detectron2's per-machine process group (main: a function; v0.6: set by its launch)."""
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_workers_per_machine)
        return
    num_machines = dist.get_world_size() // num_workers_per_machine
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)  # every rank must create every group
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _share_cpu_threads(num_workers_per_machine):
    """Splits the machine's cores among the workers unless OMP_NUM_THREADS is set (torchrun sets
    it to 1): N workers each running one thread per core oversubscribe the CPU, and OpenMP then
    slows down by orders of magnitude."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // num_workers_per_machine)
    torch.set_num_threads(threads)
    logger.info("CPU worker uses %d thread(s); set OMP_NUM_THREADS to override", threads)


def _cpu_worker(
    local_rank,
    main_func,
    world_size,
    num_workers_per_machine,
    machine_rank,
    dist_url,
    args,
    timeout,
):
    """One gloo worker: joins the process group, then runs ``main_func(*args)``."""
    global_rank = machine_rank * num_workers_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    _create_local_process_group(num_workers_per_machine)
    _share_cpu_threads(num_workers_per_machine)
    # As in detectron2: a barrier right away avoids a timeout when workers start unevenly.
    comm.synchronize()
    main_func(*args)
