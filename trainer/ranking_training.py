"""DCN ranker training on what retrieval actually hands it, early stopping on validation NDCG@10.

The ranker reorders retrieval's candidates, so it learns from them: for each held-out interaction
(a positive the retrieval model never trained on), negatives are candidates retrieval returns for
the same user that the user did not take. The validation interactions are split per user in two:
one half to fit the CTR head, the other to pick the epoch by the full pipeline's NDCG@10
(retrieve N -> rank -> top 10). The rating head learns from the observed ratings (MSE) of the
training interactions and the fitting half. L = beta * L_ctr + alpha * L_rating.

With ``ranking.affinity = "ease"`` the ranker also gets EASE's user x item scores (fitted on the
training log, binary and, with ``ranking.affinity_ratings``, on the rating values; stored in the
ranker as rank-r factors) and its wide logit starts from a logistic regression of the clicks on the
retrieval score and those affinities (``fit_affinity``, ``fit_wide``):
the id embeddings the DCN learns from a few thousand held-out clicks cannot add that signal.
With ``ranking.tower_affinity`` the user towers validation trained and did not keep join those
affinities as channels of their own (``trainer.tower_affinity``), with EASE's or without them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recsys_contracts.bundle import ScoreRule
from trainer import metrics
from trainer import baselines
from trainer.baselines import EASE, SparseMatrix, ease_fits, ease_score_factors, rank_topk
from trainer.checkpoint import FitHistory
from trainer.config import TrainConfig, replace as replace_config
from trainer.distributed import Distributed
from trainer.full_ranking import EvalTarget
from trainer.features import FeatureTables
from trainer.inputs import item_inputs, user_inputs
from trainer.losses import optimizer_step, ranking_losses
from trainer.models.dcn import DCNConfig, DCNRanker
from trainer.progress import progress_bar
from trainer.retrieval_training import EarlyStop, item_embeddings
from trainer.tower_affinity import FACTOR_CELLS_PER_BATCH, TowerChannels, factor_dots
from trainer.transitions import successor_table


log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Retrieval's top-N per user: item indices (U, N), scores (U, N) = cosine / temperature."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray

    def row_of(self) -> dict[int, int]:
        return {int(u): r for r, u in enumerate(self.users)}


ROW_FIELDS = ("users", "items", "timestamps", "scores", "clicks", "ratings")
# The optional (R, ...) fields of ``Rows``, None where the ranker's own tables give them.
EXTRA_FIELDS = ("history", "affinity", "transition")


@dataclass(frozen=True, eq=False)
class Rows:
    """Row-aligned ranker examples (all (R,)): user, item, timestamp, retrieval score, labels; and,
    where the example's history is not the user's training history (training-log folds), that
    history's most recent items (R, W) (oldest first, 0-padded); and, where the example's affinity is
    not the ranker's tables' (training-log folds, ``fold_affinities``), its raw affinities (R, C); and where
    its transition channels are not the ranker's lists' (folds, ``fold_transitions``), their raw values (R, L)."""

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    scores: np.ndarray
    clicks: np.ndarray          # 1 = interacted, 0 = retrieved but not taken
    ratings: np.ndarray         # observed rating, NaN where none
    history: np.ndarray | None = None
    affinity: np.ndarray | None = None
    transition: np.ndarray | None = None

    def _with(self, **changes) -> "Rows":
        extras = {name: getattr(self, name) for name in EXTRA_FIELDS}
        return Rows(*(getattr(self, f) for f in ROW_FIELDS), **{**extras, **changes})

    def take(self, index: np.ndarray) -> "Rows":
        extras = {name: getattr(self, name) for name in EXTRA_FIELDS}
        return Rows(*(getattr(self, f)[index] for f in ROW_FIELDS),
                    **{name: None if value is None else value[index] for name, value in extras.items()})

    def with_history(self, tables: FeatureTables, width: int) -> "Rows":
        """These rows with an explicit (R, width) history: their own, else the users' training history."""
        # Sliced before the gather: only the last ``width`` of the H stored columns are copied.
        history = self.history if self.history is not None else tables.history[:, -width:][self.users]
        return self._with(history=history[:, -width:])

    def with_affinity(self, affinity: np.ndarray) -> "Rows":
        return self._with(affinity=affinity)

    def with_transition(self, transition: np.ndarray) -> "Rows":
        return self._with(transition=transition)

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        """The rows of ``parts`` one after the other; all with a history of one width, or none (and the
        same for the affinities and the transitions)."""
        def joined(field: str) -> np.ndarray | None:
            arrays = [getattr(p, field) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)
        return Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ROW_FIELDS),
                    **{name: joined(name) for name in EXTRA_FIELDS})


@dataclass(frozen=True, eq=False)
class Folds:
    """Ranker examples from training-log folds (``fold_rows``): the rows of every fold one after the
    other, each row's fold (R,), and each fold's hidden training entries as (user, item) pairs."""

    rows: Rows
    fold: np.ndarray
    hidden: tuple[tuple[np.ndarray, np.ndarray], ...]
    tower_raw: np.ndarray | None = None   # (R, C) the tower channels' affinities from each fold's visible history


def affinity_fits(tables: FeatureTables, width: int, ease: bool = True, warn: bool = True) -> bool:
    """Whether the ranker gets its affinity tables: EASE fits the log (``ease_fits``; only with ``ease``)
    and the factor tables the program carries, (users + items) x ``width`` float32, stay within
    ``MAX_DENSE_CELLS`` (200 MB); with ``warn``, a warning says which limit left it out."""
    n_users, n_items = tables.vocab.n_users + 1, tables.vocab.n_items + 1
    if ease and not ease_fits(n_items, "ranker affinity", warn):
        return False
    if (n_users + n_items) * width > baselines.MAX_DENSE_CELLS:
        if warn:
            log.warning("ranker affinity left out: its factor tables would hold (%d users + %d items) x %d floats, "
                        "more than %d", n_users, n_items, width, baselines.MAX_DENSE_CELLS)
        return False
    return True


def affinity_channels(cfg: TrainConfig, tables: FeatureTables, towers: int = 0,
                      warn: bool = True) -> tuple[int, int]:
    """(EASE's channels, the towers' channels) the ranker holds: EASE's 1 or 2 (``ranking.affinity_ratings``)
    with ``ranking.affinity`` "ease" where it fits, and ``towers`` tower channels (``trainer.tower_affinity``)
    where their tables fit; both only in the separate mode (joint training has no fitting half to fit the
    wide logit on, and retrieval_only serves retrieval's own order). Decided before the ranker exists, so
    a catalog too large for them gets no (zero) factor tables in its program. ``warn``: the warnings of
    ``affinity_fits``, given once, by the call that shapes the ranker (``dcn_config``); other calls ask
    quietly (a larger rank that ``affinity_rank`` does not try leaves no affinity out)."""
    rc = cfg.ranking
    if cfg.multitask.mode != "separate":
        return 0, 0
    ease = (2 if rc.affinity_ratings else 1) if rc.affinity == "ease" else 0
    if ease and not affinity_fits(tables, rc.affinity_rank * (ease + towers), warn=warn):
        ease = 0
    if towers and not affinity_fits(tables, rc.affinity_rank * (ease + towers), ease=False, warn=warn):
        towers = 0
    return ease, towers


def dcn_config(cfg: TrainConfig, spec, tables: FeatureTables, towers: int = 0, transitions: bool = True) -> DCNConfig:
    """The ranker's shape; ``towers`` tower channels join its affinity where they fit (``affinity_channels``);
    ``transitions`` False leaves the transition channels out whatever the settings say (``transitions_used``)."""
    rc = cfg.ranking
    channels = sum(affinity_channels(cfg, tables, towers))
    transitions = transitions and transitions_used(cfg)
    return DCNConfig(
        n_users=tables.vocab.n_users, n_items=tables.vocab.n_items,
        user_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.user_categorical),
        n_user_num=spec.user_num_dim,
        item_cat_cardinalities=tuple(len(c.vocabulary) + 1 for c in spec.item_categorical),
        n_item_num=spec.item_num_dim, embedding_dim=rc.embedding_dim, n_cross_layers=rc.cross_layers,
        low_rank=rc.low_rank or None, deep_dims=rc.deep_dims, dropout=rc.dropout, structure=rc.structure,
        rating_min=spec.rating_min, rating_max=spec.rating_max,
        affinity_rank=rc.affinity_rank if channels else 0,
        affinity_channels=channels or (2 if rc.affinity_ratings else 1),
        n_genres=len(spec.item_genres) if rc.genre_cross else 0,
        transition_k=rc.transitions if transitions else 0,
        transition_items=rc.transition_items if transitions else 0)


def transitions_used(cfg: TrainConfig) -> bool:
    """Whether the ranker takes transition channels (``ranking.transitions``, ``ranking.transition_mode``)."""
    rc = cfg.ranking
    if not rc.transitions or rc.transition_mode == "off":
        return False
    return rc.transition_mode == "on" or cfg.data.protocol in ("temporal", "leave_one_out")


def load_transitions(ranker: DCNRanker, rc, log: tuple[np.ndarray, np.ndarray, np.ndarray], n_items: int,
                     history: np.ndarray, items: np.ndarray, device: torch.device | str = "cpu") -> None:
    """Fills ``ranker``'s transition channels: the successor lists (``trainer.transitions``, with ``rc``'s
    ``transitions``, ``transition_window`` and ``transition_decay``) of the training ``log`` (users, items,
    timestamps), standardised over the rows ``history`` (R, >= L) and ``items`` (R,)."""
    ids, weights = successor_table(*log, n_items, rc.transitions, rc.transition_window, rc.transition_decay)
    ranker.set_transitions(*(torch.as_tensor(a, device=device) for a in (ids, weights, history, items)))


@torch.no_grad()
def table_transitions(ranker: DCNRanker, history: np.ndarray, items: np.ndarray,
                      lists: tuple[np.ndarray, np.ndarray] | None = None, rows_per_block: int = 65536) -> np.ndarray:
    """(R, L) float32 raw transition channels of rows (``history`` (R, >= L), ``items`` (R,)) from the
    ranker's own successor lists, or from ``lists`` (ids, weights) shaped as its, ``rows_per_block`` rows at a
    time (each holds an (L, K) match)."""
    device = ranker.successor_ids.device
    given = None if lists is None else tuple(torch.as_tensor(a, device=device) for a in lists)
    out = np.zeros((items.size, ranker.transition_items), np.float32)
    for start in range(0, items.size, rows_per_block):
        block = slice(start, start + rows_per_block)
        latest = ranker.latest(torch.as_tensor(history[block], device=device))
        out[block] = ranker.raw_transitions(latest, torch.as_tensor(items[block], device=device),
                                            given).cpu().numpy()
    return out


def fold_transitions(ranker: DCNRanker, rc, log: tuple[np.ndarray, np.ndarray, np.ndarray], n_items: int,
                     folds: "Folds") -> np.ndarray:
    """(R, L) float32 raw transition channels of the fold rows: each fold's successor lists built from the
    training ``log`` (users, items, timestamps) without the entries that fold hid (``Folds.hidden``), read
    at each row's visible history's latest items. The lists from the whole log count a hidden positive among
    the successors of the user's own items before it, which no served candidate is."""
    users, items, timestamps = log
    keys = users.astype(np.int64) * (n_items + 1) + items
    out = np.zeros((folds.rows.users.size, ranker.transition_items), np.float32)
    for fold, (hidden_users, hidden_items) in enumerate(folds.hidden):
        keep = ~np.isin(keys, hidden_users.astype(np.int64) * (n_items + 1) + hidden_items)
        lists = successor_table(users[keep], items[keep], timestamps[keep], n_items, rc.transitions,
                                rc.transition_window, rc.transition_decay)
        rows = np.flatnonzero(folds.fold == fold)
        out[rows] = table_transitions(ranker, folds.rows.history[rows], folds.rows.items[rows], lists)
    return out


def last_per_pair(users: np.ndarray, items: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (user, item) pair once, at its last occurrence: (pair keys user * width + item, sorted;
    the index of each key's last row)."""
    keys = users.astype(np.int64) * width + items
    unique, first_from_end = np.unique(keys[::-1], return_index=True)
    return unique, keys.size - 1 - first_from_end


def affinity_factors(train_rows: Rows, n_users: int, n_items: int, rank: int, channels: int, l2: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """User and item factor tables ((n_users, channels * rank), (n_items, channels * rank), channel blocks
    of ``rank`` columns) of low-rank factorisations of EASE's scores on the training interactions
    ``train_rows``: channel 0 EASE on the binary user x item matrix (``l2``); channel 1 EASE on the rating
    values (l2 scaled by the mean squared rating, so that it weighs the same against the Gram matrix).
    The factors come from ``ease_score_factors``, which never forms the dense (users, items) scores."""
    return channel_tables([ease_score_factors(EASE(channel_l2).fit(matrix), rank, rng)
                           for matrix, channel_l2 in affinity_matrices(train_rows, n_users, n_items, channels, l2)],
                          rank)


def affinity_matrices(train_rows: Rows, n_users: int, n_items: int, channels: int,
                      l2: float) -> list[tuple[SparseMatrix, float]]:
    """The user x item matrix and the l2 of each of ``channels`` affinity channels (``affinity_factors`` says
    which), not fitted yet."""
    # Each (user, item) pair once, with its last rating (non-finite ratings count as 1).
    _, last = last_per_pair(train_rows.users, train_rows.items, n_items)
    users, items = train_rows.users[last], train_rows.items[last]
    ratings = np.nan_to_num(np.asarray(train_rows.ratings, np.float64)[last], nan=1.0, posinf=1.0, neginf=1.0)
    inputs = [(np.ones(last.size), l2), (ratings, l2 * max(float(np.mean(ratings ** 2)), 1e-12) if last.size else l2)]
    return [(SparseMatrix.from_coo(users, items, (n_users, n_items), values.astype(np.float32)), channel_l2)
            for values, channel_l2 in inputs[:channels]]


def channel_tables(factors: list[tuple[np.ndarray, np.ndarray]], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """User and item factor tables, one block of ``rank`` columns per channel's (left, right) factors (a block's
    columns past the factors' own width left at zero)."""
    (n_users, _), (n_items, _) = factors[0][0].shape, factors[0][1].shape
    user_factors = np.zeros((n_users, len(factors) * rank), np.float32)
    item_factors = np.zeros((n_items, len(factors) * rank), np.float32)
    for channel, (left, right) in enumerate(factors):
        user_factors[:, channel * rank:channel * rank + left.shape[1]] = left
        item_factors[:, channel * rank:channel * rank + right.shape[1]] = right
    return user_factors, item_factors


def top_k_kept(exact: np.ndarray, approx: np.ndarray, seen: list[np.ndarray], k: int = 10) -> float:
    """The mean share of each row's top ``k`` of ``exact`` (B, M) scores that ``approx``'s top ``k`` holds, the
    row's ``seen`` items and column 0 (the padding item) left out of both."""
    tops = []
    for scores in (exact, approx):
        scores = np.array(scores, np.float32)
        scores[:, 0] = -np.inf
        for row, items in enumerate(seen):
            scores[row, items] = -np.inf
        k_eff = min(k, scores.shape[1] - 1)
        tops.append(np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff])
    return float(np.mean([np.intersect1d(a, b).size / a.size for a, b in zip(*tops)])) if seen else 1.0


def fit_affinity(ranker: DCNRanker, tables: FeatureTables, train_rows: Rows, fit_rows: Rows, l2: float,
                 rng: np.random.Generator, device: torch.device,
                 towers: tuple[np.ndarray, np.ndarray] | None = None,
                 ease_factors: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
    """Fills the ranker's affinity factors, standardised on ``fit_rows``: first EASE's channels
    (``affinity_factors`` of the training interactions ``train_rows``, or ``ease_factors`` where they were
    computed already at the ranker's rank, ``affinity_rank``), then the tower channels' tables ``towers``
    (user factors, item factors; ``TowerChannels.tables``), as many as the ranker holds beyond EASE's.
    False (the affinity left at zero) where EASE's channels are wanted and the catalog is too large for
    EASE (``ease_fits``)."""
    n_users, n_items = tables.vocab.n_users + 1, tables.vocab.n_items + 1
    ease = ease_channel_count(ranker, towers)
    blocks_user, blocks_item = [], []
    if ease:
        if not ease_fits(n_items, "ranker affinity"):
            return False
        user_factors, item_factors = ease_factors or affinity_factors(train_rows, n_users, n_items,
                                                                      ranker.affinity_rank, ease, l2, rng)
        blocks_user.append(user_factors)
        blocks_item.append(item_factors)
    if towers is not None:
        blocks_user.append(towers[0])
        blocks_item.append(towers[1])
    ranker.set_affinity(torch.as_tensor(np.concatenate(blocks_user, axis=1), device=device),
                        torch.as_tensor(np.concatenate(blocks_item, axis=1), device=device),
                        torch.as_tensor(fit_rows.users, device=device), torch.as_tensor(fit_rows.items, device=device))
    return True


def ease_channel_count(ranker: DCNRanker, towers: tuple[np.ndarray, np.ndarray] | None) -> int:
    """EASE's channels among the ranker's: those its tower channels' tables ``towers`` leave."""
    tower = 0 if towers is None else towers[1].shape[1] // ranker.affinity_rank
    return ranker.affinity_channels - tower


def fold_affinities(ranker: DCNRanker, tables: FeatureTables, train_rows: Rows, folds: Folds, l2: float,
                    seed: int, channels: int | None = None) -> np.ndarray:
    """The raw EASE affinities (R, ``channels``, by default all the ranker's) of the fold rows, each fold's
    from ``affinity_factors`` refitted on the training interactions without the entries that fold hid.
    With the ranker's own tables, fitted on every training interaction, a fold's hidden positives carry
    the affinity of a pair EASE has learnt to reproduce, not that of an unseen one, and the ranker learns
    to trust the affinity more than a served candidate deserves."""
    n_users, n_items = tables.vocab.n_users + 1, tables.vocab.n_items + 1
    channels = ranker.affinity_channels if channels is None else channels
    keys = train_rows.users.astype(np.int64) * n_items + train_rows.items
    raw = np.zeros((folds.rows.users.size, channels), np.float32)
    for fold, (users, items) in enumerate(folds.hidden):
        kept = ~np.isin(keys, users.astype(np.int64) * n_items + items)
        user_factors, item_factors = affinity_factors(train_rows.take(np.flatnonzero(kept)), n_users, n_items,
                                                      ranker.affinity_rank, channels, l2,
                                                      np.random.default_rng(seed))
        rows = np.flatnonzero(folds.fold == fold)
        raw[rows] = factor_dots(user_factors, item_factors, folds.rows.users[rows], folds.rows.items[rows],
                                ranker.affinity_rank)
    return raw


def _table_affinity(ranker: DCNRanker, rows: Rows, cells_per_batch: int = FACTOR_CELLS_PER_BATCH) -> np.ndarray:
    """(R, C) the raw affinities of ``rows`` from the ranker's own factor tables (``DCNRanker.raw_affinity``),
    gathered in batches by ``factor_dots``."""
    return factor_dots(ranker.affinity_user.detach().cpu().numpy(), ranker.affinity_item.detach().cpu().numpy(),
                       rows.users, rows.items, ranker.affinity_rank, cells_per_batch)


def _fold_affinity(ranker: DCNRanker, tables: FeatureTables, rating_rows: Rows, folds: Folds,
                   tower_tables: tuple[np.ndarray, np.ndarray] | None, cfg: TrainConfig,
                   device: torch.device) -> np.ndarray:
    """(R, C) the fold rows' raw affinities: EASE's refitted without each fold's hidden entries
    (``ranking.fold_affinity`` "refit") or from the ranker's tables ("shared"), then the tower channels'
    from each fold's visible history."""
    ease = ease_channel_count(ranker, tower_tables)
    parts = []
    if ease:
        parts.append(fold_affinities(ranker, tables, rating_rows, folds, cfg.ranking.affinity_l2, cfg.run.seed + 3,
                                     channels=ease) if cfg.ranking.fold_affinity == "refit"
                     else _table_affinity(ranker, folds.rows)[:, :ease])
    if tower_tables is not None:
        parts.append(folds.tower_raw)
    return np.concatenate(parts, axis=1).astype(np.float32)


def minimise(parameters: list[torch.Tensor], loss: Callable[[], torch.Tensor], iterations: int) -> None:
    """Minimises ``loss()`` over ``parameters`` (leaf tensors requiring grad) with L-BFGS."""
    optimizer = torch.optim.LBFGS(parameters, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)


def wide_features(ranker: DCNRanker, users: torch.Tensor, items: torch.Tensor, retrieval: torch.Tensor,
                  history: torch.Tensor | None) -> torch.Tensor:
    """(R, 1 + C + L) the inputs of the ranker's wide logit for R rows: the retrieval score (R, 1) as given,
    the affinities (where the ranker has them) and the transition channels (where it has them; ``history``
    (R, >= L) the rows' histories, oldest first)."""
    parts = [retrieval]
    if ranker.affinity_rank:
        parts.append(ranker.affinity(users, items))
    if ranker.transition_items:
        parts.append(ranker.transitions(ranker.latest(history), items))
    return torch.cat(parts, dim=1)


def fit_wide(ranker: DCNRanker, rows: Rows, device: torch.device, iterations: int = 100,
             listwise: bool = False) -> None:
    """Sets the wide CTR logit (retrieval skip weight, affinity weights, bias) to the logistic regression
    of ``rows.clicks`` on the retrieval score and the affinities, the deep head staying at zero: the
    untrained ranker then ranks by the best linear mix of them instead of by retrieval alone.

    ``listwise``: the mix's direction is fitted as the candidate lists rank (each positive's softmax
    against its own list's negatives, ``listwise_loss``), then only its scale and the bias pointwise, so
    the clicks stay calibrated and the order is the listwise one. The pointwise fit also learns from
    differences between users, which the served order never sees: with the tower channels on ml-100k it
    weighted the pooled tower's channel ~3x what its lists' order asks for (docs/RESULTS.md, "The towers
    not kept as ranker channels")."""
    users, items = (torch.as_tensor(a, device=device) for a in (rows.users, rows.items))
    scores = torch.as_tensor(rows.scores, dtype=torch.float32, device=device).unsqueeze(1)   # (R, 1)
    center = scores.mean()
    with torch.no_grad():
        features = wide_features(ranker, users, items, scores - center,
                                 None if rows.history is None else torch.as_tensor(rows.history, device=device))
    labels = torch.as_tensor(rows.clicks, device=device)
    weight = torch.zeros(features.shape[1], device=device)
    weight[0] = 1.0
    weight.requires_grad_(True)
    bias = torch.zeros(1, device=device, requires_grad=True)
    if listwise:
        starts = list_starts(rows)
        list_id = torch.as_tensor(np.repeat(np.arange(starts.size - 1), np.diff(starts)), device=device)
        minimise([weight], lambda: listwise_loss(features @ weight, labels, list_id), iterations)
        direction = weight.detach()
        scale = torch.ones(1, device=device, requires_grad=True)
        minimise([scale, bias], lambda: torch.nn.functional.binary_cross_entropy_with_logits(
            scale * (features @ direction) + bias, labels), iterations)
        weight = (scale.detach() * direction)
    else:
        minimise([weight, bias], lambda: torch.nn.functional.binary_cross_entropy_with_logits(
            features @ weight + bias, labels), iterations)
    with torch.no_grad():
        ranker.retrieval_skip.weight.fill_(float(weight[0]))
        ranker.retrieval_skip.bias.zero_()
        channels = ranker.affinity_channels if ranker.affinity_rank else 0
        if channels:
            ranker.affinity_wide.weight.copy_(weight[1:1 + channels].detach().reshape(1, -1))
        if ranker.transition_items:
            ranker.transition_wide.weight.copy_(weight[1 + channels:].detach().reshape(1, -1))
        ranker.ctr_head.bias.fill_(float(bias) - float(weight[0]) * float(center))


@torch.no_grad()
def row_scores(ranker: DCNRanker, tables: FeatureTables, rows: Rows, device: torch.device,
               rows_per_batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(CTR logit (R,), rating (R,)) of aligned ``rows``, the ranker run over ``rows_per_batch`` of them at a
    time (as ``score_candidates`` runs): each row's activations and gathered affinity factors (channels x rank
    floats per table) are held for one batch only. All of a ~1M-row test split at once held GBs (the ml-1m-shaped
    log's head metrics at rank 256: RSS 2.3 -> 3.6 GB)."""
    ctr, rating = np.zeros(rows.users.size, np.float32), np.zeros(rows.users.size, np.float32)
    for start in range(0, rows.users.size, rows_per_batch):
        sl = slice(start, min(start + rows_per_batch, rows.users.size))
        logit, predicted = ranker(**ranker_inputs(tables, rows.take(np.arange(sl.start, sl.stop)), device))
        ctr[sl], rating[sl] = logit.cpu().numpy(), predicted.cpu().numpy()
    return ctr, rating


def ranker_inputs(tables: FeatureTables, rows: Rows, device: torch.device) -> dict[str, torch.Tensor]:
    """The ranker's inputs for ``rows``: their own history where they carry one, else the users' stored one."""
    return {**user_inputs(tables, rows.users, rows.timestamps, device, history=rows.history),
            **item_inputs(tables, rows.items, device),
            "retrieval_score": torch.as_tensor(rows.scores, dtype=torch.float32, device=device)}


def final_score(ctr_logit: torch.Tensor, rating: torch.Tensor, score_mode: str, rating_weight: float,
                rating_max: float) -> torch.Tensor:
    """The served score (``recsys_contracts.bundle.ScoreRule``, the rule the ranking service applies)."""
    return ScoreRule(score_mode, rating_weight, rating_max).apply(torch.sigmoid(ctr_logit), rating)


def click_rows(positives: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], candidates: Candidates,
               per_positive: int, rng: np.random.Generator, depth: int = 100) -> Rows:
    """Examples from retrieval's top ``depth`` candidates per user: the held-out items among them are
    positives (rating kept), and ``per_positive`` other candidates per positive are negatives.

    Positives and negatives come from the same lists, so the retrieval score means the same in
    both; items retrieval missed are left out (the ranker never sees them when serving either).
    A user needs at least one positive and one other candidate; the negatives are drawn without
    replacement and take the timestamp of the user's first positive in list order. Rows come out
    user by user in candidate order, each user's positives first. Vectorised over all users.
    """
    users, items, timestamps, ratings = (np.asarray(a) for a in positives)
    if users.size == 0 or candidates.users.size == 0:
        return Rows(*(np.zeros(0, dtype) for dtype in (np.int64, np.int64, np.int64, np.float32, np.float32,
                                                        np.float32)))
    cand = candidates.items[:, :depth]                                              # (U, N)
    cand_scores = candidates.scores[:, :depth]
    width = int(max(cand.max(initial=0), items.max(initial=0))) + 1
    # Held-out (user, item) pairs; a pair given twice keeps its last timestamp and rating.
    keys, last = last_per_pair(users, items, width)
    held_ts, held_rating = timestamps[last], ratings[last]                         # sorted by key
    query = candidates.users.astype(np.int64)[:, None] * width + cand               # (U, N)
    found = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    hit = (keys[found] == query) & (cand > 0)
    miss = ~hit & (cand > 0)
    n_hits, n_misses = hit.sum(axis=1), miss.sum(axis=1)
    usable = (n_hits > 0) & (n_misses > 0)                                          # (U,)
    hit &= usable[:, None]
    # Negatives: a uniform random key per miss, the per-row quota of smallest keys kept.
    quota = np.minimum(per_positive * n_hits, n_misses) * usable
    noise = np.where(miss, rng.random(cand.shape), np.inf)
    rank = np.empty(cand.shape, dtype=np.int64)
    np.put_along_axis(rank, np.argsort(noise, axis=1, kind="stable"), np.arange(cand.shape[1])[None, :], axis=1)
    negative = miss & (rank < quota[:, None])
    first_hit = np.argmax(hit, axis=1)
    context_ts = held_ts[found[np.arange(cand.shape[0]), first_hit]]                # (U,) first positive's time
    pos_r, pos_c = np.nonzero(hit)
    neg_r, neg_c = np.nonzero(negative)
    row = np.concatenate([pos_r, neg_r])
    col = np.concatenate([pos_c, neg_c])
    order = np.lexsort((col, np.r_[np.zeros(pos_r.size), np.ones(neg_r.size)], row))   # user, positives first
    row, col = row[order], col[order]
    click = np.r_[np.ones(pos_r.size, np.float32), np.zeros(neg_r.size, np.float32)][order]
    at = found[row, col]
    return Rows(candidates.users[row].astype(np.int64), cand[row, col].astype(np.int64),
                np.where(click > 0, held_ts[at], context_ts[row]).astype(np.int64),
                cand_scores[row, col].astype(np.float32), click,
                np.where(click > 0, held_rating[at], np.nan).astype(np.float32))


def _fold_histories(user_items, users: np.ndarray, kept: np.ndarray, kept_after: np.ndarray,
                    length: int) -> np.ndarray:
    """(U, length) each user's kept items, oldest first, right-aligned and 0-padded (the served layout)."""
    starts, ends = user_items.indptr[users], user_items.indptr[users + 1]
    counts = ends - starts
    local = np.repeat(np.arange(users.size), counts)
    entry = np.arange(local.size) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
    slot = length - 1 - kept_after[entry]
    use = kept[entry] & (slot >= 0)
    out = np.zeros((users.size, length), dtype=np.int64)
    out[local[use], slot[use]] = user_items.items[entry[use]]
    return out


def _recent_fold(user_items, entry_user: np.ndarray, fold: int, share: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(hidden, kept) entry masks of fold ``fold`` in time order: each user's ``fold``-th window of most
    recent items is hidden (one item per window when ``share`` is None, else ``share`` of the user's
    items, at least one), the items before it are kept; a user with fewer items keeps all of them."""
    counts = np.diff(user_items.indptr)                                         # (n+1,)
    from_end = user_items.indptr[1:][entry_user] - 1 - np.arange(entry_user.size)  # 0 = the user's last
    window = np.ones_like(counts) if share is None else np.maximum(1, np.round(share * counts).astype(np.int64))
    start = fold * window[entry_user]                                           # first hidden rank from the end
    hidden = (from_end >= start) & (from_end < start + window[entry_user]) & (counts[entry_user] > start + window[entry_user])
    kept = (from_end >= start + window[entry_user]) | (counts[entry_user] <= start + window[entry_user])
    return hidden, kept


@torch.no_grad()
def fold_rows(two_tower, tables: FeatureTables, user_items, timestamps: np.ndarray, rc, width: int,
              rng: np.random.Generator, device: torch.device, recent_share: float | None | bool = False,
              channels: TowerChannels | None = None) -> Folds | None:
    """Ranker examples from ``rc.folds`` folds of the training log (``ranking.folds``): each hides part
    of the training items of up to ``rc.fold_users`` users, retrieves for them with the history that
    remains (every item not hidden excluded, as seen items are when serving), and turns the hidden
    items among the top ``rc.negative_pool`` into positives beside retrieved-not-hidden negatives
    (``click_rows``). Each row carries its fold history's last ``width`` items.

    ``recent_share`` False: each fold hides a random ``rc.fold_share`` of the items. Otherwise fold f
    hides each user's f-th most recent window (``_recent_fold``: one item when ``recent_share`` is
    None, as leave-one-out tests, else that share, as the temporal protocol does) with the items
    before it as the history: the next-item task. The folds also name the entries they hid, so that the
    ranker can refit EASE's affinity without them (``fold_affinities``). With tower ``channels``, each row
    also carries their affinities with the fold's visible history (``Folds.tower_raw``), as the kept tower
    retrieves with it."""
    item_emb = item_embeddings(two_tower, tables, device)                                      # (m+1, D)
    temperature = float(two_tower.temperature.detach())
    n_entries = user_items.items.size
    entry_user = np.repeat(np.arange(user_items.indptr.size - 1), np.diff(user_items.indptr))  # (T,)
    eligible = np.flatnonzero(np.diff(user_items.indptr) >= 3)
    if eligible.size == 0:           # a tiny log: no user has enough training items to hide some
        return None
    length = tables.history.shape[1]
    width = min(width, length)           # as ``Rows.with_history`` slices the training history
    parts, fold_of, hidden_pairs, tower_raw = [], [], [], []
    item_factors = None if channels is None else channels.item_factors()
    for fold in range(rc.folds):
        if recent_share is False:
            hidden = rng.random(n_entries) < rc.fold_share
            kept = ~hidden
        else:
            hidden, kept = _recent_fold(user_items, entry_user, fold, recent_share)
        cum = np.cumsum(kept)
        last = np.maximum(user_items.indptr[1:] - 1, 0)                                     # each user's last entry
        kept_after = cum[last][entry_user] - cum                                             # kept entries after e
        users = np.sort(rng.choice(eligible, size=min(rc.fold_users, eligible.size), replace=False))
        histories = np.zeros((tables.vocab.n_users + 1, width), dtype=np.int64)
        factors = None if channels is None else np.zeros((tables.vocab.n_users + 1, item_factors.shape[1]), np.float32)
        cand_items, cand_scores = [], []
        batch_size = max(1, min(256, 20_000_000 // max(tables.vocab.n_items, 1)))
        for start in range(0, users.size, batch_size):
            batch = users[start:start + batch_size]
            history = _fold_histories(user_items, batch, kept, kept_after, length)          # (B, H)
            histories[batch] = history[:, -width:]
            if channels is not None:
                factors[batch] = channels.user_factors(tables, batch, timestamps[batch], device, history=history)
            inputs = user_inputs(tables, batch, timestamps[batch], device, history=history)
            sims = (two_tower.user_tower(**inputs) @ item_emb.T).cpu().numpy()               # (B, m+1)
            sims[:, 0] = -np.inf
            spans = [slice(user_items.indptr[u], user_items.indptr[u + 1]) for u in batch]
            visible = [user_items.items[span][~hidden[span]] for span in spans]             # excluded
            top = rank_topk(sims, visible, min(rc.negative_pool, tables.vocab.n_items))        # (B, pool)
            cand_items.append(np.where(top > 0, top, 0))
            cand_scores.append(np.where(top > 0, np.take_along_axis(sims, np.maximum(top, 0), axis=1) / temperature,
                                        -np.inf).astype(np.float32))
        candidates = Candidates(users, np.concatenate(cand_items), np.concatenate(cand_scores))
        take = hidden & np.isin(entry_user, users)
        positives = (entry_user[take], user_items.items[take], user_items.timestamps[take],
                     np.full(int(take.sum()), np.nan, np.float32))
        rows = click_rows(positives, candidates, rc.negatives_per_positive, rng, rc.negative_pool)
        parts.append(Rows(*(getattr(rows, f) for f in ROW_FIELDS), history=histories[rows.users]))
        fold_of.append(np.full(rows.users.size, fold, dtype=np.int64))
        hidden_pairs.append((entry_user[take], user_items.items[take]))
        if channels is not None:
            tower_raw.append(factor_dots(factors, item_factors, rows.users, rows.items, channels.rank))
    return Folds(Rows.concat(parts), np.concatenate(fold_of), tuple(hidden_pairs),
                 None if channels is None else np.concatenate(tower_raw).astype(np.float32))


@torch.no_grad()
def score_candidates(ranker: DCNRanker, tables: FeatureTables, candidates: Candidates,
                     timestamps: np.ndarray, score_mode: str, rating_weight: float, rating_max: float,
                     device: torch.device, rows_per_batch: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(final score, ctr, rating) for every candidate, each (U, N). The ranker's grouped layout (the served
    program's, ``DCNRanker.forward_grouped``): a user's side runs once for all its candidates."""
    n_users, n = candidates.items.shape
    out = np.zeros((3, n_users, n), dtype=np.float32)
    users_per_batch = max(1, rows_per_batch // max(n, 1))
    recent = tables.history[:, -ranker.recent_items:]            # (n+1, R): all the ranker reads of a history
    for start in range(0, n_users, users_per_batch):
        sl = slice(start, start + users_per_batch)
        users = candidates.users[sl]
        row_user = torch.arange(users.size, device=device).repeat_interleave(n)
        ctr_logit, rating = ranker.forward_grouped(
            **user_inputs(tables, users, timestamps[sl], device, history=recent[users]), row_user=row_user,
            **item_inputs(tables, candidates.items[sl].reshape(-1), device),
            retrieval_score=torch.as_tensor(candidates.scores[sl].reshape(-1), dtype=torch.float32, device=device))
        score = final_score(ctr_logit, rating, score_mode, rating_weight, rating_max)
        for k, values in enumerate((score, torch.sigmoid(ctr_logit), rating)):
            out[k, sl] = values.reshape(-1, n).cpu().numpy()
    return out[0], out[1], out[2]


def rerank(candidates: Candidates, scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k item indices (U, k) of the candidates by ranker score (padding -1 where fewer)."""
    masked = np.where(candidates.items > 0, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    ranked = np.take_along_axis(candidates.items, order, axis=1)
    return np.where(np.take_along_axis(masked, order, axis=1) > -np.inf, ranked, -1)


def pipeline_ndcg(ranker, tables, candidates: Candidates, target: EvalTarget, timestamps: np.ndarray,
                  cfg: TrainConfig, rating_max: float, device: torch.device, k: int = 10) -> float:
    return float(pipeline_ndcg_per_user(ranker, tables, candidates, target, timestamps, cfg, rating_max, device,
                                        k).mean())


def pipeline_ndcg_per_user(ranker, tables, candidates: Candidates, target: EvalTarget, timestamps: np.ndarray,
                           cfg: TrainConfig, rating_max: float, device: torch.device, k: int = 10) -> np.ndarray:
    """The pipeline's NDCG@k of each of ``target``'s users (U,), the ranker reordering ``candidates``."""
    ranker.eval()
    scores, _, _ = score_candidates(ranker, tables, candidates, timestamps, cfg.ranking.score_mode,
                                    cfg.multitask.rating_weight, rating_max, device)
    ranker.train()
    return reranked_ndcg_per_user(candidates, scores, target, k)


def reranked_ndcg_per_user(candidates: Candidates, scores: np.ndarray, target: EvalTarget, k: int = 10) -> np.ndarray:
    """NDCG@k of each of ``target``'s users (U,) with ``candidates`` reordered by ``scores`` (U, N)."""
    row_of = candidates.row_of()
    rows = np.array([row_of[u] for u in target.users])
    ranked = rerank(Candidates(candidates.users[rows], candidates.items[rows], candidates.scores[rows]),
                    scores[rows], k)
    return metrics.per_user("ndcg", ranked, target.truth_rows(), k)


@torch.no_grad()
def wide_ndcg_per_user(ranker: DCNRanker, tables: FeatureTables, candidates: Candidates, target: EvalTarget,
                       score_mode: str,
                       device: torch.device, k: int = 10,
                       cells_per_batch: int = FACTOR_CELLS_PER_BATCH) -> np.ndarray | None:
    """``pipeline_ndcg_per_user`` of a ranker whose deep CTR head is still zero, served by the CTR alone: its
    logit is then its wide part (the retrieval skip, the affinities' weights, the bias), so the order needs
    no pass through the cross and deep layers. The same numbers, a fraction of the time (the start's
    candidates on the stopping half). None where that does not hold (a trained head, or a served score that
    also reads the rating head)."""
    if bool(ranker.ctr_head.weight.any()) or score_mode != "ctr":
        return None
    n_users, n = candidates.items.shape
    scores = np.zeros((n_users, n), np.float32)
    # A batch gathers a user and an item factor row (channels x rank floats each) per candidate row: at most
    # ``cells_per_batch`` of them (65,536 rows at EASE's two channels of rank 64; fewer at a larger rank).
    width = ranker.affinity_channels * ranker.affinity_rank if ranker.affinity_rank else 1
    users_per_batch = max(1, cells_per_batch // max(width, 128) // max(n, 1))
    for start in range(0, n_users, users_per_batch):
        sl = slice(start, start + users_per_batch)
        items = torch.as_tensor(candidates.items[sl].reshape(-1), device=device)
        users = torch.as_tensor(np.repeat(candidates.users[sl], n), device=device)
        retrieval = torch.as_tensor(candidates.scores[sl].reshape(-1), dtype=torch.float32, device=device)
        wide = ranker.retrieval_skip(retrieval.unsqueeze(1))
        if ranker.affinity_rank:
            wide = wide + ranker.affinity_wide(ranker.affinity(users, items))
        if ranker.transition_items:
            latest = ranker.latest(torch.as_tensor(tables.history[candidates.users[sl]], device=device))
            wide = wide + ranker.transition_wide(ranker.transitions(latest.repeat_interleave(n, dim=0), items))
        # As the served score: the CTR (sigmoid of the logit: float32 ties where it saturates, as served).
        scores[sl] = torch.sigmoid((ranker.ctr_head.bias + wide).squeeze(1)).reshape(-1, n).cpu().numpy()
    return reranked_ndcg_per_user(candidates, scores, target, k)


def paired_t(scores: np.ndarray, start: np.ndarray) -> float:
    """Mean per-user gain of ``scores`` over ``start`` in standard errors of that mean (0 when there is
    no spread to judge by and no gain, or a single user; +inf for a gain without spread): the keep rule's
    reading of ``metrics.paired_difference``."""
    mean, t = metrics.paired_difference(scores, start)
    if np.asarray(scores).size < 2:
        return 0.0
    return t if t is not None else (np.inf if mean > 0 else 0.0)


@torch.no_grad()
def calibrate_start(ranker: DCNRanker, rows: Rows) -> None:
    """Sets the CTR bias so the untrained ranker predicts the base click rate on average.

    The logit starts as the retrieval score (wide skip); its offset (a cosine over a temperature,
    around +5) is far from the base rate's logit, and learning that shift through the deep layers
    scrambles the order the skip provides. Shifting the bias once keeps the order and calibrates.
    """
    rate = float(np.clip(rows.clicks.mean(), 1e-3, 1 - 1e-3))
    ranker.ctr_head.bias.fill_(float(np.log(rate / (1 - rate)) - rows.scores.mean()))


def fit_rating_head(ranker: DCNRanker, tables: FeatureTables, rows: Rows, device: torch.device,
                    iterations: int = 100, rows_per_batch: int = 2048) -> tuple[float, float]:
    """Refits the rating head alone (a linear layer on the trunk's last hidden layer, trunk frozen) to
    ``rows.ratings`` by least squares through the head's bounded sigmoid; returns the MSE (before,
    after). Nothing else changes, so CTRs stay bit-identical. Needed because the ranker kept by the
    CTR selection is often the untrained start, whose rating head is random. Keeps the old head if
    the fit does not lower the MSE."""
    rated = np.isfinite(rows.ratings)
    if not rated.any():
        return float("nan"), float("nan")
    rows = rows.take(np.flatnonzero(rated))
    captured: list[torch.Tensor] = []
    hook = ranker.rating_head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    was_training = ranker.training
    ranker.eval()
    try:
        # In batches (row_scores): a row gathers its user's and item's affinity factors (channels x rank
        # floats each), and 20k rows at once held ~0.45 GB at a full rank of 944.
        row_scores(ranker, tables, rows, device, rows_per_batch)
    finally:
        hook.remove()
        ranker.train(was_training)
    hidden = torch.cat(captured)                                                # (R, H)
    target = torch.as_tensor(rows.ratings, dtype=torch.float32, device=device)  # (R,)
    head = ranker.rating_head
    weight = head.weight.detach().clone().requires_grad_(True)                  # (1, H)
    bias = head.bias.detach().clone().requires_grad_(True)                      # (1,)

    def mse() -> torch.Tensor:
        pred = ranker.rating_min + ranker.rating_range * torch.sigmoid((hidden @ weight.T + bias).squeeze(1))
        return torch.nn.functional.mse_loss(pred, target)

    with torch.no_grad():
        before = float(mse())
    minimise([weight, bias], mse, iterations)
    with torch.no_grad():
        after = float(mse())
        if np.isfinite(after) and after < before:
            head.weight.copy_(weight)
            head.bias.copy_(bias)
            return before, after
    return before, before


def list_starts(rows: Rows) -> np.ndarray:
    """The first row of each candidate list in ``rows`` (``click_rows`` output, and concatenations of
    it: each list is one user's rows, its positives first), then ``rows``' length: a list starts where
    the user changes or where a positive follows a negative."""
    users, clicks = rows.users, rows.clicks
    if users.size == 0:
        return np.zeros(1, dtype=np.int64)
    new = np.r_[True, (users[1:] != users[:-1]) | ((clicks[1:] > 0) & (clicks[:-1] == 0))]
    return np.r_[np.flatnonzero(new), users.size].astype(np.int64)


def list_batches(starts: np.ndarray, rows_per_batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of whole lists, in a random list order, cut into batches of about ``rows_per_batch``
    rows (a batch ends at the first list that reaches it; a longer list is a batch of its own)."""
    order = rng.permutation(starts.size - 1)
    sizes = np.diff(starts)[order]
    ends = np.cumsum(sizes)
    batches, first, taken = [], 0, 0
    for i, end in enumerate(ends):
        if end - taken >= rows_per_batch or i == order.size - 1:
            lists = order[first:i + 1]
            batches.append(np.concatenate([np.arange(starts[l], starts[l + 1]) for l in lists]))
            first, taken = i + 1, end
    return batches


def listwise_loss(logits: torch.Tensor, clicks: torch.Tensor, list_id: torch.Tensor) -> torch.Tensor:
    """Mean over positive rows of -log softmax of the positive among itself and its list's negatives:
    the candidate lists' own sampled softmax. logits, clicks (N,); list_id (N,) 0..L-1, each list's
    rows contiguous. A list without a negative gives its positives a loss of 0."""
    n_lists = int(list_id.max()) + 1 if list_id.numel() else 0
    negative = clicks <= 0
    first = torch.zeros(n_lists + 1, dtype=torch.long, device=logits.device)
    first[1:] = torch.cumsum(torch.bincount(list_id, minlength=n_lists), 0)
    slot = torch.arange(logits.numel(), device=logits.device) - first[list_id]
    width = int(slot.max()) + 1 if slot.numel() else 1
    lowest = torch.finfo(logits.dtype).min
    dense = torch.full((n_lists, width), lowest, dtype=logits.dtype, device=logits.device)
    dense = dense.index_put((list_id, slot), logits.masked_fill(~negative, lowest))
    neg_lse = torch.logsumexp(dense, dim=1)                                          # (L,)
    pos = ~negative
    if not bool(pos.any()):
        return logits.sum() * 0.0
    s = logits[pos]
    return (torch.logaddexp(neg_lse[list_id[pos]], s) - s).mean()


def epoch_batches(batches: list[np.ndarray], max_rows: int, batch_size: int, world_size: int) -> list[np.ndarray]:
    """The first of an epoch's (already shuffled) ``batches`` that this rank trains on: all of them when
    ``max_rows`` is 0, else enough for its share of ``max_rows`` rows, counted in whole batches of
    ``batch_size`` so that every rank takes as many steps (DDP)."""
    if not max_rows:
        return batches
    return batches[:max(1, -(-max_rows // (world_size * batch_size)))]


def affinity_rank(cfg: TrainConfig, tables: FeatureTables, rating_rows: Rows, towers: int = 0,
                  sample_users: int = 500) -> tuple[int, tuple[np.ndarray, np.ndarray] | None, dict[str, Any] | None]:
    """The rank of EASE's affinity factors in the ranker: the first of ``ranking.affinity_rank``, 4 times it, 16
    times it ... (at most ``ranking.affinity_rank_max``, and EASE's full rank, the smaller side of the log) whose
    binary channel keeps ``ranking.affinity_fidelity`` of exact EASE's top 10 over each user's unseen items, on
    up to ``sample_users`` users drawn at random (``top_k_kept``); a rank whose tables would not fit
    (``affinity_channels``, with ``towers`` tower channels) is not tried. Returns (the rank, EASE's factor tables
    at that rank for ``fit_ranker``, the choice for the report); the rank alone, with None twice, where there is
    nothing to choose (no EASE channels, no larger rank allowed).

    The ranker sees EASE through a rank-r factorisation of its scores, so r decides how much of EASE it can use.
    A measure without labels: the validation split's ~900 users cannot tell rank 256 from 512 one seed at a time
    where a whole test split can (docs/RESULTS.md, "The ranker's affinity rank")."""
    rc = cfg.ranking
    ease_channels = affinity_channels(cfg, tables, towers, warn=False)[0] if rc.affinity == "ease" else 0
    if rc.affinity_rank_max <= rc.affinity_rank or not ease_channels or not rating_rows.users.size:
        return rc.affinity_rank, None, None
    n_users, n_items = tables.vocab.n_users + 1, tables.vocab.n_items + 1
    full = min(n_users, n_items)
    matrices = affinity_matrices(rating_rows, n_users, n_items, ease_channels, rc.affinity_l2)
    binary = matrices[0][0]
    binary_ease = EASE(matrices[0][1]).fit(binary)
    active = np.flatnonzero(np.diff(binary.indptr) > 0)
    rng = np.random.default_rng(cfg.run.seed + 4)
    sample = np.sort(rng.choice(active, size=min(sample_users, active.size), replace=False))
    exact = binary_ease.scores(sample)
    seen = [binary.indices[binary.indptr[u]:binary.indptr[u + 1]] for u in sample]
    kept: dict[str, float] = {}
    rank = rc.affinity_rank
    while True:
        # The binary channel at this rank, drawn as fit_affinity would draw it (its random state, this channel
        # first); the rating channel is factorised once, at the rank kept, from where that state then stands.
        draws = np.random.default_rng(cfg.run.seed + 3)
        left, right = ease_score_factors(binary_ease, rank, draws)
        kept[str(rank)] = round(top_k_kept(exact, left[sample] @ right.T, seen), 4)
        larger = min(4 * rank, rc.affinity_rank_max, full)
        if kept[str(rank)] >= rc.affinity_fidelity or larger <= rank or \
                affinity_channels(replace_config(cfg, ranking={"affinity_rank": larger}), tables, towers,
                                  warn=False)[0] != ease_channels:
            break
        rank = larger
    del binary_ease, exact                  # one EASE (and its inverse) alive at a time
    factors = [(left, right)] + [ease_score_factors(EASE(channel_l2).fit(matrix), rank, draws)
                                 for matrix, channel_l2 in matrices[1:]]
    log.info("ranker affinity rank: EASE's top 10 kept by its rank-r factors %s (wanted %.2f); rank %d",
             ", ".join(f"{r} {v:.3f}" for r, v in kept.items()), rc.affinity_fidelity, rank)
    return rank, channel_tables(factors, rank), {"rank": rank, "ease_top10_kept": kept}


def check_transitions(ranker: DCNRanker, rows: Rows, start_half: Callable[[], np.ndarray], min_t: float,
                      device: torch.device) -> dict:
    """``ranking.transition_mode`` auto's check, before anything else is fitted: the wide logit fitted on
    ``rows`` (logistically and listwise, ``fit_wide``) from the retrieval score and the transition channels
    against retrieval's order alone, on the stopping half (``start_half``: per-user NDCG@10). The channels are
    kept where the better fit's per-user gain is at least ``min_t`` standard errors (the keep rule's
    ``ranking.keep_min_t``). The ranker's wide weights are left as they were. Returns the report's record."""
    before = copy.deepcopy(ranker.state_dict())
    plain = start_half()
    fitted = {}
    for name, listwise in (("logistic fit", False), ("listwise fit", True)):
        fit_wide(ranker, rows, device, listwise=listwise)
        fitted[name] = start_half()
        ranker.load_state_dict(before)
    best = max(fitted, key=lambda name: float(fitted[name].mean()))
    t = paired_t(fitted[best], plain)
    check = {"kept": bool(t >= min_t), "t_vs_retrieval_order": round(t, 2), "stopping_half": {
        "retrieval order": round(float(plain.mean()), 4),
        **{f"with transitions, {name}": round(float(u.mean()), 4) for name, u in fitted.items()}}}
    log.info("transition channels: stopping-half NDCG@10 %.4f with them (%s), %.4f by retrieval's order, t %.2f; %s",
             float(fitted[best].mean()), best, float(plain.mean()), t, "kept" if check["kept"] else "left out")
    return check


def fit_ranker(cfg: TrainConfig, spec, tables: FeatureTables, fit_rows: Rows, rating_rows: Rows,
               stop_candidates: Candidates, stop_target: EvalTarget, eval_timestamps: np.ndarray,
               device: torch.device, ctx: Distributed,
               rating_scores: Callable[[np.ndarray], np.ndarray] | None = None,
               folds: Folds | None = None, channels: TowerChannels | None = None,
               ease_factors: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[DCNRanker, FitHistory]:
    """Trains the DCN; returns the best epoch's ranker by the pipeline's NDCG@10 on the stopping half, and its
    history (with the start's parameters where an epoch replaced the start: ``FitHistory.start_parameters``).

    ``folds`` (rows from training-log folds, ``fold_rows``) join the CTR examples, but the fixed parts fitted
    before training (the affinities' standardisation and the wide logistic fit) see the validation
    fitting rows only: on a hidden training item EASE's affinity is not what it is on an unseen one. For
    the same reason, with ``ranking.fold_affinity`` "refit" the fold rows train with the affinities of
    EASE refitted without what each fold hid (``fold_affinities``), not with the ranker's tables.
    Tower ``channels`` (``trainer.tower_affinity``; built with ``affinity_channels``' tower count, as
    ``folds`` were) join the affinity after EASE's; the fold rows carry theirs from each fold's visible
    history (``Folds.tower_raw``). ``ease_factors``: EASE's factor tables at ``ranking.affinity_rank`` where
    ``affinity_rank`` computed them already (the same that ``fit_affinity`` would compute).

    Transition channels (``transitions_used``): the successor lists come from the whole training log and are
    standardised on the validation fitting rows; ``ranking.transition_mode`` auto first checks them
    (``check_transitions``) and builds the ranker without them where they do not pay. The fold rows read them
    from their visible history, with ``ranking.fold_transitions`` "refit" through each fold's lists built without
    what it hid (``fold_transitions``), as EASE's affinity is refitted; "shared" reads the ranker's own lists, in
    which a fold's hidden item is counted among the successors of the user's items before it.

    Each epoch pairs every fitting row with one rating row drawn at random. ``rating_scores(index)``,
    when given, returns the retrieval scores of ``rating_rows`` rows ``index``: they are then filled
    into ``rating_rows.scores`` only for the rows an epoch draws (the training log can be far larger
    than what the ranker ever sees).
    """
    rc, mt = cfg.ranking, cfg.multitask
    tower_tables = channels.tables() if channels else None
    stop_ts = eval_timestamps[stop_candidates.users]
    ranker = None

    def build(transitions: bool) -> DCNRanker:
        torch.manual_seed(cfg.run.seed + 1)
        built = DCNRanker(dcn_config(cfg, spec, tables, towers=len(channels) if channels else 0,
                                     transitions=transitions)).to(device)
        if built.n_genres:
            built.set_item_genres(torch.as_tensor(tables.item_num[:, :built.n_genres], dtype=torch.float32,
                                                  device=device))
        return built

    def stopping_half() -> np.ndarray:
        """The ranker's current weights scored on the stopping half: NDCG@10 per user."""
        return pipeline_ndcg_per_user(ranker, tables, stop_candidates, stop_target, stop_ts, cfg, spec.rating_max,
                                      device)

    def start_half() -> np.ndarray:
        """``stopping_half`` of an untrained ranker, from its wide logit alone where that is all it serves."""
        ranker.eval()
        wide = wide_ndcg_per_user(ranker, tables, stop_candidates, stop_target, rc.score_mode, device)
        ranker.train()
        return stopping_half() if wide is None else wide

    ranker = build(transitions=True)
    width = ranker.recent_items
    held_out = fit_rows.with_history(tables, width)
    transition_check = None
    if ranker.transition_items:
        load_transitions(ranker, rc, (rating_rows.users, rating_rows.items, rating_rows.timestamps),
                         tables.vocab.n_items, held_out.history, held_out.items, device)
        if rc.transition_mode == "auto" and held_out.users.size:
            transition_check = check_transitions(ranker, held_out, start_half, rc.keep_min_t, device)
            if not transition_check["kept"]:
                ranker = build(transitions=False)
    fit_rows = held_out if folds is None else Rows.concat([held_out, folds.rows])
    calibrate_start(ranker, fit_rows)
    start_users = None          # the stopping-half NDCG@10 of the start per user, where already measured
    start_choice = None         # the fitted starts' scores and the one kept, where there were starts to choose

    affinities = bool(ranker.affinity_rank and held_out.users.size and fit_affinity(
        ranker, tables, rating_rows, held_out, rc.affinity_l2, np.random.default_rng(cfg.run.seed + 3), device,
        towers=tower_tables, ease_factors=ease_factors))
    if held_out.users.size and (affinities or ranker.transition_items):
        # Three starts, the best on the stopping half kept (the first of equals): the wide inputs' (affinities,
        # transitions) logistic fit, their listwise fit (``fit_wide``) and retrieval's order alone (ml-100k
        # leave-one-out with the sequential tower: EASE is far weaker there).
        starts = {}
        retrieval_order = copy.deepcopy(ranker.state_dict())       # affinity weights still 0
        for name, listwise in (("logistic fit", False), ("listwise fit", True)):
            ranker.load_state_dict(retrieval_order)
            fit_wide(ranker, held_out, device, listwise=listwise)
            starts[name] = (start_half(), copy.deepcopy(ranker.state_dict()))
        ranker.load_state_dict(retrieval_order)
        starts["retrieval order"] = (start_half(), retrieval_order)
        kept_start = max(starts, key=lambda name: float(starts[name][0].mean()))
        start_users = starts[kept_start][0]
        ranker.load_state_dict(starts[kept_start][1])
        log.info("ranker start: stopping-half NDCG@10 %s; kept the %s",
                 ", ".join(f"{float(u.mean()):.4f} by the {name}" for name, (u, _) in starts.items()), kept_start)
        # For the report: each start's stopping-half score and its per-user gain over retrieval's order in
        # standard errors (the keep rule's t; the start is chosen by the score alone).
        start_choice = {"kept": kept_start, "stopping_half": {
            name: {"ndcg@10": round(float(u.mean()), 4),
                   "t_vs_retrieval_order": round(paired_t(u, starts["retrieval order"][0]), 2)}
            for name, (u, _) in starts.items()}}
        if affinities and folds is not None and (rc.fold_affinity == "refit" or tower_tables is not None):
            fit_rows = Rows.concat([held_out.with_affinity(_table_affinity(ranker, held_out)),
                                    folds.rows.with_affinity(_fold_affinity(ranker, tables, rating_rows, folds,
                                                                            tower_tables, cfg, device))])
    if ranker.transition_items and folds is not None and rc.fold_transitions == "refit":
        # fit_rows are the validation fitting rows, then the fold rows (with or without refitted affinities).
        fit_rows = fit_rows.with_transition(np.concatenate([
            table_transitions(ranker, held_out.history, held_out.items),
            fold_transitions(ranker, rc, (rating_rows.users, rating_rows.items, rating_rows.timestamps),
                             tables.vocab.n_items, folds)]))
    ddp_ranker = ctx.wrap(ranker, device)
    optimizer = torch.optim.Adam(ranker.parameters(), lr=rc.learning_rate, weight_decay=rc.weight_decay)
    rng = np.random.default_rng(cfg.run.seed + 1)
    history = FitHistory()
    epochs = 0 if cfg.multitask.mode == "retrieval_only" else rc.epochs
    # Epoch -1 is the untrained ranker, which keeps retrieval's order: training must beat it. Its
    # score is the one measured when the start was chosen (eval mode: the same weights, the same
    # number), else measured now.
    if start_users is None:
        start_users = start_half()
    # Patience follows the best score seen (a gain of ranking.min_improvement restarts it); the ranker kept
    # is the best epoch whose per-user gain over the start is at least ranking.keep_min_t standard errors
    # (config.py says why).
    history.best_score = float(start_users.mean())
    stopper = EarlyStop(rc.patience, rc.min_improvement, reference=history.best_score)
    history.epochs.append({"epoch": -1, "loss": float("nan"), "val_ndcg@10": history.best_score,
                           **({"starts": start_choice} if start_choice else {}),
                           **({"transitions": transition_check} if transition_check else {})})
    best_state = copy.deepcopy(ranker.state_dict())
    start_parameters = {name: best_state[name] for name, _ in ranker.named_parameters()}   # the start's, no copy
    scored = np.zeros(rating_rows.users.size, dtype=bool)
    listwise = rc.loss == "listwise"
    starts = list_starts(fit_rows)

    def fill_rating_scores(index: np.ndarray) -> None:
        """Retrieval scores for the rating rows ``index`` not scored yet (once per row)."""
        if rating_scores is not None:
            todo = index[~scored[index]]
            rating_rows.scores[todo] = rating_scores(todo)
            scored[todo] = True
    for epoch in progress_bar(range(epochs), "ranking", cfg.run.progress and ctx.is_main):
        ranker.train()
        order = ctx.shard(rng.permutation(fit_rows.users.size))
        losses = []
        if listwise:
            # Whole candidate lists per batch, in a random order; each rank takes its share of the batches.
            every = list_batches(starts, rc.batch_size, rng)
            batches = [every[i] for i in ctx.shard(np.arange(len(every)))]
        else:
            batches = [order[start:start + rc.batch_size] for start in range(0, order.size, rc.batch_size)]
        batches = epoch_batches(batches, rc.max_rows_per_epoch, rc.batch_size, ctx.world_size)
        used = int(sum(index.size for index in batches))
        rating_order = rng.choice(rating_rows.users.size, size=used, replace=rating_rows.users.size < used)
        fill_rating_scores(np.unique(rating_order))
        offset = 0
        for index in batches:
            batch = fit_rows.take(index)
            rated = rating_rows.take(rating_order[offset:offset + index.size]).with_history(tables, width)
            offset += index.size
            both = Rows.concat([batch, rated])
            inputs = ranker_inputs(tables, both, device)
            if batch.affinity is not None:             # refitted fold affinities: the rating rows keep the tables'
                with torch.no_grad():
                    rated_raw = ranker.raw_affinity(torch.as_tensor(rated.users, device=device),
                                                    torch.as_tensor(rated.items, device=device))
                inputs["affinity_raw"] = torch.cat([torch.as_tensor(batch.affinity, device=device), rated_raw])
            if batch.transition is not None:           # refitted fold transitions: the rating rows keep the lists'
                rated_transition = table_transitions(ranker, rated.history, rated.items)
                inputs["transition_raw"] = torch.as_tensor(np.concatenate([batch.transition, rated_transition]),
                                                           device=device)
            ctr_logit, rating_pred = ddp_ranker(**inputs)  # one pass (DDP)
            n = batch.users.size
            l_ctr, _ = ranking_losses(ctr_logit[:n], torch.as_tensor(batch.clicks, device=device), rating_pred[:n],
                                      torch.zeros_like(rating_pred[:n]), torch.zeros(n, dtype=torch.bool, device=device))
            if listwise:
                local = np.searchsorted(starts, index, side="right") - 1                 # each row's list
                list_id = np.cumsum(np.r_[0, local[1:] != local[:-1]])
                l_ctr = listwise_loss(ctr_logit[:n], torch.as_tensor(batch.clicks, device=device),
                                      torch.as_tensor(list_id, device=device))
            target = torch.as_tensor(rated.ratings, device=device)
            _, l_rating = ranking_losses(ctr_logit[n:], torch.zeros_like(target), rating_pred[n:], target,
                                         torch.isfinite(target))
            loss = mt.ctr_weight * l_ctr + mt.rating_weight * l_rating
            optimizer_step(optimizer, loss, lambda value: (
                f"ranking loss became {value} at epoch {epoch}; lower ranking.learning_rate "
                f"(now {rc.learning_rate})"))
            losses.append(loss.item())
        per_user = stopping_half()
        ndcg, t = float(per_user.mean()), paired_t(per_user, start_users)
        history.epochs.append({"epoch": epoch, "loss": ctx.all_reduce_mean(float(np.mean(losses))),
                               "val_ndcg@10": ndcg, "t_vs_start": t})
        if ndcg > history.best_score and t >= rc.keep_min_t:
            history.best_score, history.best_epoch = ndcg, epoch
            best_state = copy.deepcopy(ranker.state_dict())
        if stopper.update(ndcg):
            break
    if best_state is not None:
        ranker.load_state_dict(best_state)
    if history.best_epoch >= 0:
        history.start_parameters = start_parameters
    if rc.rating_refit_rows and rc.score_mode == "ctr" and rating_rows.users.size:
        # The served order (CTR only) is not affected, so the stopping-half selection stays exact.
        sample = np.sort(np.random.default_rng(cfg.run.seed + 5).choice(
            rating_rows.users.size, size=min(rc.rating_refit_rows, rating_rows.users.size), replace=False))
        fill_rating_scores(sample)
        before, after = fit_rating_head(ranker, tables, rating_rows.take(sample), device)
        log.info("rating head refitted on %d rows: MSE %.4f -> %.4f", sample.size, before, after)
    ranker.eval()
    return ranker, history
