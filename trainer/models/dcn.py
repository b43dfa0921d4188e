"""The ranker: DCN-V2 (a cross network and a deep MLP) over user, item and retrieval features.

Rows are aligned: row n holds one candidate item and its user's inputs (the caller repeats the user
row per candidate). Two heads share the network: a click/consumption logit and a bounded rating.
The cross layer is x_{l+1} = x0 * (W x_l + b) + x_l with W full (d, d) or low-rank U V^T.

With ``affinity_rank`` r > 0 the ranker also holds fixed user and item factors (buffers, set by the
trainer: a rank-r factorisation of EASE's user x item scores on the training log) and their dot
product for the row's user and candidate, standardised, joins x0 and, through a wide weight, the
CTR logit. The inputs are unchanged: the factors are looked up by ``user_idx`` and ``item_idx``,
so they hold each user's training history as of the training run; an unknown user (index 0) has
zero factors, a constant affinity, and is ranked as without it.

With ``n_genres`` G > 0 (the first G columns of ``item_num`` are the item's genre flags) the ranker
also holds each item's genre flags (a fixed buffer, set by the trainer) and derives, from the inputs
it already takes, the user x item genre cross: the genre profile of the user's recent history
(the mean of its items' flags) times the candidate's flags, per genre and summed.

With ``transition_k`` K > 0 the ranker holds each item's K strongest successors in the training log
(fixed buffers, set by the trainer, ``trainer/transitions.py``: which items users took soon after it, and
how often) and, for each of the user's ``transition_items`` L most recent history items, reads the
candidate's weight in that item's successor list (0 when absent): L standardised channels that join x0 and,
through wide weights, the CTR logit. They come from the ``history`` input, the one the service reads from
the feature store on every request, so an interaction recorded a moment ago moves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.models.layers import (CategoricalEmbedding, check_dropout, check_feature_sizes, check_finite,
                                   check_int, check_int_tuple, init_embedding, masked_mean, mlp,
                                   padded_mean)
from trainer.models.temporal import CalendarEmbedding

STRUCTURES = ("stacked", "parallel")


@dataclass(frozen=True)
class DCNConfig:
    """Sizes of the ranker. ``low_rank`` None = full-rank cross weights; ratings lie in [rating_min, rating_max]."""

    n_users: int
    n_items: int
    user_cat_cardinalities: tuple[int, ...]
    n_user_num: int
    item_cat_cardinalities: tuple[int, ...]
    n_item_num: int
    embedding_dim: int = 16
    n_cross_layers: int = 3
    low_rank: int | None = None
    deep_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    structure: str = "stacked"
    rating_min: float = 1.0
    rating_max: float = 5.0
    recent_items: int = 20            # the ranker pools only the most recent history items (serving cost)
    affinity_rank: int = 0            # width of the stored user / item affinity factors; 0 = none
    affinity_channels: int = 1        # affinities held side by side, each of width affinity_rank
    n_genres: int = 0                 # genre flags leading item_num, crossed with the history's profile; 0 = none
    transition_k: int = 0             # successors held per item; 0 = no transition channels
    transition_items: int = 0         # the most recent history items whose successor lists are read

    def __post_init__(self) -> None:
        check_feature_sizes(self.n_users, self.n_items, self.user_cat_cardinalities, self.n_user_num,
                            self.item_cat_cardinalities, self.n_item_num)
        check_int("embedding_dim", self.embedding_dim, 1)
        check_int("n_cross_layers", self.n_cross_layers, 1)
        check_int("recent_items", self.recent_items, 1)
        check_int("affinity_rank", self.affinity_rank, 0)
        check_int("affinity_channels", self.affinity_channels, 1)
        check_int("n_genres", self.n_genres, 0)
        check_int("transition_k", self.transition_k, 0)
        check_int("transition_items", self.transition_items, 0)
        if bool(self.transition_k) != bool(self.transition_items):
            raise ValueError(f"transition_k and transition_items must be both 0 or both >= 1, got "
                             f"{self.transition_k} and {self.transition_items}")
        if self.transition_items > self.recent_items:
            raise ValueError(f"transition_items must be <= recent_items={self.recent_items}, got "
                             f"{self.transition_items}")
        if self.n_genres > self.n_item_num:
            raise ValueError(f"n_genres must be <= n_item_num={self.n_item_num}, got {self.n_genres}")
        if self.low_rank is not None:
            check_int("low_rank", self.low_rank, 1)
        check_int_tuple("deep_dims", self.deep_dims, 1, allow_empty=False)
        check_dropout(self.dropout)
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {self.structure!r}")
        low = check_finite("rating_min", self.rating_min)
        high = check_finite("rating_max", self.rating_max)
        if not low <= high:        # equal: one rating value (implicit feedback), which the head then predicts
            raise ValueError(f"rating_max must be >= rating_min ({low!r}), got {high!r}")


class CrossNetV2(nn.Module):
    """``n_layers`` cross layers on (N, d) inputs: x_{l+1} = x0 * (W_l x_l + b_l) + x_l.

    Full rank holds W_l as (d, d); ``low_rank`` r holds W_l = U_l V_l^T with U_l, V_l of shape (d, r),
    d * d -> 2 * d * r weights per layer.
    """

    def __init__(self, input_dim: int, n_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        check_int("input_dim", input_dim, 1)
        check_int("n_layers", n_layers, 1)
        if low_rank is None:
            self.layers = nn.ModuleList(nn.Linear(input_dim, input_dim) for _ in range(n_layers))
        else:
            check_int("low_rank", low_rank, 1)
            # V^T: d -> r without bias, then U: r -> d with the layer's bias b
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(input_dim, low_rank, bias=False), nn.Linear(low_rank, input_dim))
                for _ in range(n_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # (N, d) * (N, d) + (N, d)
        return x


class DCNRanker(nn.Module):
    """Aligned user + item rows and the retrieval score -> (ctr_logit (N,), rating (N,))."""

    def __init__(self, config: DCNConfig) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.rating_min = config.rating_min
        self.rating_range = config.rating_max - config.rating_min
        self.structure = config.structure
        self.recent_items = config.recent_items
        self.user_embedding = init_embedding(nn.Embedding(config.n_users + 1, dim))
        # One item table serves the candidate and its user's history (row 0 = padding / OOV).
        self.item_embedding = init_embedding(nn.Embedding(config.n_items + 1, dim, padding_idx=0))
        self.user_categorical = CategoricalEmbedding(config.user_cat_cardinalities, dim)
        self.item_categorical = CategoricalEmbedding(config.item_cat_cardinalities, dim)
        self.calendar = CalendarEmbedding(dim)
        self.affinity_rank = config.affinity_rank
        self.affinity_channels = config.affinity_channels if config.affinity_rank else 0
        if self.affinity_rank:
            # Fixed user x item affinities, channel c = <affinity_user[u, c], affinity_item[i, c]> with
            # the factor tables' columns in channel blocks of affinity_rank, each standardised by
            # (shift[c], scale[c]); all zeros (no affinity) until the trainer calls set_affinity.
            width = self.affinity_channels * self.affinity_rank
            self.register_buffer("affinity_user", torch.zeros(config.n_users + 1, width))
            self.register_buffer("affinity_item", torch.zeros(config.n_items + 1, width))
            self.register_buffer("affinity_shift", torch.zeros(self.affinity_channels))
            self.register_buffer("affinity_scale", torch.ones(self.affinity_channels))
            # Its wide weights start at zero: an untrained ranker still reproduces retrieval's order.
            self.affinity_wide = nn.Linear(self.affinity_channels, 1, bias=False)
            nn.init.zeros_(self.affinity_wide.weight)
        self.n_genres = config.n_genres
        if self.n_genres:
            # Each item's genre flags (row 0, padding, has none); filled by set_item_genres.
            self.register_buffer("item_genres", torch.zeros(config.n_items + 1, self.n_genres))
        self.transition_items = config.transition_items
        if self.transition_items:
            # Item i's successors (ids, row 0 and empty slots 0) and their weights; all zeros (no transition)
            # until the trainer calls set_transitions. Channel l (the l-th most recent item, l = 0 the latest)
            # is standardised by (transition_shift[l], transition_scale[l]).
            self.register_buffer("successor_ids", torch.zeros(config.n_items + 1, config.transition_k,
                                                              dtype=torch.int32))
            self.register_buffer("successor_weights", torch.zeros(config.n_items + 1, config.transition_k))
            self.register_buffer("transition_shift", torch.zeros(self.transition_items))
            self.register_buffer("transition_scale", torch.ones(self.transition_items))
            self.transition_wide = nn.Linear(self.transition_items, 1, bias=False)
            nn.init.zeros_(self.transition_wide.weight)
        genre_dim = self.n_genres + 1 if self.n_genres else 0
        input_dim = (dim + self.user_categorical.output_dim + config.n_user_num + dim + self.calendar.output_dim
                     + dim + self.item_categorical.output_dim + config.n_item_num + 1 + self.affinity_channels
                     + genre_dim + self.transition_items)
        self.cross = CrossNetV2(input_dim, config.n_cross_layers, config.low_rank)
        self.deep = mlp(input_dim, config.deep_dims, config.dropout)
        head_dim = config.deep_dims[-1] + (input_dim if config.structure == "parallel" else 0)
        self.ctr_head = nn.Linear(head_dim, 1)
        self.rating_head = nn.Linear(head_dim, 1)
        # Wide skip from the retrieval score to the CTR logit, starting at weight 1: an untrained
        # ranker reproduces retrieval's order, and training learns what to change about it.
        # The deep CTR head starts at zero for the same reason: its random output would reshuffle
        # candidates whose retrieval scores differ by less than its noise.
        self.retrieval_skip = nn.Linear(1, 1)
        nn.init.ones_(self.retrieval_skip.weight)
        nn.init.zeros_(self.retrieval_skip.bias)
        nn.init.zeros_(self.ctr_head.weight)
        nn.init.zeros_(self.ctr_head.bias)

    def raw_affinity(self, user_idx: Tensor, item_idx: Tensor) -> Tensor:
        """(N,), (N,) -> (N, C) affinities of each row's user and candidate from the factor tables, before
        the standardisation."""
        product = self.affinity_user[user_idx] * self.affinity_item[item_idx]  # (N, C * r)
        return product.reshape(-1, self.affinity_channels, self.affinity_rank).sum(dim=2)  # (N, C)

    def affinity(self, user_idx: Tensor, item_idx: Tensor, raw: Tensor | None = None) -> Tensor:
        """(N,), (N,) -> (N, C) standardised affinities of each row's user and candidate; ``raw`` (N, C), when
        given, replaces the tables' values (training rows whose affinity comes from another fit)."""
        raw = self.raw_affinity(user_idx, item_idx) if raw is None else raw
        return (raw - self.affinity_shift) / self.affinity_scale

    @torch.no_grad()
    def set_affinity(self, user_factors: Tensor, item_factors: Tensor, user_idx: Tensor, item_idx: Tensor) -> None:
        """Loads the factors ((n_users+1, C * r), (n_items+1, C * r), channel blocks of r columns) and
        standardises each affinity over the rows (user_idx, item_idx) the CTR head learns from."""
        if not self.affinity_rank:
            raise RuntimeError("set_affinity on a ranker built with affinity_rank 0")
        self.affinity_user.copy_(user_factors)
        self.affinity_item.copy_(item_factors)
        self.affinity_shift.zero_()
        self.affinity_scale.fill_(1.0)
        raw = self.affinity(user_idx, item_idx)
        self.affinity_shift.copy_(raw.mean(dim=0))
        self.affinity_scale.copy_(raw.std(dim=0).nan_to_num(0.0).clamp(min=1e-6))

    @torch.no_grad()
    def set_item_genres(self, flags: Tensor) -> None:
        """Loads every item's genre flags, (n_items + 1, n_genres), row = item index."""
        if not self.n_genres:
            raise RuntimeError("set_item_genres on a ranker built with n_genres 0")
        self.item_genres.copy_(flags)

    @torch.no_grad()
    def set_transitions(self, ids: Tensor, weights: Tensor, history: Tensor, item_idx: Tensor) -> None:
        """Loads the successor lists ((n_items + 1, K) ids and weights, row = item index) and standardises each
        channel over the rows (``history`` (R, >= L), ``item_idx`` (R,)) the CTR head learns from."""
        if not self.transition_items:
            raise RuntimeError("set_transitions on a ranker built with transition_items 0")
        for name, table in (("ids", ids), ("weights", weights)):
            if tuple(table.shape) != tuple(self.successor_ids.shape):
                raise ValueError(f"successor {name} must have shape {tuple(self.successor_ids.shape)} "
                                 f"(n_items + 1, transition_k), got {tuple(table.shape)}")
        self.successor_ids.copy_(ids)
        self.successor_weights.copy_(weights)
        raw = self.raw_transitions(self.latest(history), item_idx)
        self.transition_shift.copy_(raw.mean(dim=0))
        self.transition_scale.copy_(raw.std(dim=0).nan_to_num(0.0).clamp(min=1e-6))

    def latest(self, history: Tensor) -> Tensor:
        """(U, H) history, oldest first -> (U, L) its L most recent items, the latest first (0 = none)."""
        return history[:, -self.transition_items:].flip(1)

    def raw_transitions(self, latest: Tensor, item_idx: Tensor,
                        lists: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(N, L) latest items of each row's user, (N,) candidates -> (N, L) the candidate's weight in each of
        those items' successor lists, before the standardisation. ``lists`` (ids, weights), shaped as the
        ranker's, read instead of its own (a training fold's, built without what it hid)."""
        ids, weights = (self.successor_ids, self.successor_weights) if lists is None else lists
        match = ids[latest] == item_idx.to(torch.int32)[:, None, None]                     # (N, L, K)
        return (match.to(weights.dtype) * weights[latest]).sum(dim=2)

    def transitions(self, latest: Tensor, item_idx: Tensor, raw: Tensor | None = None) -> Tensor:
        """(N, L) standardised transition channels; ``raw`` (N, L), where given, replaces the lists' weights
        (training rows whose lists come from another log: a fold's, without what it hid)."""
        raw = self.raw_transitions(latest, item_idx) if raw is None else raw
        return (raw - self.transition_shift) / self.transition_scale

    def genre_cross(self, profile: Tensor, item_num: Tensor) -> Tensor:
        """The history's genre profile (N, G) times the candidate's genre flags: (N, G) per genre and (N, 1) summed."""
        cross = profile * item_num[:, :self.n_genres]                          # (N, G)
        return torch.cat([cross, cross.sum(dim=1, keepdim=True)], dim=1)       # (N, G + 1)

    def user_side(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor,
                  timestamp: Tensor) -> tuple[Tensor, Tensor | None]:
        """What depends on the user only, for U user rows: the user block of x0 (U, du) and the genre
        profile of the recent history (U, G), None without genres."""
        recent = history[:, -self.recent_items:]   # history is oldest first: only the most recent items
        user = torch.cat([
            self.user_embedding(user_idx),  # (U, E)
            self.user_categorical(user_cat),  # (U, Cu * E)
            user_num,  # (U, Nu)
            padded_mean(self.item_embedding, recent),  # (U, R) -> (U, E)
            self.calendar(timestamp),  # (U, 2E + 1)
        ], dim=1)  # (U, du)
        profile = masked_mean(self.item_genres[recent], recent != 0) if self.n_genres else None  # (U, R, G) -> (U, G)
        return user, profile

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor, timestamp: Tensor,
                item_idx: Tensor, item_cat: Tensor, item_num: Tensor,
                retrieval_score: Tensor, affinity_raw: Tensor | None = None,
                transition_raw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Aligned rows: row n holds candidate n and its user's inputs (training's layout). ``affinity_raw``
        (N, C) and ``transition_raw`` (N, L), training only, replace the factor tables' affinities
        (``affinity``) and the successor lists' weights (``transitions``)."""
        user, profile = self.user_side(user_idx, user_cat, user_num, history, timestamp)
        latest = self.latest(history) if self.transition_items else None
        return self.rows(user, profile, user_idx, item_idx, item_cat, item_num, retrieval_score, affinity_raw,
                         latest, transition_raw)

    def forward_grouped(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor,
                        timestamp: Tensor, row_user: Tensor, item_idx: Tensor, item_cat: Tensor, item_num: Tensor,
                        retrieval_score: Tensor) -> tuple[Tensor, Tensor]:
        """The same scores from U user rows and N candidate rows, ``row_user`` (N,) naming each candidate's
        user: the user side runs once per user, not once per candidate (the served program's layout,
        ``recsys_contracts.programs.RANKER``)."""
        user, profile = self.user_side(user_idx, user_cat, user_num, history, timestamp)
        latest = self.latest(history)[row_user] if self.transition_items else None
        return self.rows(user[row_user], None if profile is None else profile[row_user], user_idx[row_user],
                         item_idx, item_cat, item_num, retrieval_score, latest=latest)

    def rows(self, user: Tensor, profile: Tensor | None, user_idx: Tensor, item_idx: Tensor, item_cat: Tensor,
             item_num: Tensor, retrieval_score: Tensor, affinity_raw: Tensor | None = None,
             latest: Tensor | None = None, transition_raw: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The scores of N candidate rows from their users' ``user_side`` rows (N, du), (N, G) and latest
        history items (N, L)."""
        x0 = torch.cat([
            user,  # (N, du)
            self.item_embedding(item_idx),  # (N, E)
            self.item_categorical(item_cat),  # (N, Ci * E)
            item_num,  # (N, Ni)
            retrieval_score.unsqueeze(1),  # (N, 1)
        ], dim=1)  # (N, d)
        if self.n_genres:
            x0 = torch.cat([x0, self.genre_cross(profile, item_num)], dim=1)
        wide = self.retrieval_skip(retrieval_score.unsqueeze(1))  # (N, 1)
        if self.affinity_rank:
            affinity = self.affinity(user_idx, item_idx, affinity_raw)  # (N, C)
            x0 = torch.cat([x0, affinity], dim=1)  # (N, d + C)
            wide = wide + self.affinity_wide(affinity)
        if self.transition_items:
            transitions = self.transitions(latest, item_idx, transition_raw)  # (N, L)
            x0 = torch.cat([x0, transitions], dim=1)
            wide = wide + self.transition_wide(transitions)
        if self.structure == "stacked":
            hidden = self.deep(self.cross(x0))  # (N, d) -> (N, deep_dims[-1])
        else:
            hidden = torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (N, d + deep_dims[-1])
        ctr_logit = (self.ctr_head(hidden) + wide).squeeze(1)  # (N,)
        rating = self.rating_min + self.rating_range * torch.sigmoid(self.rating_head(hidden).squeeze(1))  # (N,)
        return ctr_logit, rating
