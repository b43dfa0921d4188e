"""Two-tower training: sampled softmax over in-batch + sampler negatives, early stopping on val NDCG@10.

Reads like the algorithm. Each step takes a batch of users; for each it holds out a few of its
training items as positives and hides them (and a random share of the rest) from the user's
history feature, so the tower learns to predict unseen items from what remains (a denoising
objective, which is exactly the serving situation: predict the next items from the history).
A few user ids are dropped to "unknown" so cold-start users get a meaningful embedding. The loss
is the logQ-corrected sampled softmax over the batch's positives (in-batch negatives) plus the
sampler's negatives, with accidental hits and the user's other training items removed. After each
epoch the model ranks all items for the validation users; the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from trainer import metrics
from trainer.checkpoint import Checkpointer, FitHistory
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.evaluation import EvalTarget, rank_users
from trainer.features import FeatureTables
from trainer.inputs import item_inputs, user_inputs
from trainer.losses import sampled_softmax_loss
from trainer.models.two_tower import TowerConfig, TwoTower, build_two_tower
from trainer.negatives import make_sampler
from trainer.progress import progress_bar


class NonFiniteLossError(RuntimeError):
    """Training diverged; nothing from this run may be published."""


@dataclass(frozen=True, eq=False)
class Interactions:
    """Training interactions as index arrays (all (N,)): user idx, item idx, timestamp s, rating."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray


def tower_config(cfg: TrainConfig, spec, tables: FeatureTables) -> TowerConfig:
    return TowerConfig(
        n_users=tables.vocab.n_users, n_items=tables.vocab.n_items,
        user_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.user_categorical),
        n_user_num=spec.user_num_dim,
        item_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.item_categorical),
        n_item_num=spec.item_num_dim, embedding_dim=cfg.retrieval.embedding_dim,
        user_hidden_dims=cfg.retrieval.user_tower_dims, item_hidden_dims=cfg.retrieval.item_tower_dims,
        dropout=cfg.retrieval.dropout)


@torch.no_grad()
def item_embeddings(model: TwoTower, tables: FeatureTables, device: torch.device,
                    batch_size: int = 8192) -> torch.Tensor:
    """(m+1, D) embeddings of every item index (row 0 is the padding item)."""
    rows = []
    for start in range(0, tables.vocab.n_items + 1, batch_size):
        idx = np.arange(start, min(start + batch_size, tables.vocab.n_items + 1))
        rows.append(model.item_tower(**item_inputs(tables, idx, device)))
    return torch.cat(rows)


@torch.no_grad()
def user_embeddings(model: TwoTower, tables: FeatureTables, users: np.ndarray, timestamps: np.ndarray,
                    device: torch.device) -> torch.Tensor:
    return model.user_tower(**user_inputs(tables, users, timestamps, device))   # (B, D)


def make_score_fn(model: TwoTower, tables: FeatureTables, eval_timestamps: np.ndarray,
                  device: torch.device):
    """Full-catalog scores for a batch of users: cosine similarity of user and item embeddings."""
    items = item_embeddings(model, tables, device)               # (m+1, D)

    def score(users: np.ndarray) -> np.ndarray:
        user_emb = user_embeddings(model, tables, users, eval_timestamps[users], device)
        return (user_emb @ items.T).cpu().numpy()                  # (B, D) @ (D, m+1)

    return score


def validate(model: TwoTower, tables: FeatureTables, target: EvalTarget, eval_timestamps: np.ndarray,
             device: torch.device, k: int = 10) -> float:
    model.eval()
    ranked = rank_users(make_score_fn(model, tables, eval_timestamps, device), target, k)
    model.train()
    return metrics.ndcg_at_k(ranked, target.truth_rows(), k)


@dataclass(frozen=True, eq=False)
class UserItems:
    """Each user's training items (CSR over user index, (n+2,) indptr) with their timestamps."""

    indptr: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    @classmethod
    def from_interactions(cls, train: Interactions, n_users: int) -> "UserItems":
        order = np.lexsort((train.timestamps, train.users))
        counts = np.bincount(train.users, minlength=n_users + 1)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, train.items[order].astype(np.int64), train.timestamps[order].astype(np.int64))

    def users_with_items(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.indptr) > 0).astype(np.int64)

    def sample(self, users: np.ndarray, per_user: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``per_user`` random items per user, 0-padded (U, P), and one of their timestamps (U,)."""
        positives = np.zeros((users.size, per_user), dtype=np.int64)
        timestamps = np.zeros(users.size, dtype=np.int64)
        for row, user in enumerate(users):
            lo, hi = self.indptr[user], self.indptr[user + 1]
            picks = lo + rng.choice(hi - lo, size=min(per_user, hi - lo), replace=False)
            positives[row, :picks.size] = self.items[picks]
            timestamps[row] = self.timestamps[picks[0]]
        return positives, timestamps


def seen_matrix(tables: FeatureTables, device: torch.device, max_cells: int = 50_000_000) -> torch.Tensor | None:
    """Dense (n+1, m+1) bool "user has this training item", or None for catalogs too large to hold it."""
    n, m = tables.vocab.n_users, tables.vocab.n_items
    if (n + 1) * (m + 1) > max_cells:
        return None
    seen = torch.zeros((n + 1, m + 1), dtype=torch.bool)
    rows = np.repeat(np.arange(n + 1), np.diff(tables.seen_indptr))
    seen[torch.as_tensor(rows), torch.as_tensor(tables.seen_items)] = True
    return seen.to(device)


def train_step(model, ddp_model, users: np.ndarray, positives: np.ndarray, timestamps: np.ndarray,
               sampler, pos_log_q_table: torch.Tensor, seen: torch.Tensor | None,
               tables: FeatureTables, cfg: TrainConfig, device: torch.device,
               generator: torch.Generator) -> torch.Tensor:
    """One loss evaluation for users (U,) with held-out positives (U, P) (0 = padding)."""
    rc = cfg.retrieval
    inputs = user_inputs(tables, users, timestamps, device)
    pos = torch.as_tensor(positives, device=device)                                   # (U, P)
    history = inputs["history"]                                                       # (U, H)
    held_out = (history.unsqueeze(2) == pos.unsqueeze(1)).any(dim=2)                  # (U, H, P) -> (U, H)
    dropped = torch.rand(history.shape, generator=generator).to(device) < rc.history_dropout
    inputs["history"] = history.masked_fill(held_out | dropped, 0)
    unknown = torch.rand(len(users), generator=generator).to(device) < rc.id_dropout
    inputs["user_idx"] = inputs["user_idx"].masked_fill(unknown, 0)
    row_user, row_slot = torch.nonzero(pos > 0, as_tuple=True)                        # R rows
    pos_idx = pos[row_user, row_slot]                                                 # (R,)
    neg_idx = None
    if rc.num_negatives:
        neg_idx = sampler.sample(torch.zeros(1, dtype=torch.int64), rc.num_negatives)[0].to(device)  # (S,)
    wanted = pos_idx if neg_idx is None else torch.cat([pos_idx, neg_idx])
    unique, inverse = torch.unique(wanted, return_inverse=True)
    user_emb, unique_emb = ddp_model(**inputs, **item_inputs(tables, unique.cpu().numpy(), device))
    pos_emb = unique_emb[inverse[:pos_idx.numel()]]                                   # (R, D)
    neg_emb = None if neg_idx is None else unique_emb[inverse[pos_idx.numel():]]      # (S, D)
    if rc.logq_correction:
        pos_log_q = pos_log_q_table[pos_idx]
        neg_log_q = None if neg_idx is None else sampler.log_q(neg_idx.cpu().unsqueeze(0))[0].to(device)
    else:
        pos_log_q = torch.zeros_like(pos_idx, dtype=torch.float32)
        neg_log_q = None if neg_idx is None else torch.zeros_like(neg_idx, dtype=torch.float32)
    row_users = torch.as_tensor(users, device=device)[row_user]                       # (R,)

    def other_training_items(candidates: torch.Tensor) -> torch.Tensor:
        # A candidate the row's user also trained on is not a negative (the loss keeps the row's own positive).
        if seen is None:
            return torch.zeros_like(candidates, dtype=torch.bool)
        return seen[row_users.unsqueeze(1), candidates]                               # (R, C)

    return sampled_softmax_loss(user_emb[row_user], pos_emb, neg_emb, model.temperature, pos_log_q,
                                neg_log_q, pos_idx, neg_idx, user_seen_mask_fn=other_training_items)


def fit_retrieval(cfg: TrainConfig, spec, tables: FeatureTables, train: Interactions,
                  val: EvalTarget, eval_timestamps: np.ndarray, device: torch.device,
                  ctx: Distributed, checkpointer: Checkpointer | None = None) -> tuple[TwoTower, FitHistory]:
    """Trains the two-tower model; returns the best epoch's model (by validation NDCG@10)."""
    rc = cfg.retrieval
    torch.manual_seed(cfg.run.seed)
    model = build_two_tower(tower_config(cfg, spec, tables), init_temperature=rc.temperature,
                            learn_temperature=rc.learn_temperature).to(device)
    ddp_model = ctx.wrap(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=rc.learning_rate, weight_decay=rc.weight_decay)
    counts = torch.as_tensor(tables.item_counts, dtype=torch.float64)
    # log q of an item appearing as an in-batch negative = its share of the training positives.
    pos_log_q_table = (counts.clamp(min=1) / counts.sum()).log().to(torch.float32).to(device)
    sampler = make_sampler(rc.negative_sampling_strategy, tables.vocab.n_items, item_counts=counts,
                           hard_fraction=rc.hard_fraction, seed=cfg.run.seed)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    user_items = UserItems.from_interactions(train, tables.vocab.n_users)
    active_users = user_items.users_with_items()
    passes = max(1, round(train.users.size / max(active_users.size, 1) / rc.positives_per_user))
    seen = seen_matrix(tables, device)
    history, best_state, start_epoch = FitHistory(), None, 0
    if checkpointer is not None and cfg.run.resume:
        restored = checkpointer.restore("retrieval", model, optimizer)
        if restored is not None:
            start_epoch, history, best_state = restored
    stale = 0
    bar = progress_bar(range(start_epoch, rc.epochs), "retrieval", cfg.run.progress and ctx.is_main)
    for epoch in bar:
        # An epoch draws about as many positives as there are training interactions.
        order = ctx.shard(np.concatenate([rng.permutation(active_users) for _ in range(passes)]))
        losses = []
        model.train()
        for start in range(0, order.size, rc.batch_size):
            users = order[start:start + rc.batch_size]
            positives, timestamps = user_items.sample(users, rc.positives_per_user, rng)
            loss = train_step(model, ddp_model, users, positives, timestamps, sampler, pos_log_q_table,
                              seen, tables, cfg, device, generator)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"retrieval loss became {loss.item()} at epoch {epoch}; "
                                         f"lower retrieval.learning_rate (now {rc.learning_rate}) or raise "
                                         f"retrieval.temperature (now {rc.temperature})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        ndcg = validate(model, tables, val, eval_timestamps, device)
        record = {"epoch": epoch, "loss": ctx.all_reduce_mean(float(np.mean(losses))), "val_ndcg@10": ndcg,
                  "temperature": float(model.temperature.detach())}
        history.epochs.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val_ndcg=f"{ndcg:.4f}", T=f"{record['temperature']:.3f}")
        if ndcg > history.best_score:
            history.best_score, history.best_epoch, stale = ndcg, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if checkpointer is not None and ctx.is_main:
            checkpointer.save("retrieval", epoch + 1, model, optimizer, history, best_state)
        if stale >= rc.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


__all__ = ["Interactions", "FitHistory", "NonFiniteLossError", "fit_retrieval", "make_score_fn",
           "item_embeddings", "user_embeddings", "tower_config"]
