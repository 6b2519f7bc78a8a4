"""Keep OpenMP teams out of torch.distributed's worker threads on CPU.

torch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp). libgomp counts every thread
that belongs to an OpenMP team, in any thread of the process; once that count exceeds the CPUs,
it switches the whole process to its short, throttled busy-wait at barriers, so the main
thread's team goes to sleep and is woken through the kernel around every parallel region.

A gloo process group's worker threads (``pt_gloo_runloop``) run the tensor copies of the
collectives they execute. The first copy above torch's grain size (32,768 elements) gives that
thread its own OpenMP team, and the team lives as long as the process group. Megatron-Core's
``dist_checkpointing.load`` all-gathers its sharding metadata (34 KB for a 180M-parameter model),
so after loading a checkpoint (``ckpt.checkpoint.load_model_weights`` now loads inside
:func:`one_intra_op_thread`) every later forward pass on the CPU slept at its barriers:
100,000 voluntary context switches per three evaluations of 40 HellaSwag questions, and 5-9%
of the time (``bench/RESULTS.md``, "gloo's threads").

A worker thread reads torch's thread count once, the first time it runs a parallel loop: a
collective issued inside :func:`one_intra_op_thread` initialises it with one thread, so it never
starts a team, and it keeps that after the block. On a GPU machine nothing changes.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_intra_op_thread():
    """torch runs with one intra-op thread inside the block (on a machine without CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
