"""torch.distributed plumbing: process-group setup, a differentiable all-gather, SyncBN.

Launch with ``torchrun`` (single node, multi-node c10d rendezvous, or ``srun torchrun``):
it sets RANK, WORLD_SIZE and LOCAL_RANK, and this module reads them. NCCL on GPU,
gloo on CPU. Only rank 0 logs and writes checkpoints (``DistInfo.is_main``).

SimCLR's InfoNCE takes its negatives from the *global* batch (paper App. A.1 follows
Chen et al., 2020a), so the embeddings of every rank are gathered with gradients
(:func:`gather_with_grad`). Batch norm is synchronised across ranks too: torch's
``nn.SyncBatchNorm`` on GPU, and :class:`CpuSyncBatchNorm` (same maths, plain torch
ops) on CPU, where torch's kernel refuses to run; the CPU version is what the 2-rank
gloo test exercises.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mscn.errors import MscnError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int, strict: bool = False,
                what: str = "train.device") -> tuple[torch.device, str | None]:
    """``auto``/``cuda`` -> this rank's GPU when there is one; else the CPU, with a notice
    when cuda was asked for (``strict``: an MscnError instead, for benchmarks that must not
    silently measure the CPU)."""
    if pref in ("auto", "cuda") and torch.cuda.is_available():
        # more ranks than GPUs on the node (a single-GPU rehearsal of multi-GPU runs): they share
        return torch.device("cuda", local_rank % torch.cuda.device_count()), None
    if pref == "cuda":
        if strict:
            raise MscnError(f"{what} cuda: no CUDA device is visible; use cpu")
        return torch.device("cpu"), f"{what}=cuda but no CUDA device is visible: running on the CPU"
    return torch.device("cpu"), None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise MscnError(f"{name}={raw!r}: not an integer; launch with torchrun, which sets RANK, WORLD_SIZE "
                        "and LOCAL_RANK") from None


def env_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


_PARENT = os.getppid()  # at import, early in the worker: the launcher, before it could have died


def stop_with_launcher() -> None:
    """Linux: ask the kernel for a SIGTERM when the process that started this one (torchrun's
    agent) dies. A ``kill -9`` of torchrun left its workers training on as orphans, holding
    the run folder; SIGTERM is the trainer's preemption signal, so they now checkpoint and
    stop at the same step (train/preempt.py). Called only under torchrun (TORCHELASTIC_RUN_ID),
    which starts its workers from its main thread: the kernel ties the signal to the thread
    that started the process, so a launcher starting workers from a thread that ends early
    would stop them. Elsewhere, or if the call fails: nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
        if os.getppid() != _PARENT:  # the launcher died before the call: as if the signal had come
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


WAIT_NOTE_S = 20.0  # how long a rank waits for the others before it says so


def check_launch(rank: int, world_size: int, init_method: str) -> None:
    """One line for a launch the process group could never form: it would wait without a word
    (a RANK outside [0, WORLD_SIZE)) or fail with a traceback (no MASTER_ADDR)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise MscnError(f"RANK={rank} with WORLD_SIZE={world_size}: a rank must be in [0, WORLD_SIZE); launch with "
                        "torchrun (--nproc_per_node, --nnodes), which numbers the ranks itself")
    if init_method == "env://":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise MscnError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: launch with torchrun "
                            "(torchrun --standalone --nproc_per_node=N ...), or set MASTER_ADDR and MASTER_PORT to "
                            "rank 0's host and a free port")


def init_distributed(device_type: str, init_method: str = "env://", rank: int | None = None,
                     world_size: int | None = None) -> DistInfo:
    """Join the process group described by torchrun's env vars (or by explicit arguments).

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets a ``DistInfo`` without any
    process group. For CUDA the device must be set before NCCL initialises. A rank still
    waiting for the others after :data:`WAIT_NOTE_S` says so (and where), once.
    """
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    rank = _env_int("RANK", 0) if rank is None else rank
    local_rank = env_local_rank()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker
        stop_with_launcher()
    if world_size <= 1 and "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0)  # no WORLD_SIZE: one process, whatever a stray RANK says
    if world_size == 1 and rank == 0:
        return DistInfo(0, 1, 0)
    check_launch(rank, world_size, init_method)
    if not dist.is_initialized():
        backend = pick_backend(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        where = (f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if init_method == "env://"
                 else init_method)
        note = threading.Timer(WAIT_NOTE_S, lambda: print(
            f"[mscn] rank {rank}: waiting for the other {world_size - 1} rank(s) at {where} (WORLD_SIZE="
            f"{world_size}); a rank that never starts keeps every other one waiting", file=sys.stderr, flush=True))
        note.daemon = True
        note.start()
        try:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        except (RuntimeError, ValueError) as e:  # DistNetworkError is a RuntimeError
            text = str(e)
            if "EADDRINUSE" in text or "address already in use" in text.lower():
                raise MscnError(f"MASTER_PORT {os.environ.get('MASTER_PORT')} is in use on "
                                f"{os.environ.get('MASTER_ADDR')} (another run?): pick a free port "
                                "(torchrun --master_port P, or --standalone)") from None
            raise
        finally:
            note.cancel()
    return DistInfo(rank, world_size, local_rank)


BACKENDS = ("nccl", "gloo")


def pick_backend(device_type: str) -> str:
    """``MSCN_DIST_BACKEND`` if set; else NCCL for one GPU per rank, and gloo on the CPU or
    when ranks share a GPU (torchrun's LOCAL_WORLD_SIZE > visible GPUs), which NCCL refuses.
    gloo moves CUDA tensors through the host: correct, and slower, which is fine for a
    rehearsal on one GPU and never what a real multi-GPU run gets by default."""
    chosen = os.environ.get("MSCN_DIST_BACKEND", "").strip().lower()
    if chosen:
        if chosen not in BACKENDS:
            raise MscnError(f"MSCN_DIST_BACKEND={chosen!r}: must be one of {', '.join(BACKENDS)}")
        if chosen == "nccl" and device_type != "cuda":
            raise MscnError("MSCN_DIST_BACKEND=nccl needs CUDA devices; this run is on the CPU")
        return chosen
    if device_type != "cuda":
        return "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if local_world <= torch.cuda.device_count() else "gloo"


def check_same_data(source, info: DistInfo) -> None:
    """Every rank must read the same dataset (call on all ranks). A node with another copy
    (fewer images, a relative data.root resolved in another folder) plans another number of
    steps per epoch and so another learning-rate schedule, then fails far from the cause,
    or trains to the end without a word; here it is one line on every rank, at the start."""
    if not info.enabled or not dist.is_initialized():
        return
    seen = gather_objects((source.digest(), f"{source.num_samples} samples in {source.root}"))
    if len({d for d, _ in seen}) > 1:
        apart = [f"rank {r}: {what}" for r, (d, what) in enumerate(seen) if d != seen[0][0]][:3]
        raise MscnError(f"the ranks do not read the same dataset (rank 0: {seen[0][1]}; {'; '.join(apart)}): every "
                        "rank needs the same data.root contents, on a shared file system or as identical copies")


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (a small host-side collective; call on
    all ranks of ``group``, default all); ``[obj]`` without a process group."""
    if not dist.is_initialized():
        return [obj]
    seen: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, obj, group=group)
    return seen


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (a small host-side collective)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (call on all ranks).

    For networks that no DDP wrapper syncs: a frozen backbone under the linear probe or
    kNN, whose random init (``random`` / ``--from-scratch`` baselines) would otherwise
    differ across ranks wherever their torch RNG streams differ (e.g. after a resume,
    which reseeds ranks apart). Non-contiguous (channels_last) tensors go through a
    contiguous copy because NCCL wants dense, row-major buffers.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach() if t.is_contiguous() else t.detach().contiguous()
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data_ptr():
            t.detach().copy_(buf)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (first dim may differ) across all ranks, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if t.dtype == torch.bool:  # not every backend gathers bools
        return gather_cat(t.to(torch.uint8)).bool()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def mean_over_ranks(total: torch.Tensor, steps: int) -> float:
    """Mean of a per-rank sum over ``steps`` steps, across all ranks (a collective).

    Note: host sync point. Every rank gets the same number, so a non-finite check on it
    stops all ranks together instead of one rank raising while the others wait in DDP.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = total.clone()
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / max(1, steps)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the gradient of its own slice.

    Each rank's loss reads the gathered tensor, so the gradient of the *sum* of all
    ranks' losses w.r.t. rank r's slice is the sum over ranks of their gradients on that
    slice: all_reduce(SUM), then keep our slice. (DDP then averages the parameter
    gradients, which turns that sum into the mean loss over ranks.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks, in rank order; differentiable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is again a sum over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CpuSyncBatchNorm(nn.Module):
    """Batch norm over the union of all ranks' batches, in plain torch ops (for gloo/CPU).

    Two passes (mean, then mean squared deviation), each one all_reduce of a per-channel
    vector, so the statistics equal those of one process holding the whole batch.
    Parameters and buffers carry ``nn.BatchNorm``'s names, so state_dicts are
    interchangeable, and running stats follow its rules (unbiased variance, momentum).
    Outside distributed training (eval, one process) it is plain ``F.batch_norm``.
    (It is not an ``nn.SyncBatchNorm`` subclass: DDP refuses those on CPU modules.)
    """

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias  # shared Parameters (or None if not affine)
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracking = self.training and self.running_mean is not None
        if tracking:
            self.num_batches_tracked.add_(1)
        # momentum=None means a cumulative average (nn.BatchNorm semantics)
        factor = self.momentum if self.momentum is not None else (
            1.0 / float(self.num_batches_tracked) if tracking else 0.0)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            use_batch = self.training or self.running_mean is None
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                use_batch, factor, self.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = _AllReduceWithGrad.apply(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device))
        xf = x.float()
        mean = _AllReduceWithGrad.apply(xf.sum(dims)) / count
        centered = xf - mean.view(shape)
        var = _AllReduceWithGrad.apply((centered * centered).sum(dims)) / count
        if tracking:
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased.detach(), factor)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm*d synchronised across ranks: torch's SyncBN on GPU, ours on CPU."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BATCH_NORMS):
        return CpuSyncBatchNorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device_type))
    return module
