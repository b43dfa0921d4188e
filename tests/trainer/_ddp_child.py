"""Run by torchrun in test_distributed.py: trains both stages on small data and writes a digest
of each rank's final weights, so the test can check that DDP kept the ranks identical."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from trainer import prepare, training
from trainer.progress import Timings
from trainer.config import load_config
from trainer.data.synthetic import generate
from trainer.distributed import init_distributed


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, ["retrieval.epochs=2", "retrieval.embedding_dim=8", "retrieval.user_tower_dims=16",
                             "retrieval.item_tower_dims=16", "retrieval.num_negatives=16", "ranking.epochs=1",
                             "ranking.deep_dims=16", "ranking.candidates=20", "features.history_length=10",
                             "run.progress=false", "retrieval.batch_size=16", "ranking.batch_size=64",
                             f"multitask.mode={mode}"])
    ctx = init_distributed(torch.device("cpu"))
    prep = prepare.prepare(cfg, generate(60, 80, 1500, seed=5))
    run, _ = training.train_models(cfg, prep, torch.device("cpu"), ctx, Timings())
    (out / f"rank{ctx.rank}.txt").write_text(f"{ctx.world_size} {digest(run.two_tower)} {digest(run.ranker)}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "separate")
