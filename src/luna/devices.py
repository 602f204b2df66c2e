"""Where the networks run: device and autocast choice, shared by training and inference.

`resolve_device` turns a ``--device`` option into a device (CUDA when present).
`amp_dtype_for` picks the autocast dtype for a device. `Devices` is training's view,
read from the environment once by `Devices.setup`:

- launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): one process per
  GPU (or per CPU process with the gloo backend), DistributedDataParallel, each rank
  sees its share of every epoch; only rank 0 logs, writes TensorBoard events and
  checkpoints;
- else several visible GPUs: ``nn.DataParallel`` over all of them, as the book did,
  with the batch multiplied by the number of GPUs so each GPU keeps the per-device
  batch size the user asked for;
- else one GPU, else the CPU.

On the CPU, `keep_freed_memory` first tells glibc's allocator to keep what a
training step frees for the next step (see there: the same numbers, faster steps).

Mixed precision (`--amp`): on CUDA bf16 where the GPU supports it (no loss scaling
needed), else fp16 with a GradScaler; on the CPU bf16 autocast, which roughly doubles
the classifier's training speed on CPUs with bf16 instructions (45 -> 86 samples/s
measured on our 2-core AMD EPYC machines) at bf16's precision in convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from luna.errors import LunaError

__all__ = ["Devices", "amp_dtype_for", "is_glibc", "keep_freed_memory", "leave_process_group", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class Devices:
    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    data_parallel: int = 1
    """GPUs used by nn.DataParallel in this process (1: none)."""
    amp_dtype: torch.dtype | None = None

    @classmethod
    def setup(cls, device: str | None = None, amp: bool = False) -> "Devices":
        """The devices this process trains on (see the module docstring); on the CPU, `keep_freed_memory` first."""
        devices = cls._choose(device, amp)
        if not devices.is_cuda:
            keep_freed_memory()
        return devices

    @classmethod
    def _choose(cls, device: str | None, amp: bool) -> "Devices":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            rank = int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            use_cuda = torch.cuda.is_available() and device != "cpu"
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(local_rank)
                chosen = torch.device("cuda", local_rank)
            else:
                chosen = torch.device("cpu")
            return cls(chosen, world_size, rank, local_rank, 1, _amp_dtype(chosen, amp))
        chosen = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        parallel = torch.cuda.device_count() if chosen.type == "cuda" and chosen.index is None else 1
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", 0)
        return cls(chosen, 1, 0, 0, max(parallel, 1), _amp_dtype(chosen, amp))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if self.distributed:
            where = f"DistributedDataParallel, {self.world_size} processes ({self.device.type})"
        elif self.data_parallel > 1:
            where = f"DataParallel over {self.data_parallel} GPUs"
        elif self.is_cuda:
            where = f"{torch.cuda.get_device_name(self.device)}"
        else:
            where = f"CPU ({torch.get_num_threads()} threads)"
        return where + (f", AMP {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else "")

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and wrap it for DDP or DataParallel."""
        model = model.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.is_cuda else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.data_parallel > 1:
            return nn.DataParallel(model)
        return model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; a disabled scaler (a no-op) otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def batch_size(self, per_device: int) -> int:
        """The DataLoader batch: per-device batch times the GPUs DataParallel splits it over."""
        return per_device * self.data_parallel

    def same_on_all_ranks(self, value):
        """Rank 0's ``value`` on every rank (e.g. a time-stamped run directory)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __enter__(self) -> "Devices":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leave the process group (see `leave_process_group`): with the barrier when the block completed,
        without it after an exception. A no-op in one process."""
        if self.distributed:
            leave_process_group(completed=exc_type is None)


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the kernel.

    A training step on the CPU allocates and frees the same large tensors every step:
    the activations autograd keeps and their gradients, 56 MiB each for the nodule
    classifier's full-resolution layers at batch 24. glibc serves every allocation
    over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
    ``free``, so the kernel zero-fills every page of them again each step, in page
    faults. With mmap off (``M_MMAP_MAX`` 0) they come from the heap, and with a
    trim threshold of 1 GiB the heap keeps what was freed for the next step. The
    arithmetic is the same, bit for bit (same loss after 9 steps; a 10-epoch training
    wrote the same checkpoints); measured on our 2-core Intel Xeon, float32 steps of
    the training benchmark (`luna.bench.training`, runs alternating with and without,
    3 each): `ResidualClassifier` (batch 24) 16.0-18.7 samples/s against 12.3-13.3,
    the UNet (batch 16) 126-131 crops/s against 68-81. The cost is memory: the
    process holds its high-water mark (a classifier step's peak RSS 1.05-1.07 GiB
    before, 1.31-1.52 after; the proposals of 10 CTs of 104-300 slices in one process
    kept RSS at the running peak, 1.09 GiB, where it fell back to 0.57-0.69 GiB
    between CTs without, peak 0.98). Diagnosis, which reuses its buffers
    already, gained nothing (29-31 s per whole-chest scan either way), so only
    training on the CPU calls this (`Devices.setup`, and the training benchmark).

    Does nothing (returns False) where the C library is not glibc, or where the user
    set glibc's own ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_``: their choice
    stands. Returns whether the settings are in place; the first call decides for the process.
    """
    if not is_glibc() or "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    if kept:
        log.debug("glibc malloc: mmap off, trim threshold %d MiB (keep_freed_memory)", _KEEP_UP_TO >> 20)
    return kept


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (the C library `keep_freed_memory` tunes)."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):  # not a glibc name here, or no confstr at all (Windows)
        return False


def leave_process_group(*, completed: bool) -> None:
    """Destroy the default process group, with what still holds it; after a ``completed`` run, all ranks meet first.

    A DistributedDataParallel wrapper holds the group through its reducer and sits in
    reference cycles (its hooks), so it outlives the last reference to it until the
    cyclic garbage collector runs, perhaps only while the interpreter shuts down; the
    group's gloo threads destroyed then aborted the process ("terminate called without
    an active exception", SIGABRT) after its work was done, in about 1 of 100 two-rank
    runs. So the collector runs here, while the interpreter is whole. The barrier keeps
    a rank from tearing down its connections while a peer still finishes its last
    collective. After an error there is no barrier: the peer may never arrive, and
    waiting for it would hang until the group's timeout.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    return amp_dtype_for(device) if amp else None


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bfloat16 where supported, float16 on older GPUs.

    bfloat16 keeps float32's range, so no loss scaling is needed; on the CPU it is the
    only autocast dtype.
    """
    if device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cpu, cuda, cuda:N; None picks CUDA when present. `LunaError` for the impossible."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise LunaError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LunaError("--device cuda given but CUDA is not available: use --device cpu")
    return device
