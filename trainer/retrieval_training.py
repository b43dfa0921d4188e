"""Two-tower training: sampled softmax over in-batch + sampler negatives, early stopping on val NDCG@10.

Reads like the algorithm. Each step takes a batch of users; for each it holds out a few of its
training items as positives and hides them (and a random share of the rest) from the user's
history feature, so the tower learns to predict unseen items from what remains (a denoising
objective, which is exactly the serving situation: predict the next items from the history).
A few user ids are dropped to "unknown" so cold-start users get a meaningful embedding. The loss
is the logQ-corrected sampled softmax over the batch's positives (in-batch negatives) plus the
sampler's negatives, with accidental hits and the user's other training items removed; it is
computed per user (the rows of one user share their scores), not per row. After each epoch the
model ranks all items for the validation users; the best epoch's weights are kept. Id tables
beyond ``retrieval.lazy_adam_above`` rows train with sparse (lazy) Adam, so a step's cost follows
its batch rather than the catalog.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer import metrics
from trainer.baselines import SparseMatrix, ease_all_scores, ease_scores_fit
from trainer.checkpoint import Checkpointer, FitHistory
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.full_ranking import EvalTarget, rank_users
from trainer.features import FeatureTables
from trainer.inputs import item_inputs, user_inputs
from trainer.losses import distillation_loss, full_softmax_loss, grouped_sampled_softmax_loss, optimizer_step
from trainer.models.two_tower import USER_TOWERS, TowerConfig, TwoTower, build_two_tower
from trainer.negatives import make_sampler
from trainer.progress import progress_bar


@dataclass(frozen=True, eq=False)
class Interactions:
    """Training interactions as index arrays (all (N,)): user idx, item idx, timestamp s, rating."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray


def autoencoder_fits(cfg: TrainConfig, n_items: int) -> bool:
    """Whether the autoencoder tower trains on a catalog of ``n_items`` (its softmax spans the catalog)."""
    return n_items <= cfg.retrieval.autoencoder_below


def user_towers(cfg: TrainConfig, n_items: int | None = None) -> tuple[str, ...]:
    """The user towers a run trains, the first the one ``tower_config`` builds: ``retrieval.user_tower``,
    or for "validated" the pooled one, the autoencoder where the catalog (``n_items``, when given) fits
    it, and under the temporal and leave-one-out protocols the sequential one (config.py says why)."""
    if cfg.retrieval.user_tower != "validated":
        return (cfg.retrieval.user_tower,)
    autoencoder = ("autoencoder",) if n_items is None or autoencoder_fits(cfg, n_items) else ()
    return ("pooled", *autoencoder) + (() if cfg.data.protocol == "random" else ("sequential",))


def tower_config(cfg: TrainConfig, spec, tables: FeatureTables) -> TowerConfig:
    return TowerConfig(
        n_users=tables.vocab.n_users, n_items=tables.vocab.n_items,
        user_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.user_categorical),
        n_user_num=spec.user_num_dim,
        item_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.item_categorical),
        n_item_num=spec.item_num_dim, embedding_dim=cfg.retrieval.embedding_dim,
        user_hidden_dims=cfg.retrieval.user_tower_dims, item_hidden_dims=cfg.retrieval.item_tower_dims,
        dropout=cfg.retrieval.dropout, history_table=cfg.retrieval.history_table,
        history_pooling=cfg.retrieval.history_pooling,
        user_tower=next((name for name in user_towers(cfg) if name in USER_TOWERS), "pooled"),
        sequence_length=cfg.retrieval.sequence_length, sequence_blocks=cfg.retrieval.sequence_blocks,
        sequence_heads=cfg.retrieval.sequence_heads)


@torch.no_grad()
def item_embeddings(model: TwoTower, tables: FeatureTables, device: torch.device,
                    batch_size: int = 8192, items: np.ndarray | None = None) -> torch.Tensor:
    """(m+1, D) embeddings of every item index (row 0 is the padding item), or (K, D) of ``items``."""
    items = np.arange(tables.vocab.n_items + 1) if items is None else np.asarray(items, dtype=np.int64)
    rows = []
    for start in range(0, items.size, batch_size):
        rows.append(model.item_tower(**item_inputs(tables, items[start:start + batch_size], device)))
    return torch.cat(rows) if rows else torch.zeros((0, model.item_tower.out_features), device=device)


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

    def entries(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every training entry of ``users`` (U,), user after user: each entry's row in ``users`` (T,), its
        index into ``items`` (T,), and each user's first slot among the T (U,)."""
        starts = self.indptr[users]
        counts = self.indptr[users + 1] - starts                                # (U,)
        offsets = np.cumsum(counts) - counts                                    # each user's first slot
        local = np.repeat(np.arange(users.size), counts)                        # (T,) row of each slot
        return local, np.arange(local.size) + np.repeat(starts - offsets, counts), offsets

    def sample(self, users: np.ndarray, per_user: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``per_user`` random items per user, 0-padded (U, P), and one of their timestamps (U,).

        Each user's items are put in a random order (a uniform key per item, sorted within the user)
        and the first ``per_user`` taken: a uniform random subset without replacement, in random
        order; the timestamp is the first pick's. One vectorised pass for the whole batch.
        """
        users = np.asarray(users, dtype=np.int64)
        local, position, offsets = self.entries(users)
        # Random order within a row: one sort of row + a uniform key in [0, 1). The keys are distinct
        # (almost surely), so this is lexsort((key, row))'s order at about a tenth of its cost.
        order = np.argsort(local + rng.random(local.size))
        rank = np.arange(local.size) - offsets[local]                           # slot within its row
        keep = rank < per_user
        picks, rows, cols = position[order][keep], local[keep], rank[keep]
        positives = np.zeros((users.size, per_user), dtype=np.int64)
        positives[rows, cols] = self.items[picks]
        timestamps = np.zeros(users.size, dtype=np.int64)
        first = cols == 0
        timestamps[rows[first]] = self.timestamps[picks[first]]
        return positives, timestamps


    def next_items(self, users: np.ndarray, per_user: int, history_length: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequential examples: for each user a random cut t in 1..n-1 of their time-ordered items
        (0 when n = 1); the history is the (up to) ``history_length`` items before t, oldest first and
        left-padded with 0 (as the served history), the positives the ``per_user`` items from t on.
        Returns history (U, history_length), positives (U, per_user) 0-padded, timestamps (U,) of item t."""
        users = np.asarray(users, dtype=np.int64)
        starts = self.indptr[users]
        counts = self.indptr[users + 1] - starts                                # (U,) >= 1
        cut = np.where(counts > 1, 1 + np.floor(rng.random(users.size) * (counts - 1)).astype(np.int64), 0)
        back = np.arange(-history_length, 0)[None, :]                           # (1, H) offsets before t
        position = (starts + cut)[:, None] + back                               # (U, H)
        history = np.where(position >= starts[:, None], self.items[np.maximum(position, 0)], 0)
        ahead = (starts + cut)[:, None] + np.arange(per_user)[None, :]          # (U, P)
        limit = (starts + counts)[:, None]
        positives = np.where(ahead < limit, self.items[np.minimum(ahead, self.items.size - 1)], 0)
        return history.astype(np.int64), positives.astype(np.int64), self.timestamps[starts + cut]


@dataclass(frozen=True, eq=False)
class SeenItems:
    """Which training items each user has, asked for a batch of users and candidate items at a time.

    A dense (n+1, m+1) bool matrix when the catalog is small enough to hold one, else a binary
    search over the batch users' rows of the CSR (``tables.seen_indptr`` / ``seen_items``): the
    same answers, at a cost bounded by the batch rather than by users x items.
    """

    indptr: np.ndarray
    items: np.ndarray
    n_items: int
    dense: torch.Tensor | None
    device: torch.device

    @classmethod
    def from_tables(cls, tables: FeatureTables, device: torch.device,
                    max_cells: int = 50_000_000) -> "SeenItems":
        n, m = tables.vocab.n_users, tables.vocab.n_items
        dense = None
        if (n + 1) * (m + 1) <= max_cells:
            dense = torch.zeros((n + 1, m + 1), dtype=torch.bool)
            rows = np.repeat(np.arange(n + 1), np.diff(tables.seen_indptr))
            dense[torch.as_tensor(rows), torch.as_tensor(tables.seen_items)] = True
            dense = dense.to(device)
        return cls(tables.seen_indptr, tables.seen_items, m, dense, device)

    def lookup(self, users: np.ndarray, items: torch.Tensor) -> torch.Tensor:
        """(U, K) bool: True where user ``users[u]`` has the training item ``items[k]``."""
        users = np.asarray(users, dtype=np.int64)
        if self.dense is not None:
            return self.dense[torch.as_tensor(users, device=self.device)][:, items.to(self.device)]
        starts = self.indptr[users]
        counts = self.indptr[users + 1] - starts
        offsets = np.cumsum(counts) - counts
        local = np.repeat(np.arange(users.size, dtype=np.int64), counts)
        position = np.arange(local.size) + np.repeat(starts - offsets, counts)
        width = self.n_items + 1
        keys = local * width + self.items[position]        # sorted: rows in batch order, items sorted
        query = np.arange(users.size, dtype=np.int64)[:, None] * width + items.cpu().numpy()[None, :]
        if keys.size == 0:
            return torch.zeros(query.shape, dtype=torch.bool, device=self.device)
        found = keys[np.minimum(np.searchsorted(keys, query), keys.size - 1)] == query
        return torch.as_tensor(found, device=self.device)


def distillation_teacher(train: Interactions, n_users: int, n_items: int, l2: float, temperature: float,
                         device: torch.device) -> torch.Tensor | None:
    """(n+1, m+1) teacher logits: EASE's scores (fitted on the binary training matrix with ``l2``)
    divided by ``temperature``, -inf on each user's training items and on the padding item (the
    teacher's softmax covers the user's unseen items only). None, with a warning, when the catalog or
    the user x item matrix is too large for EASE (``ease_scores_fit``). Computing a batch's rows from EASE's
    weights instead was tried on a 100k-user, 5k-item log: the tower's validation did not move (0.1488
    either way) and retrieval training took 427 s instead of 99 s (docs/RESULTS.md, "EASE's affinity for
    logs with many users")."""
    n_rows, n_cols = n_users + 1, n_items + 1
    if not ease_scores_fit(n_rows, n_cols, "retrieval distillation"):
        return None
    counted = SparseMatrix.from_coo(train.users, train.items, (n_rows, n_cols))
    # Binary, as the EASE baseline's matrix (trainer.full_ranking.interaction_matrix): a repeated pair counts once.
    matrix = SparseMatrix(counted.indptr, counted.indices, np.ones_like(counted.values), counted.shape)
    logits = ease_all_scores(matrix, l2)                                               # (n+1, m+1)
    logits /= np.float32(temperature)
    # The training items straight from the CSR, in place: no second dense user x item copy.
    logits[matrix.entry_rows(), matrix.indices] = -np.inf
    logits[:, 0] = -np.inf
    return torch.as_tensor(logits).to(device)


def denoised_user_inputs(tables: FeatureTables, users: np.ndarray, positives: np.ndarray, timestamps: np.ndarray,
                         rc, device: torch.device, generator: torch.Generator,
                         history: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The users' tower inputs as training sees them: the held-out positives (U, P) and a random
    ``rc.history_dropout`` share of the rest hidden from the history, and a random ``rc.id_dropout``
    share of the user ids replaced by the unknown id (cold start). A given ``history`` (U, H) (the
    sequential examples of ``UserItems.next_items``, which already hold no positive) replaces the
    training history and is kept whole: holes would break the order the sequential tower reads."""
    inputs = user_inputs(tables, users, timestamps, device, history=history)
    if history is None:
        pos = torch.as_tensor(positives, device=device)                               # (U, P)
        full = inputs["history"]                                                      # (U, H)
        held_out = (full.unsqueeze(2) == pos.unsqueeze(1)).any(dim=2)                 # (U, H, P) -> (U, H)
        dropped = torch.rand(full.shape, generator=generator).to(device) < rc.history_dropout
        inputs["history"] = full.masked_fill(held_out | dropped, 0)
    unknown = torch.rand(len(users), generator=generator).to(device) < rc.id_dropout
    inputs["user_idx"] = inputs["user_idx"].masked_fill(unknown, 0)
    return inputs


@dataclass(frozen=True, eq=False)
class SamplingSetup:
    """What every training step samples from: users' items, negatives, log q, the seen-item lookup."""

    pos_log_q_table: torch.Tensor      # (m+1,) log q of an item appearing as an in-batch negative
    sampler: object                    # negative sampler (trainer.negatives)
    user_items: UserItems
    active_users: np.ndarray           # users with training items
    passes: int                        # permutations of active_users per epoch
    seen: SeenItems
    full_catalog: bool = False         # the loss is a softmax over every item (retrieval.full_softmax_below)

    @classmethod
    def build(cls, cfg: TrainConfig, tables: FeatureTables, train: Interactions,
              device: torch.device) -> "SamplingSetup":
        rc = cfg.retrieval
        counts = torch.as_tensor(tables.item_counts, dtype=torch.float64)
        # log q of an item appearing as an in-batch negative = its share of the training positives.
        pos_log_q_table = (counts.clamp(min=1) / counts.sum()).log().to(torch.float32).to(device)
        sampler = make_sampler(rc.negative_sampling_strategy, tables.vocab.n_items, item_counts=counts,
                               hard_fraction=rc.hard_fraction, seed=cfg.run.seed)
        user_items = UserItems.from_interactions(train, tables.vocab.n_users)
        active_users = user_items.users_with_items()
        # An epoch draws about as many positives as there are training interactions.
        passes = max(1, round(train.users.size / max(active_users.size, 1) / rc.positives_per_user))
        return cls(pos_log_q_table, sampler, user_items, active_users, passes,
                   SeenItems.from_tables(tables, device),
                   full_catalog=tables.vocab.n_items <= rc.full_softmax_below)

    def epoch_order(self, rng: np.random.Generator, ctx: Distributed) -> np.ndarray:
        """This rank's users for one epoch, in a fresh random order."""
        return ctx.shard(np.concatenate([rng.permutation(self.active_users) for _ in range(self.passes)]))


@dataclass(frozen=True, eq=False)
class RetrievalStep:
    """One retrieval loss evaluation and what it computed on the way (joint training reuses it)."""

    loss: torch.Tensor
    inputs: dict[str, torch.Tensor]    # the denoised user inputs (U rows)
    user_emb: torch.Tensor             # (U, D)
    row_user: torch.Tensor             # (R,) each positive row's user
    pos_idx: torch.Tensor              # (R,) item index of each positive row
    unique: torch.Tensor               # (K,) distinct candidate items (positives and sampler negatives)
    inverse: torch.Tensor              # (R + S,) column of each candidate in ``unique``
    unique_emb: torch.Tensor           # (K, D)
    user_seen: torch.Tensor | None     # (U, K) the user trained on the item


def retrieval_step(ddp_model, temperature: torch.Tensor, users: np.ndarray, positives: np.ndarray,
                   timestamps: np.ndarray, setup: SamplingSetup, tables: FeatureTables, cfg: TrainConfig,
                   device: torch.device, generator: torch.Generator, min_negatives: int = 0,
                   teacher: torch.Tensor | None = None, history: np.ndarray | None = None,
                   slot_weight: np.ndarray | None = None) -> RetrievalStep:
    """The retrieval loss for users (U,) with held-out positives (U, P) (0 = padding), drawing at
    least ``min_negatives`` sampler negatives. With ``teacher`` ((n+1, m+1) logits, see
    ``distillation_teacher``) the loss adds ``retrieval.distill_weight`` x the distillation
    cross-entropy of these users, over the whole catalog (``retrieval.distill_items`` "all": the
    tower embeds every item) or over the step's candidate items ("candidates"). ``history`` (U, H)
    replaces the users' training history (sequential examples, ``UserItems.next_items``); ``slot_weight`` (P,)
    weighs each positive column in the loss's mean (the sequential tower's ``retrieval.next_item_decay``)."""
    rc = cfg.retrieval
    inputs = denoised_user_inputs(tables, users, positives, timestamps, rc, device, generator, history)
    pos = torch.as_tensor(positives, device=device)                                   # (U, P)
    row_user, row_slot = torch.nonzero(pos > 0, as_tuple=True)                        # R rows
    pos_idx = pos[row_user, row_slot]                                                 # (R,)
    row_weight = None if slot_weight is None else torch.as_tensor(slot_weight, dtype=torch.float32,
                                                                  device=device)[row_slot]  # (R,)
    if setup.full_catalog:
        return _full_catalog_step(ddp_model, temperature, users, inputs, row_user, pos_idx, setup, tables, cfg,
                                  device, teacher, row_weight)
    neg_idx = None
    n_negatives = max(rc.num_negatives, min_negatives)
    if n_negatives:
        neg_idx = setup.sampler.sample(torch.zeros(1, dtype=torch.int64), n_negatives)[0].to(device)  # (S,)
    wanted = pos_idx if neg_idx is None else torch.cat([pos_idx, neg_idx])            # the C candidate columns
    if teacher is None or rc.distill_items == "candidates":
        unique, inverse = torch.unique(wanted, return_inverse=True)
    else:                                                                             # every item, by index
        unique, inverse = torch.arange(tables.vocab.n_items + 1, device=device), wanted
    user_emb, unique_emb = ddp_model(**inputs, **item_inputs(tables, unique.cpu().numpy(), device))
    pos_emb = unique_emb[inverse[:pos_idx.numel()]]                                   # (R, D)
    neg_emb = None if neg_idx is None else unique_emb[inverse[pos_idx.numel():]]      # (S, D)
    if rc.logq_correction:
        pos_log_q = setup.pos_log_q_table[pos_idx]
        neg_log_q = None if neg_idx is None else setup.sampler.log_q(neg_idx.cpu().unsqueeze(0))[0].to(device)
    else:
        pos_log_q = torch.zeros_like(pos_idx, dtype=torch.float32)
        neg_log_q = None if neg_idx is None else torch.zeros_like(neg_idx, dtype=torch.float32)
    # A candidate the user also trained on is not a negative (the loss keeps each row's own positive).
    user_seen = None if setup.seen is None else setup.seen.lookup(users, unique)      # (U, K)
    loss = grouped_sampled_softmax_loss(user_emb, row_user, pos_emb, neg_emb, temperature, pos_log_q,
                                        neg_log_q, pos_idx, neg_idx,
                                        None if user_seen is None else user_seen[:, inverse],  # (U, C) mask
                                        row_weight=row_weight)
    if teacher is not None:
        # unique_emb holds the candidate items, or the whole catalog in index order.
        logits = user_emb @ unique_emb.T / temperature                                # (U, K)
        loss = loss + rc.distill_weight * distillation_loss(
            logits, teacher[torch.as_tensor(users, device=device)][:, unique])
    return RetrievalStep(loss, inputs, user_emb, row_user, pos_idx, unique, inverse, unique_emb, user_seen)


def _full_catalog_step(ddp_model, temperature: torch.Tensor, users: np.ndarray, inputs: dict[str, torch.Tensor],
                       row_user: torch.Tensor, pos_idx: torch.Tensor, setup: SamplingSetup, tables: FeatureTables,
                       cfg: TrainConfig, device: torch.device, teacher: torch.Tensor | None,
                       row_weight: torch.Tensor | None = None) -> RetrievalStep:
    """``retrieval_step`` with the whole catalog as candidates (``retrieval.full_softmax_below``): the
    item tower embeds every item, each positive competes with every item its user has not seen, and
    the distillation (if any) covers the whole catalog too."""
    unique = torch.arange(tables.vocab.n_items + 1, device=device)                    # every item, by index
    user_emb, unique_emb = ddp_model(**inputs, **item_inputs(tables, unique.cpu().numpy(), device))
    user_seen = setup.seen.lookup(users, unique)                                      # (U, m+1)
    loss = full_softmax_loss(user_emb, row_user, unique_emb, temperature, pos_idx, user_seen, row_weight)
    if teacher is not None:
        logits = user_emb @ unique_emb.T / temperature                                # (U, m+1)
        loss = loss + cfg.retrieval.distill_weight * distillation_loss(
            logits, teacher[torch.as_tensor(users, device=device)])
    return RetrievalStep(loss, inputs, user_emb, row_user, pos_idx, unique, pos_idx, unique_emb, user_seen)


def id_tables(model: TwoTower) -> list[torch.nn.Embedding]:
    """The user-id and item-id tables: one row per user / item, the parameters that grow with the data."""
    tables = [model.user_tower.user_embedding, model.item_tower.item_embedding]
    if model.user_tower.history_embedding is not model.item_tower.item_embedding:
        tables.append(model.user_tower.history_embedding)
    return tables


class LazyAdam:
    """Adam on the dense parameters plus sparse ("lazy") Adam on the id tables.

    A step touches only the id rows its batch used (their gradient rows and moments), so the cost
    of a step follows the batch, not the catalog: dense Adam rewrites every row of a 1M-item table
    on every step. Rows a batch did not use keep their weights and moments until they are used.
    """

    def __init__(self, model: TwoTower, lr: float) -> None:
        tables = id_tables(model)
        sparse_ids = {id(t.weight) for t in tables}
        for table in tables:
            table.sparse = True
        self.sparse = torch.optim.SparseAdam([t.weight for t in tables], lr=lr)
        self.dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in sparse_ids], lr=lr,
                                      foreach=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sparse.zero_grad(set_to_none=set_to_none)
        self.dense.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.sparse.step()
        self.dense.step()

    def state_dict(self) -> dict:
        return {"sparse": self.sparse.state_dict(), "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sparse.load_state_dict(state["sparse"])
        self.dense.load_state_dict(state["dense"])


@torch.no_grad()
def update_average(averaged: TwoTower, model: TwoTower, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model, parameter by parameter (buffers copied)."""
    # One foreach call instead of a lerp per parameter (the same arithmetic, element by element).
    torch._foreach_lerp_(list(averaged.parameters()), list(model.parameters()), 1.0 - decay)
    for mean, buffer in zip(averaged.buffers(), model.buffers()):
        mean.copy_(buffer)


def corrected_decay(decay: float, step: int) -> float:
    """The decay of step ``step`` (1, 2, ...) that makes the moving average bias-corrected, as Adam's
    moments are: the average of the weights of steps 1..step weighted by decay ** age, with no share
    left on the initial weights (step 1 copies the weights). ``decay`` in [0, 1)."""
    return 1.0 - (1.0 - decay) / (1.0 - decay ** step)


def set_learning_rate(optimizer, lr: float) -> None:
    """Sets every parameter group's learning rate (both halves of a LazyAdam)."""
    for opt in (optimizer.sparse, optimizer.dense) if isinstance(optimizer, LazyAdam) else (optimizer,):
        for group in opt.param_groups:
            group["lr"] = lr


def make_optimizer(model: TwoTower, rc, ctx: Distributed):
    """Adam, with sparse (lazy) Adam for the id tables when they hold more than
    ``rc.lazy_adam_above`` rows, there is no weight decay and one process trains."""
    rows = sum(table.num_embeddings for table in id_tables(model))
    if rows > rc.lazy_adam_above and rc.weight_decay == 0 and not ctx.enabled:
        return LazyAdam(model, rc.learning_rate)
    # foreach: each of Adam's operations applied to every parameter in one call, bit-identical to the
    # per-tensor loop that is torch's default on CPU (that loop cost ~1.7 ms a step on ml-100k, profiled).
    return torch.optim.Adam(model.parameters(), lr=rc.learning_rate, weight_decay=rc.weight_decay, foreach=True)


@dataclass
class EarlyStop:
    """Stops after ``patience`` epochs without a gain of ``min_improvement`` (relative) over the score
    that last restarted the count. The caller keeps the best weights whatever the gain; this only
    decides when a slow creep is not worth more epochs (the epoch count is then a ceiling)."""

    patience: int
    min_improvement: float
    reference: float = -math.inf
    stale: int = 0

    def update(self, score: float) -> bool:
        """Records one epoch's validation score; True when training should stop."""
        # A relative gain needs a positive reference; before one, any higher score restarts the count.
        threshold = self.reference * (1.0 + self.min_improvement) if self.reference > 0 else self.reference
        if score > threshold:
            self.reference, self.stale = score, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def start_or_resume(cfg: TrainConfig, checkpointer: Checkpointer | None, stage: str, model: torch.nn.Module,
                    optimizer) -> tuple[int, FitHistory, dict | None, EarlyStop]:
    """A tower's training state before its first epoch: (first epoch, history, best weights, stopper),
    restored from ``stage``'s checkpoint when ``run.resume`` finds one, else a fresh start."""
    history, best_state, start_epoch = FitHistory(), None, 0
    if checkpointer is not None and cfg.run.resume:
        restored = checkpointer.restore(stage, model, optimizer)
        if restored is not None:
            start_epoch, history, best_state = restored
    stopper = EarlyStop(cfg.retrieval.patience, cfg.retrieval.min_improvement, reference=history.best_score)
    return start_epoch, history, best_state, stopper


def record_epoch(history: FitHistory, stopper: EarlyStop, bar, epoch: int, loss: float, ndcg: float,
                 temperature: float, scored: torch.nn.Module, best_state: dict | None) -> tuple[dict | None, bool]:
    """One validated epoch of a tower's training: its record in ``history`` and on the progress bar, a copy
    of ``scored``'s weights when ``ndcg`` is a new best. Returns (the best weights so far, whether to stop)."""
    history.epochs.append({"epoch": epoch, "loss": loss, "val_ndcg@10": ndcg, "temperature": temperature})
    bar.set_postfix(loss=f"{loss:.4f}", val_ndcg=f"{ndcg:.4f}", T=f"{temperature:.3f}")
    stop = stopper.update(ndcg)
    if ndcg > history.best_score:
        history.best_score, history.best_epoch = ndcg, epoch
        best_state = copy.deepcopy(scored.state_dict())
    return best_state, stop


def fit_retrieval(cfg: TrainConfig, spec, tables: FeatureTables, train: Interactions,
                  val: EvalTarget, eval_timestamps: np.ndarray, device: torch.device,
                  ctx: Distributed, checkpointer: Checkpointer | None = None,
                  stage: str = "retrieval") -> tuple[TwoTower, FitHistory]:
    """Trains the two-tower model with ``user_towers(cfg)[0]``; returns the best epoch's model (by
    validation NDCG@10). ``stage`` names its checkpoint and progress bar."""
    rc = cfg.retrieval
    torch.manual_seed(cfg.run.seed)
    model = build_two_tower(tower_config(cfg, spec, tables), init_temperature=rc.temperature,
                            learn_temperature=rc.learn_temperature).to(device)
    ddp_model = ctx.wrap(model, device)
    optimizer = make_optimizer(model, rc, ctx)
    setup = SamplingSetup.build(cfg, tables, train, device)
    teacher = (distillation_teacher(train, tables.vocab.n_users, tables.vocab.n_items, rc.distill_l2,
                                    rc.distill_temperature, device)
               if rc.distill_weight > 0 else None)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    start_epoch, history, best_state, stopper = start_or_resume(cfg, checkpointer, stage, model, optimizer)
    # An exponential moving average of the weights, validated (and kept) instead of the raw ones;
    # a resumed run restarts it from the restored weights. Not with lazy Adam: averaging every row
    # of the id tables each step would make a step's cost follow the catalog again.
    use_average = 0.0 < rc.weight_average < 1.0 and not isinstance(optimizer, LazyAdam)
    averaged = copy.deepcopy(model) if use_average else None
    steps = 0
    sequential = user_towers(cfg)[0] == "sequential"   # next-item examples instead of held-out ones
    # The sequential tower's k-th next item weighs next_item_decay ** k in the loss (1: all alike).
    slot_weight = rc.next_item_decay ** np.arange(rc.positives_per_user) if sequential and \
        rc.next_item_decay != 1.0 else None
    bar = progress_bar(range(start_epoch, rc.epochs), stage, cfg.run.progress and ctx.is_main)
    for epoch in bar:
        order = setup.epoch_order(rng, ctx)
        losses = []
        model.train()
        set_learning_rate(optimizer, rc.learning_rate * rc.lr_decay ** epoch)
        for start in range(0, order.size, rc.batch_size):
            users = order[start:start + rc.batch_size]
            history_override = None
            if sequential:
                history_override, positives, timestamps = setup.user_items.next_items(
                    users, rc.positives_per_user, tables.history.shape[1], rng)
            else:
                positives, timestamps = setup.user_items.sample(users, rc.positives_per_user, rng)
            loss = retrieval_step(ddp_model, model.temperature, users, positives, timestamps, setup, tables, cfg,
                                  device, generator, teacher=teacher, history=history_override,
                                  slot_weight=slot_weight).loss
            optimizer_step(optimizer, loss, lambda value: (
                f"retrieval loss became {value} at epoch {epoch}; lower retrieval.learning_rate "
                f"(now {rc.learning_rate}) or raise retrieval.temperature (now {rc.temperature})"))
            if averaged is not None:
                steps += 1
                update_average(averaged, model, corrected_decay(rc.weight_average, steps))
            losses.append(loss.item())
        scored = model if averaged is None else averaged
        ndcg = validate(scored, tables, val, eval_timestamps, device)
        best_state, stop = record_epoch(history, stopper, bar, epoch, ctx.all_reduce_mean(float(np.mean(losses))),
                                        ndcg, float(model.temperature.detach()), scored, best_state)
        if checkpointer is not None and ctx.is_main:
            checkpointer.save(stage, epoch + 1, model, optimizer, history, best_state)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    for table in id_tables(model):
        table.sparse = False          # inference and export see the plain module
    model.eval()
    return model, history


__all__ = ["Interactions", "autoencoder_fits", "FitHistory", "fit_retrieval", "record_epoch", "start_or_resume",
           "make_score_fn", "item_embeddings", "user_embeddings", "tower_config", "user_towers"]
