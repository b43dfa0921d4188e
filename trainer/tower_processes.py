"""The user towers that validation chooses between (``retrieval.user_tower=validated``), trained side by
side: the first in this process, each other one in a worker process, the cores shared between them.

Why: the pooled tower's training is many small steps, whose Python work does not spread over two cores
(on a ~10k-item log, 42 s with one intra-op thread against 38.5 s with two), while the autoencoder's
large products do (50 s against 31 s). One after another, with every core each, they took ~70 s there;
side by side, one core each, the longer of the two.

Each fit seeds itself and runs with deterministic kernels, as in this process, so a tower trained in a
worker is the one this process would train with the same number of threads (tested). Workers start
fresh interpreters ("spawn"): forking a process whose OpenMP thread pool is running can hang the child.
Only on CPU and without torch.distributed (each rank trains its share of every tower there).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from trainer.config import TrainConfig
from trainer.distributed import Distributed

log = logging.getLogger(__name__)


def tower_workers(cfg: TrainConfig, n_towers: int, device: torch.device, ctx: Distributed) -> int:
    """How many towers train at once: ``run.tower_workers``, 0 = one per intra-op thread up to the towers compared
    (the intra-op threads ``run.threads``, 0 = torch's default, are shared out between them); 1 on a GPU
    or under torch.distributed."""
    if n_towers < 2 or device.type != "cpu" or ctx.enabled:
        return 1
    wanted = cfg.run.tower_workers or (cfg.run.threads or torch.get_num_threads())
    return max(1, min(wanted, n_towers))


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker(threads: int, log_level: int) -> None:
    """A worker's start: the logging the trainer's command line sets up, its share of the cores."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)


def _fit_in_worker(fit: Callable[..., tuple[Any, Any]], args: tuple, kwargs: dict[str, Any]) -> bytes:
    """The fit, in a worker; its (model, history) pickled here into plain bytes. Handed over as they are,
    torch's multiprocessing would share the weights through /dev/shm, which containers keep small (64 MB
    by default in Docker; an autoencoder on 100,000 items is ~0.5 GB)."""
    from trainer.training import deterministic_kernels

    with deterministic_kernels(torch.device("cpu")):
        model, history = fit(*args, **kwargs)
    return pickle.dumps((model.cpu().eval(), history), protocol=pickle.HIGHEST_PROTOCOL)


def fit_side_by_side(fits: Sequence[tuple[Callable[..., tuple[Any, Any]], tuple, dict[str, Any]]],
                     workers: int) -> list[tuple[Any, Any]]:
    """(model, history) of each ``fit(*args, **kwargs)`` in ``fits``, in their order: the first here, the
    others in ``workers - 1`` worker processes meanwhile, every fit with an equal share of this process's
    intra-op threads (at least one). ``workers`` 1: one after another here, each with every thread."""
    if workers <= 1 or len(fits) < 2:
        return [fit(*args, **kwargs) for fit, args, kwargs in fits]
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(max_workers=min(workers - 1, len(fits) - 1),
                               mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads, logging.getLogger().getEffectiveLevel()))
    with pool:
        pending: list[Future] = [pool.submit(_fit_in_worker, fit, args, kwargs) for fit, args, kwargs in fits[1:]]
        try:
            with intra_op_threads(threads):
                fit, args, kwargs = fits[0]
                here = fit(*args, **kwargs)
            # Bytes this run's own worker wrote into the pipe a moment ago: nothing here reads the artifact volume.
            return [here, *(pickle.loads(future.result()) for future in pending)]
        except BaseException:
            for future in pending:
                future.cancel()
            raise
