"""Training losses: sampled softmax with logQ correction for retrieval, BCE + MSE for ranking.

Retrieval row i scores its positive against every other row's positive (in-batch negatives) and its
own sampler negatives. Each candidate logit is s / T - log q, q the probability that the candidate
was drawn as a negative (Yi et al. 2019, "Sampling-bias-corrected neural modeling"): without it the
popular items, which appear often as in-batch negatives, would be pushed down too hard. Candidates
that are really the row's positive item (accidental hits) are removed from the softmax.

Every training loop takes its optimizer steps through ``optimizer_step``, so a diverging loss stops
each of them with the same ``NonFiniteLossError``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

SeenMaskFn = Callable[[Tensor], Tensor]


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """Training diverged; nothing from this run may be published.

    A ``FloatingPointError`` (and, as it always was in retrieval, a ``RuntimeError``), so callers
    that caught either before still catch it."""


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, describe: Callable[[float], str]) -> None:
    """One step on ``loss``; a non-finite loss raises ``NonFiniteLossError(describe(value))`` first."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(describe(loss.item()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _check_negatives(neg_emb: Tensor | None, neg_log_q: Tensor | None, neg_idx: Tensor | None,
                     batch: int, dim: int) -> None:
    given = [t is not None for t in (neg_emb, neg_log_q, neg_idx)]
    if any(given) and not all(given):
        raise ValueError(f"neg_emb, neg_log_q and neg_idx must be all given or all None, got given={given}")
    if neg_emb is None or neg_log_q is None or neg_idx is None:
        return
    if neg_emb.dim() == 2:  # negatives shared by every row
        if neg_emb.shape[1] != dim:
            raise ValueError(f"shared neg_emb must have shape (S, {dim}), got {tuple(neg_emb.shape)}")
        _check_shape("neg_log_q", neg_log_q, (neg_emb.shape[0],))
        _check_shape("neg_idx", neg_idx, (neg_emb.shape[0],))
        return
    if neg_emb.dim() != 3 or neg_emb.shape[0] != batch or neg_emb.shape[2] != dim:
        raise ValueError(f"neg_emb must have shape ({batch}, S, {dim}), got {tuple(neg_emb.shape)}")
    _check_shape("neg_log_q", neg_log_q, tuple(neg_emb.shape[:2]))
    _check_shape("neg_idx", neg_idx, tuple(neg_emb.shape[:2]))


def sampled_softmax_loss(user_emb: Tensor, pos_emb: Tensor, neg_emb: Tensor | None, temperature: Tensor | float,
                         pos_log_q: Tensor, neg_log_q: Tensor | None, pos_idx: Tensor, neg_idx: Tensor | None,
                         user_seen_mask_fn: SeenMaskFn | None = None) -> Tensor:
    """Mean over rows of -log softmax(positive) among in-batch and sampler candidates (a 0-d tensor).

    user_emb, pos_emb (B, D); neg_emb (B, S, D) per-row negatives, or (S, D) negatives shared by
    every row, or None (in-batch only); pos_log_q (B,) and neg_log_q (B, S) or (S,) are log sampling
    probabilities; pos_idx (B,), neg_idx (B, S) or (S,) item indices.
    Masked (-inf): another row's positive equal to this row's positive item, a sampler negative equal
    to it, and, if ``user_seen_mask_fn`` is given, every negative it marks True. It is called with the
    candidate item indices (B, B + S) (the in-batch columns first) and must return a bool mask of the
    same shape, True where the row's user has interacted with the item; the row's own positive is
    never masked.
    """
    if user_emb.dim() != 2:
        raise ValueError(f"user_emb must have shape (B, D), got {tuple(user_emb.shape)}")
    batch, dim = user_emb.shape
    _check_shape("pos_emb", pos_emb, (batch, dim))
    _check_shape("pos_log_q", pos_log_q, (batch,))
    _check_shape("pos_idx", pos_idx, (batch,))
    _check_negatives(neg_emb, neg_log_q, neg_idx, batch, dim)
    temperature_value = float(temperature.detach()) if isinstance(temperature, Tensor) else float(temperature)
    if not temperature_value > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature_value!r}")

    logits = user_emb @ pos_emb.T / temperature - pos_log_q.unsqueeze(0)  # (B, D) @ (D, B) -> (B, B)
    candidates = pos_idx.unsqueeze(0).expand(batch, batch)  # (B, B): column j holds row j's positive
    if neg_emb is not None and neg_log_q is not None and neg_idx is not None:
        if neg_emb.dim() == 2:  # shared: one matmul, no (B, S, D) tensor
            sampled = user_emb @ neg_emb.T  # (B, D) @ (D, S) -> (B, S)
            neg_log_q, neg_idx = neg_log_q.unsqueeze(0), neg_idx.unsqueeze(0).expand(batch, -1)
        else:
            sampled = torch.bmm(neg_emb, user_emb.unsqueeze(2)).squeeze(2)  # (B, S, D) @ (B, D, 1) -> (B, S)
        logits = torch.cat([logits, sampled / temperature - neg_log_q], dim=1)  # (B, B + S)
        candidates = torch.cat([candidates, neg_idx], dim=1)  # (B, B + S)

    is_positive = torch.zeros_like(candidates, dtype=torch.bool)
    is_positive[:, :batch] = torch.eye(batch, dtype=torch.bool, device=candidates.device)
    masked = candidates == pos_idx.unsqueeze(1)  # (B, B + S) accidental hits (and the diagonal)
    if user_seen_mask_fn is not None:
        seen = user_seen_mask_fn(candidates)
        _check_shape("user_seen_mask_fn(candidates)", seen, tuple(candidates.shape))
        masked = masked | seen.to(torch.bool)
    logits = logits.masked_fill(masked & ~is_positive, float("-inf"))
    target = torch.arange(batch, device=logits.device)  # row i's positive is in-batch column i
    return F.cross_entropy(logits, target)


def grouped_sampled_softmax_loss(user_emb: Tensor, row_user: Tensor, pos_emb: Tensor, neg_emb: Tensor | None,
                                 temperature: Tensor | float, pos_log_q: Tensor, neg_log_q: Tensor | None,
                                 pos_idx: Tensor, neg_idx: Tensor | None, user_seen: Tensor | None = None,
                                 row_weight: Tensor | None = None) -> Tensor:
    """``sampled_softmax_loss`` for rows grouped by user, negatives shared, each user's items masked.

    The same loss as ``sampled_softmax_loss(user_emb[row_user], ...)`` with shared negatives and a
    seen mask that holds every item of the row's user, computed on (U, B + S) logits instead of
    (B, B + S): the rows of one user share their scores and their mask, and differ only in which
    column is their positive. With ``Z_u`` the sum of ``exp(logit)`` over the columns user u may
    see as negatives, row r (user u, in-batch column r) loses ``log(Z_u + exp(l_ur)) - l_ur``.

    user_emb (U, D); row_user (B,) each row's user (index into user_emb); pos_emb (B, D); neg_emb
    (S, D) or None; pos_log_q (B,), neg_log_q (S,); pos_idx (B,), neg_idx (S,) item indices.
    ``user_seen`` (U, B + S) bool, True where the user interacted with the candidate column's item
    (in-batch columns first). Masked for user u: every column holding one of u's own positives in
    this batch (their accidental hits included) and every column ``user_seen`` marks; the row's own
    positive column is never masked for that row.
    """
    if user_emb.dim() != 2:
        raise ValueError(f"user_emb must have shape (U, D), got {tuple(user_emb.shape)}")
    n_users, dim = user_emb.shape
    if pos_emb.dim() != 2 or pos_emb.shape[1] != dim:
        raise ValueError(f"pos_emb must have shape (B, {dim}), got {tuple(pos_emb.shape)}")
    batch = pos_emb.shape[0]
    for name, tensor in (("row_user", row_user), ("pos_log_q", pos_log_q), ("pos_idx", pos_idx)):
        _check_shape(name, tensor, (batch,))
    if batch and (int(row_user.min()) < 0 or int(row_user.max()) >= n_users):
        raise ValueError(f"row_user must index user_emb's {n_users} rows, got range "
                         f"[{int(row_user.min())}, {int(row_user.max())}]")
    given = [t is not None for t in (neg_emb, neg_log_q, neg_idx)]
    if any(given) and not all(given):
        raise ValueError(f"neg_emb, neg_log_q and neg_idx must be all given or all None, got given={given}")
    if neg_emb is not None and neg_log_q is not None and neg_idx is not None:
        if neg_emb.dim() != 2 or neg_emb.shape[1] != dim:
            raise ValueError(f"neg_emb must have shape (S, {dim}), got {tuple(neg_emb.shape)}")
        _check_shape("neg_log_q", neg_log_q, (neg_emb.shape[0],))
        _check_shape("neg_idx", neg_idx, (neg_emb.shape[0],))
        cand_emb = torch.cat([pos_emb, neg_emb])                                  # (C, D), C = B + S
        cand_log_q = torch.cat([pos_log_q, neg_log_q])
        cand_idx = torch.cat([pos_idx, neg_idx])
    else:
        cand_emb, cand_log_q, cand_idx = pos_emb, pos_log_q, pos_idx
    temperature_value = float(temperature.detach()) if isinstance(temperature, Tensor) else float(temperature)
    if not temperature_value > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature_value!r}")
    if user_seen is not None:
        _check_shape("user_seen", user_seen, (n_users, cand_idx.shape[0]))

    logits = user_emb @ cand_emb.T / temperature - cand_log_q.unsqueeze(0)        # (U, D) @ (D, C) -> (U, C)
    # Columns holding one of the user's own positives: mark (user, distinct item), then spread to columns.
    unique, inverse = torch.unique(cand_idx, return_inverse=True)                  # (K,), (C,)
    own = torch.zeros(n_users, unique.shape[0], dtype=torch.bool, device=logits.device)
    own[row_user, inverse[:batch]] = True
    masked = own[:, inverse]                                                       # (U, C)
    if user_seen is not None:
        masked = masked | user_seen.to(torch.bool)
    # A large finite fill instead of -inf keeps a user with every column masked finite (Z_u = 0).
    log_z = torch.logsumexp(logits.masked_fill(masked, torch.finfo(logits.dtype).min), dim=1)  # (U,)
    pos_logit = logits[row_user, torch.arange(batch, device=logits.device)]       # (B,) in-batch column r
    return _row_mean(torch.logaddexp(log_z[row_user], pos_logit) - pos_logit, row_weight)


def full_softmax_loss(user_emb: Tensor, row_user: Tensor, item_emb: Tensor, temperature: Tensor | float,
                      pos_idx: Tensor, user_seen: Tensor, row_weight: Tensor | None = None) -> Tensor:
    """Mean over rows of -log softmax(positive) over the WHOLE catalog, rows grouped by user.

    user_emb (U, D); row_user (B,) each row's user; item_emb (M, D) every item in index order (row 0
    the padding item); pos_idx (B,) each row's positive item index in [1, M); ``user_seen`` (U, M)
    bool, True where the user has the item in training. Row r (user u) loses
    ``log(Z_u + exp(l_ur)) - l_ur`` with ``Z_u`` the sum of ``exp(logit)`` over the items u has not
    seen (padding excluded), as ``grouped_sampled_softmax_loss`` with every item a candidate: no
    sampling, so no logQ correction."""
    if user_emb.dim() != 2 or item_emb.dim() != 2 or item_emb.shape[1] != user_emb.shape[1]:
        raise ValueError(f"user_emb (U, D) and item_emb (M, D) must share D, got {tuple(user_emb.shape)} "
                         f"and {tuple(item_emb.shape)}")
    n_users, n_items = user_emb.shape[0], item_emb.shape[0]
    batch = pos_idx.shape[0]
    _check_shape("row_user", row_user, (batch,))
    _check_shape("user_seen", user_seen, (n_users, n_items))
    if batch and (int(pos_idx.min()) < 1 or int(pos_idx.max()) >= n_items):
        raise ValueError(f"pos_idx must hold item indices in [1, {n_items}), got range "
                         f"[{int(pos_idx.min())}, {int(pos_idx.max())}]")
    temperature_value = float(temperature.detach()) if isinstance(temperature, Tensor) else float(temperature)
    if not temperature_value > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature_value!r}")
    logits = user_emb @ item_emb.T / temperature                                    # (U, D) @ (D, M) -> (U, M)
    masked = user_seen.to(torch.bool).clone()
    masked[:, 0] = True                                                             # the padding item
    log_z = torch.logsumexp(logits.masked_fill(masked, torch.finfo(logits.dtype).min), dim=1)  # (U,)
    pos_logit = logits[row_user, pos_idx]                                           # (B,)
    return _row_mean(torch.logaddexp(log_z[row_user], pos_logit) - pos_logit, row_weight)


def _row_mean(per_row: Tensor, row_weight: Tensor | None) -> Tensor:
    """The rows' mean loss, or their ``row_weight``-weighted mean (B,)."""
    if row_weight is None:
        return per_row.mean()
    _check_shape("row_weight", row_weight, per_row.shape)
    return (per_row * row_weight).sum() / row_weight.sum().clamp(min=1e-12)


def distillation_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of the cross-entropy -sum_i p_i log q_i between the teacher's softmax p of
    ``teacher_logits`` (U, M) and the student's softmax q of ``logits`` (U, M), both over the items
    whose teacher logit is finite (-inf, such as a user's training items, takes no part in either).
    Rows without a finite teacher logit add 0."""
    if logits.dim() != 2 or teacher_logits.shape != logits.shape:
        raise ValueError(f"logits and teacher_logits must have the same (U, M) shape, got {tuple(logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    support = torch.isfinite(teacher_logits)
    lowest = torch.finfo(logits.dtype).min
    p = torch.softmax(teacher_logits.masked_fill(~support, lowest), dim=1) * support     # 0 off the support
    log_q = torch.log_softmax(logits.masked_fill(~support, lowest), dim=1)
    return -(p * log_q.masked_fill(~support, 0.0)).sum(dim=1).mean()


def ranking_losses(ctr_logit: Tensor, labels: Tensor, rating_pred: Tensor, rating: Tensor,
                   rating_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(l_ctr, l_rating): BCE-with-logits over all N rows, MSE over the rows where ``rating_mask`` is True.

    Every argument is (N,): labels 0/1 floats, ``rating`` arbitrary where the mask is False. With no
    rated row l_rating is 0 (still attached to the graph, so the caller can always backpropagate).
    """
    if ctr_logit.dim() != 1:
        raise ValueError(f"ctr_logit must have shape (N,), got {tuple(ctr_logit.shape)}")
    shape = tuple(ctr_logit.shape)
    for name, tensor in (("labels", labels), ("rating_pred", rating_pred), ("rating", rating),
                         ("rating_mask", rating_mask)):
        _check_shape(name, tensor, shape)
    if rating_mask.dtype != torch.bool:
        raise ValueError(f"rating_mask must be a bool tensor, got dtype {rating_mask.dtype}")
    l_ctr = F.binary_cross_entropy_with_logits(ctr_logit, labels.to(ctr_logit.dtype))
    if bool(rating_mask.any()):
        l_rating = F.mse_loss(rating_pred[rating_mask], rating[rating_mask].to(rating_pred.dtype))
    else:
        l_rating = rating_pred.sum() * 0.0
    return l_ctr, l_rating


def multitask_loss(l_retrieval: Tensor, l_rating: Tensor, l_ctr: Tensor, alpha: float, beta: float) -> Tensor:
    """L = L_retrieval + alpha * L_rating + beta * L_ctr, alpha and beta >= 0."""
    for name, weight in (("alpha", alpha), ("beta", beta)):
        if not float(weight) >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {weight!r}")
    return l_retrieval + alpha * l_rating + beta * l_ctr
