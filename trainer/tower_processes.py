"""The user towers that validation chooses between (``retrieval.user_tower=validated``), trained side by
side: the first in this process, each other one in a worker process, the cores shared between them.

Why: the pooled tower's training is many small steps, whose Python work does not spread over two cores
(on a ~10k-item log, 42 s with one intra-op thread against 38.5 s with two), while the autoencoder's
large products do (50 s against 31 s). One after another, with every core each, they took ~70 s there;
side by side, one core each, the longer of the two. On a small catalog the autoencoder is quick and the
pooled tower's steps do spread (ml-100k: 18.8 s on two threads, 26.9 s on one), so there one after
another is faster, and ``run.tower_workers`` 0 (auto) pairs those two only where the autoencoder's
epoch is large (``SIDE_BY_SIDE_MIN_CELLS``); the sequential tower, the longest, pairs at any size.

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


# run.tower_workers 0 (auto) pairs the pooled tower with the autoencoder alone only where the autoencoder's
# catalog-wide products are a large share of their work: its softmax output per epoch, users x items, at
# least this many cells. Measured one after another against side by side (docs/RESULTS.md, "Towers side by
# side only where they pay"), random protocol: ml-100k (943 x 1,682 = 1.6M cells) 51.2 against 61.9 s, the
# pooled tower's steps there spreading over two cores (18.8 s on two threads, 26.9 s on one); the ~10k-item
# log (4,936 x 8,517 = 42M cells) 110.9 against 92.0 s. With the sequential tower (temporal, leave-one-out)
# they pair at any size: ml-100k temporal 142.5 against 130.9 s.
SIDE_BY_SIDE_MIN_CELLS = 10_000_000


def tower_workers(cfg: TrainConfig, towers: Sequence[str], n_users: int, n_items: int, device: torch.device,
                  ctx: Distributed) -> int:
    """How many of ``towers`` train at once: ``run.tower_workers``, up to the towers compared; 0 = auto:
    one per intra-op thread (``run.threads``, 0 = torch's default; shared out between them), except 1
    where the towers are the pooled one and an autoencoder whose epoch spans fewer than
    ``SIDE_BY_SIDE_MIN_CELLS`` users x items. Always 1 on a GPU or under torch.distributed."""
    if len(towers) < 2 or device.type != "cpu" or ctx.enabled:
        return 1
    if cfg.run.tower_workers:
        return max(1, min(cfg.run.tower_workers, len(towers)))
    if "autoencoder" in towers and "sequential" not in towers:
        users = min(n_users, cfg.retrieval.autoencoder_users_per_epoch or n_users)
        if users * n_items < SIDE_BY_SIDE_MIN_CELLS:
            return 1
    return max(1, min(cfg.run.threads or torch.get_num_threads(), len(towers)))


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
