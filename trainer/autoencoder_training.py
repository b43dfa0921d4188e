"""Training of the autoencoder tower (trainer/models/autoencoder.py): Mult-DAE's objective.

Each step takes a batch of users. The input is each user's served history (the feature table's most
recent ``features.history_length`` training items, as the services read it from Redis), with
``retrieval.autoencoder_dropout`` of it hidden; the target is every training item of the user. The
loss is the multinomial log-likelihood of those items under a softmax over the whole catalog
(-sum over the user's items of log softmax(logits)), averaged over the users: the model learns to
rebuild a user's whole row from a damaged part of it. After each epoch it ranks every item for the
validation users; the best epoch's weights are kept, and training stops as the pooled tower's does
(``retrieval.epochs`` as a ceiling, ``retrieval.patience``, ``retrieval.min_improvement``). An epoch
takes at most ``retrieval.autoencoder_users_per_epoch`` users, drawn afresh each epoch.

The softmax covers the catalog, so a step costs (users x items x hidden): ``retrieval.autoencoder_below``
caps the catalogs it trains on (``trainer.retrieval_training.autoencoder_fits``).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.checkpoint import Checkpointer, FitHistory
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.features import FeatureTables
from trainer.full_ranking import EvalTarget
from trainer.inputs import user_inputs
from trainer.losses import optimizer_step
from trainer.models.autoencoder import AutoencoderTwoTower
from trainer.progress import progress_bar
from trainer.retrieval_training import Interactions, UserItems, record_epoch, start_or_resume, validate


def target_rows(user_items: UserItems, users: np.ndarray, n_items: int, device: torch.device) -> torch.Tensor:
    """Each user's training items as a multi-hot row (U, m+1) (repeats count once; column 0 stays 0)."""
    users = np.asarray(users, dtype=np.int64)
    rows, position, _ = user_items.entries(users)
    target = torch.zeros((users.size, n_items + 1), device=device)
    target[torch.as_tensor(rows, device=device), torch.as_tensor(user_items.items[position], device=device)] = 1.0
    return target


def multinomial_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_i target_i log softmax(logits)_i per user, averaged over users; column 0 (padding) is left
    out of the softmax."""
    log_probs = torch.log_softmax(logits[:, 1:], dim=1)
    return -(log_probs * target[:, 1:]).sum(dim=1).mean()


def fit_autoencoder(cfg: TrainConfig, tables: FeatureTables, train: Interactions, val: EvalTarget,
                    eval_timestamps: np.ndarray, device: torch.device, ctx: Distributed,
                    checkpointer: Checkpointer | None = None,
                    stage: str = "retrieval") -> tuple[AutoencoderTwoTower, FitHistory]:
    """Trains the autoencoder tower; returns the best epoch's model (by validation NDCG@10)."""
    rc = cfg.retrieval
    n_items = tables.vocab.n_items
    torch.manual_seed(cfg.run.seed)
    model = AutoencoderTwoTower(n_items, rc.autoencoder_hidden, rc.autoencoder_dropout).to(device)
    ddp_model = ctx.wrap(model, device)
    # fused: one kernel per step over all parameters; on a 10k-item catalog's ~10M weights it takes 5 ms
    # a step against foreach's 28 (2 threads), the same algorithm.
    optimizer = torch.optim.Adam(model.parameters(), lr=rc.autoencoder_learning_rate, fused=True)
    user_items = UserItems.from_interactions(train, tables.vocab.n_users)
    active = user_items.users_with_items()
    rng = np.random.default_rng(cfg.run.seed)
    start_epoch, history, best_state, stopper = start_or_resume(cfg, checkpointer, stage, model, optimizer)
    bar = progress_bar(range(start_epoch, rc.epochs), stage, cfg.run.progress and ctx.is_main)
    for epoch in bar:
        order = rng.permutation(active)
        if rc.autoencoder_users_per_epoch:
            order = order[:rc.autoencoder_users_per_epoch]
        order = ctx.shard(order)
        losses = []
        model.train()
        for start in range(0, order.size, rc.autoencoder_batch_size):
            users = order[start:start + rc.autoencoder_batch_size]
            inputs = user_inputs(tables, users, np.zeros(users.size, dtype=np.int64), device)
            _user_vectors, logits = ddp_model(**inputs)                        # (U, H+1), (U, m+1)
            loss = multinomial_loss(logits, target_rows(user_items, users, n_items, device))
            optimizer_step(optimizer, loss, lambda value: (
                f"autoencoder loss became {value} at epoch {epoch}; lower retrieval.autoencoder_learning_rate "
                f"(now {rc.autoencoder_learning_rate})"))
            losses.append(loss.item())
        ndcg = validate(model, tables, val, eval_timestamps, device)
        best_state, stop = record_epoch(history, stopper, bar, epoch, ctx.all_reduce_mean(float(np.mean(losses))),
                                        ndcg, 1.0, model, best_state)
        if checkpointer is not None and ctx.is_main:
            checkpointer.save(stage, epoch + 1, model, optimizer, history, best_state)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


__all__ = ["fit_autoencoder", "multinomial_loss", "target_rows"]
