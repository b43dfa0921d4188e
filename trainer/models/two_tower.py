"""The retrieval model: a user tower and an item tower that share the item-id embedding table.

Two user towers take the same inputs: ``UserTower`` pools the history as a set (mean or attention);
``SequentialUserTower`` (trainer/models/sequential.py) reads it as a sequence.

Both towers return L2-normalised (·, D) embeddings, D = ``embedding_dim``; retrieval scores are their
inner products. The user tower pools the user's recent history through the item tower's own id
table, so interactions recorded online move the user embedding without retraining. Losses and
negative sampling live in the training wrapper (``trainer.losses``, ``trainer.negatives``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainer.models.layers import (CategoricalEmbedding, check_dropout, check_feature_sizes, check_int,
                                   check_int_tuple, init_embedding, mlp, padded_mean)
from trainer.models.sequential import SequentialUserTower
from trainer.models.temporal import CalendarEmbedding

# Unit vectors bound the logits to [-1 / T, 1 / T]; below 0.01 (|logit| <= 100, CLIP's cap) the
# softmax saturates and a learned temperature would only chase a few hard examples.
MIN_TEMPERATURE = 0.01
HISTORY_TABLES = ("shared", "separate")
HISTORY_POOLINGS = ("mean", "attention")
USER_TOWERS = ("pooled", "sequential")
MAX_ATTENTION_HISTORY = 512            # recency biases learned for at most this many history slots


@dataclass(frozen=True)
class TowerConfig:
    """Sizes of both towers. Cardinalities include the OOV row 0; every embedding is ``embedding_dim`` wide.

    ``user_hidden_dims`` / ``item_hidden_dims`` are each tower's ReLU layers before its final linear
    projection to ``embedding_dim``.
    """

    n_users: int
    n_items: int
    user_cat_cardinalities: tuple[int, ...]
    n_user_num: int
    item_cat_cardinalities: tuple[int, ...]
    n_item_num: int
    embedding_dim: int = 64
    user_hidden_dims: tuple[int, ...] = (128, 64)
    item_hidden_dims: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    # "shared": the history pools the item tower's id table; "separate": its own (input) id table,
    # word2vec-style in/out vectors, so a history item need not look like the items it predicts.
    history_table: str = "shared"
    # "mean": the masked mean of the history rows; "attention": a learned, mask-aware weighting of
    # them (each row's score from its embedding plus a learned bias per recency position).
    history_pooling: str = "mean"
    # "pooled": UserTower (the history pooled as a set); "sequential": SequentialUserTower (causal
    # self-attention over the last sequence_length history items, trainer/models/sequential.py).
    user_tower: str = "pooled"
    sequence_length: int = 20
    sequence_blocks: int = 2
    sequence_heads: int = 2

    def __post_init__(self) -> None:
        check_feature_sizes(self.n_users, self.n_items, self.user_cat_cardinalities, self.n_user_num,
                            self.item_cat_cardinalities, self.n_item_num)
        check_int("embedding_dim", self.embedding_dim, 1)
        check_int_tuple("user_hidden_dims", self.user_hidden_dims, 1, allow_empty=False)
        check_int_tuple("item_hidden_dims", self.item_hidden_dims, 1, allow_empty=False)
        check_dropout(self.dropout)
        if self.history_table not in HISTORY_TABLES:
            raise ValueError(f"history_table must be one of {HISTORY_TABLES}, got {self.history_table!r}")
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ValueError(f"history_pooling must be one of {HISTORY_POOLINGS}, got {self.history_pooling!r}")
        if self.user_tower not in USER_TOWERS:
            raise ValueError(f"user_tower must be one of {USER_TOWERS}, got {self.user_tower!r}")
        check_int("sequence_length", self.sequence_length, 1)
        check_int("sequence_blocks", self.sequence_blocks, 1)
        check_int("sequence_heads", self.sequence_heads, 1)
        if self.embedding_dim % self.sequence_heads:
            raise ValueError(f"embedding_dim must be divisible by sequence_heads={self.sequence_heads}, "
                             f"got {self.embedding_dim}")


def make_item_embedding(config: TowerConfig) -> nn.Embedding:
    """The item-id table both towers share: (n_items + 1, D), row 0 (OOV / padding) fixed at zero."""
    return init_embedding(nn.Embedding(config.n_items + 1, config.embedding_dim, padding_idx=0))


def _check_item_embedding(config: TowerConfig, item_embedding: nn.Embedding) -> None:
    expected = (config.n_items + 1, config.embedding_dim)
    if tuple(item_embedding.weight.shape) != expected or item_embedding.padding_idx != 0:
        raise ValueError(f"item_embedding must be an nn.Embedding of shape {expected} with padding_idx 0, "
                         f"got shape {tuple(item_embedding.weight.shape)} padding_idx {item_embedding.padding_idx!r}")


class AttentionPooling(nn.Module):
    """Mask-aware learned weighting of a 0-padded history (B, H, D) -> (B, D).

    Each position's score is a small MLP of its embedding plus a learned bias for its distance from
    the most recent slot (histories are right-aligned, the newest item last); the weights are a
    softmax over the unmasked positions. An all-padding history pools to zeros, like the mean.
    """

    def __init__(self, dim: int, max_length: int = MAX_ATTENTION_HISTORY) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))
        self.recency = nn.Parameter(torch.zeros(max_length))

    def forward(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        length = embeddings.shape[1]
        if length > self.recency.shape[0]:
            raise ValueError(f"history length must be <= {self.recency.shape[0]} for attention pooling, got {length}")
        scores = self.score(embeddings).squeeze(-1) + self.recency[:length].flip(0).unsqueeze(0)  # (B, H)
        scores = scores.masked_fill(~mask, -1e9)
        weights = torch.softmax(scores, dim=1) * mask.to(embeddings.dtype)                 # (B, H), 0 if all masked
        return (weights.unsqueeze(-1) * embeddings).sum(dim=1)                              # (B, D)


class UserTower(nn.Module):
    """User inputs (docs/ARCHITECTURE.md, "Model inputs") -> (B, D) L2-normalised embeddings.

    Index 0 of the user-id table is the unknown user: the training wrapper maps ids to 0 with a small
    probability so that row learns to stand for users known only by features and history.
    """

    def __init__(self, config: TowerConfig, item_embedding: nn.Embedding) -> None:
        super().__init__()
        _check_item_embedding(config, item_embedding)
        dim = config.embedding_dim
        self.user_embedding = init_embedding(nn.Embedding(config.n_users + 1, dim))
        self.item_embedding = item_embedding
        self.history_embedding = (item_embedding if config.history_table == "shared"
                                  else make_item_embedding(config))
        self.attention = AttentionPooling(dim) if config.history_pooling == "attention" else None
        self.categorical = CategoricalEmbedding(config.user_cat_cardinalities, dim)
        self.calendar = CalendarEmbedding(dim)
        # user id + categorical + numeric + pooled history + calendar
        input_dim = dim + self.categorical.output_dim + config.n_user_num + dim + self.calendar.output_dim
        self.mlp = mlp(input_dim, config.user_hidden_dims, config.dropout)
        self.projection = nn.Linear(config.user_hidden_dims[-1], dim)

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor,
                timestamp: Tensor) -> Tensor:
        if self.attention is None:
            pooled = padded_mean(self.history_embedding, history)          # (B, H) -> (B, D)
        else:
            pooled = self.attention(self.history_embedding(history), history != 0)  # (B, H, D) -> (B, D)
        features = torch.cat([
            self.user_embedding(user_idx),  # (B, D)
            self.categorical(user_cat),  # (B, Cu * D)
            user_num,  # (B, Nu)
            pooled,  # (B, D)
            self.calendar(timestamp),  # (B, 2D + 1)
        ], dim=1)
        return F.normalize(self.projection(self.mlp(features)), dim=1)  # (B, D)


class ItemTower(nn.Module):
    """Item inputs (item_idx (N,), item_cat (N, Ci), item_num (N, Ni)) -> (N, D) L2-normalised embeddings."""

    def __init__(self, config: TowerConfig, item_embedding: nn.Embedding) -> None:
        super().__init__()
        _check_item_embedding(config, item_embedding)
        dim = config.embedding_dim
        self.item_embedding = item_embedding
        self.categorical = CategoricalEmbedding(config.item_cat_cardinalities, dim)
        input_dim = dim + self.categorical.output_dim + config.n_item_num
        self.mlp = mlp(input_dim, config.item_hidden_dims, config.dropout)
        self.projection = nn.Linear(config.item_hidden_dims[-1], dim)

    @property
    def out_features(self) -> int:
        return self.projection.out_features

    def forward(self, item_idx: Tensor, item_cat: Tensor, item_num: Tensor) -> Tensor:
        features = torch.cat([self.item_embedding(item_idx), self.categorical(item_cat), item_num],
                             dim=1)  # (N, D + Ci * D + Ni)
        return F.normalize(self.projection(self.mlp(features)), dim=1)  # (N, D)


class TwoTower(nn.Module):
    """Both towers plus the softmax temperature, held as log T so it stays positive while learned."""

    def __init__(self, user_tower: nn.Module, item_tower: ItemTower, init_temperature: float = 0.05,
                 learn_temperature: bool = True) -> None:
        super().__init__()
        if user_tower.item_embedding is not item_tower.item_embedding:
            raise ValueError("user_tower and item_tower must share one item_embedding table, got two tables")
        if (not isinstance(init_temperature, (int, float)) or isinstance(init_temperature, bool)
                or not MIN_TEMPERATURE <= init_temperature < math.inf):
            raise ValueError(f"init_temperature must be a finite float >= {MIN_TEMPERATURE}, got {init_temperature!r}")
        self.user_tower = user_tower
        self.item_tower = item_tower
        log_temperature = torch.tensor(math.log(init_temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)

    @property
    def temperature(self) -> Tensor:
        """The softmax temperature T (0-d), never below MIN_TEMPERATURE."""
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor, timestamp: Tensor,
                item_idx: Tensor, item_cat: Tensor, item_num: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D) user and (N, D) item embeddings."""
        return (self.user_tower(user_idx, user_cat, user_num, history, timestamp),
                self.item_tower(item_idx, item_cat, item_num))

    @staticmethod
    def score(user_emb: Tensor, item_emb: Tensor) -> Tensor:
        """Cosine similarities (B, D) x (N, D) -> (B, N); the loss divides them by the temperature."""
        return user_emb @ item_emb.T  # (B, D) @ (D, N) -> (B, N)


def build_two_tower(config: TowerConfig, init_temperature: float = 0.05, learn_temperature: bool = True) -> TwoTower:
    """Both towers around one shared item-id table; the user tower is ``config.user_tower``'s."""
    item_embedding = make_item_embedding(config)
    if config.user_tower == "sequential":
        history = item_embedding if config.history_table == "shared" else make_item_embedding(config)
        user_tower: nn.Module = SequentialUserTower(config, item_embedding, history)
    else:
        user_tower = UserTower(config, item_embedding)
    return TwoTower(user_tower, ItemTower(config, item_embedding),
                    init_temperature=init_temperature, learn_temperature=learn_temperature)
