"""Measuring a variant's training step: time (round-robin over the variants), peak memory, aten op count."""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import platform
import random
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mole.bench.variants import BASELINE, Setup, Variant
from mole.memory import SavedTensorAccount, tensor_bytes

try:
    import resource  # POSIX only
except ImportError:
    resource = None


def keep_freed_memory() -> str | None:
    """On glibc, keep freed heap memory in the process instead of returning it to the OS (``mallopt``).

    glibc serves allocations above a (self-adjusting) threshold with ``mmap`` and gives them back on
    ``free``; a tensor allocated at that size later starts on fresh pages, each paid as a page fault.
    Interleaving 17 models' steps in one process (round-robin) keeps reshuffling which sizes recur, so a
    variant's step then pays page faults that it does not pay when it runs step after step, as in
    training: measured with ``--keep-freed-memory off`` at batch 2 x 128, HMoRA took 8,849 minor faults
    per step round-robin against 1,313 run alone, and 26 ms more per step. With the threshold fixed
    at 32 MiB and no trimming, every variant, the peft baseline included, reuses its own pages. Returns
    what was set, or ``None`` where this is not glibc.
    """
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)):
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB"


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Timer:
    """Time of one call: CUDA events (synchronised after) on a GPU; on the CPU the process's CPU time
    (``clock="cpu"``, single-threaded runs: what other processes on a shared machine take is not counted)
    or wall time (``perf_counter``)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = self.now()
        fn()
        return self.now() - t0


def peak_memory_mb(v: Variant, batch: dict, setup: Setup) -> float:
    """Peak memory of one training step of ``v`` (see the module docstring for the CPU account)."""
    if setup.device.type == "cuda":
        v.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        v.step(batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before + _model_bytes(v)) / 2**20
    account = SavedTensorAccount.for_model(v.model)
    with account():
        with torch.autocast(setup.device.type, dtype=setup.amp or torch.bfloat16, enabled=setup.amp is not None):
            loss = v.forward_loss(batch)
    loss.backward()
    v.optimizer.zero_grad(set_to_none=True)
    trainable_bytes = sum(p.numel() * p.element_size() for p in v.model.parameters() if p.requires_grad)
    return (_model_bytes(v) + 3 * trainable_bytes + account.total) / 2**20


def _model_bytes(v: Variant) -> int:
    return tensor_bytes([*v.model.parameters(), *v.model.buffers()])


# aten ops that only make a new view or handle of existing data (or allocate without initialising): on a GPU
# they launch no kernel, so the op count leaves them out. Every other op is roughly one kernel launch.
METADATA_ONLY_OPS = frozenset({"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided",
                               "new_empty", "new_empty_strided", "_unsafe_view", "sym_size", "sym_stride",
                               "sym_numel", "sym_storage_offset", "is_same_size"})


def is_metadata_only(func) -> bool:
    """``func`` (an ``OpOverload``) returns a view (``is_view`` from its schema) or is in :data:`METADATA_ONLY_OPS`."""
    return func.is_view or func.overloadpacket.__name__ in METADATA_ONLY_OPS


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it that launch a kernel (:func:`is_metadata_only` excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_metadata_only(func):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(v: Variant, batch: dict) -> collections.Counter:
    """The kernel-launching aten ops of one full eager training step of ``v`` (forward, losses, backward,
    optimizer step) after the optimizer state exists. The backward runs in this thread on the CPU, so the
    mode sees it; on a GPU autograd's device threads would not be counted, hence the CPU in CI."""
    v.step(batch)  # lazily created optimizer state is not part of a steady step
    with OpCounter() as counter:
        v.step(batch)
    return counter.counts


def time_variants(variants: list[Variant], batch: dict, setup: Setup, log) -> None:
    timer = Timer(setup.device, setup.clock)
    for v in variants:  # warm-up (and compilation)
        t0 = time.perf_counter()
        loss = None  # --warmup 0: no warm-up step
        for _ in range(setup.warmup):
            loss = v.step(batch)
        if loss is not None and not torch.isfinite(loss):
            raise RuntimeError(f"{v.name}: non-finite loss during warm-up")
        v.warmup_s = time.perf_counter() - t0
        if setup.compile:
            log(f"  warm-up of {v.name} (compilation included): {v.warmup_s:.1f} s")
    rng = random.Random(0)
    for r in range(setup.rounds):
        order = list(variants)
        rng.shuffle(order)  # no variant always runs right after another
        for v in order:
            f0 = minor_faults()
            v.times.append(timer(lambda v=v: v.step(batch)))
            v.faults.append(minor_faults() - f0)
        base = next(v for v in variants if v.name == BASELINE).times[-1]
        log(f"  round {r + 1}/{setup.rounds}: baseline {base * 1000:.1f} ms")

