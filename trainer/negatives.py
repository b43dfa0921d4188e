"""Negative samplers for the retrieval loss: random, popularity ("hard"), model-mined and mixtures.

Every sampler draws item indices in 1..n_items (never the OOV / padding row 0) with
``sample(user_idx (B,), n_neg) -> (B, n_neg)`` and reports ``log_q(item_idx (B, S), user_idx (B,))``,
the log probability that one draw for that row yields that item, for the loss's logQ correction.
Each sampler owns a seeded ``torch.Generator`` so runs repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from trainer.models.layers import check_int

STRATEGIES = ("random", "hard", "mixed")
TopItemsFn = Callable[[Tensor], Tensor]


class NegativeSampler(Protocol):
    def sample(self, user_idx: Tensor, n_neg: int) -> Tensor: ...

    def log_q(self, item_idx: Tensor, user_idx: Tensor | None = None) -> Tensor: ...


def _check_request(user_idx: Tensor, n_neg: int) -> None:
    if user_idx.dim() != 1:
        raise ValueError(f"user_idx must have shape (B,), got {tuple(user_idx.shape)}")
    check_int("n_neg", n_neg, 1)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class UniformSampler:
    """Every item 1..n_items with probability 1 / n_items."""

    def __init__(self, n_items: int, seed: int = 0) -> None:
        check_int("n_items", n_items, 1)
        self.n_items = n_items
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, user_idx: Tensor, n_neg: int) -> Tensor:
        _check_request(user_idx, n_neg)
        return torch.randint(1, self.n_items + 1, (user_idx.shape[0], n_neg), generator=self.generator)

    def log_q(self, item_idx: Tensor, user_idx: Tensor | None = None) -> Tensor:
        return torch.full(item_idx.shape, -math.log(self.n_items))


class PopularitySampler:
    """Item i with probability proportional to (count_i + 1) ** alpha: popular items, the "hard" negatives.

    ``item_counts`` (n_items + 1,) is indexed by item index; entry 0 (OOV) is ignored. The + 1 keeps
    every item drawable, so log q stays finite for items unseen in training. alpha 0 is uniform,
    1 the unigram distribution; 0.75 is word2vec's compromise.
    """

    def __init__(self, item_counts: Tensor, alpha: float = 0.75, seed: int = 0) -> None:
        counts = torch.as_tensor(item_counts, dtype=torch.float64)
        if counts.dim() != 1 or counts.shape[0] < 2:
            raise ValueError(f"item_counts must have shape (n_items + 1,) with n_items >= 1, got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError(f"item_counts must be finite and >= 0, got min {counts.min().item()!r}")
        if not _is_real(alpha) or not 0.0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
        weights = (counts + 1.0) ** alpha
        weights[0] = 0.0  # row 0 is OOV / padding, never a negative
        self.probs = weights / weights.sum()  # (n_items + 1,) float64
        self.log_probs = self.probs.log().to(torch.float32)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, user_idx: Tensor, n_neg: int) -> Tensor:
        _check_request(user_idx, n_neg)
        draws = torch.multinomial(self.probs, user_idx.shape[0] * n_neg, replacement=True, generator=self.generator)
        return draws.view(user_idx.shape[0], n_neg)  # (B * n_neg,) -> (B, n_neg)

    def log_q(self, item_idx: Tensor, user_idx: Tensor | None = None) -> Tensor:
        return self.log_probs[item_idx]


class ModelHardSampler:
    """Items the current model ranks high for the user: uniform draws from ``top_items(user_idx)``.

    ``top_items`` maps user indices (B,) to their top-scored item indices (B, top_k) in 1..n_items
    (typically a table the trainer recomputes every few epochs). q(i | u) = (times i appears in u's
    list) / top_k, so ``log_q`` needs the users and is -inf for items outside their lists. Hits on the
    user's own positives are removed by the loss, not here.
    """

    def __init__(self, top_items: TopItemsFn, n_items: int, top_k: int, seed: int = 0) -> None:
        check_int("n_items", n_items, 1)
        check_int("top_k", top_k, 1)
        self.top_items = top_items
        self.n_items = n_items
        self.top_k = top_k
        self.generator = torch.Generator().manual_seed(seed)

    def _lists(self, user_idx: Tensor) -> Tensor:
        top = self.top_items(user_idx)
        if tuple(top.shape) != (user_idx.shape[0], self.top_k):
            raise ValueError(f"top_items(user_idx) must have shape ({user_idx.shape[0]}, {self.top_k}), "
                             f"got {tuple(top.shape)}")
        if top.numel() and not (1 <= int(top.min()) and int(top.max()) <= self.n_items):
            raise ValueError(f"top_items(user_idx) must hold item indices in [1, {self.n_items}], "
                             f"got range [{int(top.min())}, {int(top.max())}]")
        return top.to(torch.int64)

    def sample(self, user_idx: Tensor, n_neg: int) -> Tensor:
        _check_request(user_idx, n_neg)
        top = self._lists(user_idx)  # (B, K)
        picks = torch.randint(0, self.top_k, (user_idx.shape[0], n_neg), generator=self.generator)
        return torch.gather(top, 1, picks)  # (B, n_neg)

    def log_q(self, item_idx: Tensor, user_idx: Tensor | None = None) -> Tensor:
        if user_idx is None:
            raise ValueError("user_idx must be given to ModelHardSampler.log_q (q depends on the user), got None")
        top = self._lists(user_idx)  # (B, K)
        hits = (item_idx.unsqueeze(2) == top.unsqueeze(1)).sum(dim=2)  # (B, S, 1) == (B, 1, K) -> (B, S)
        return (hits.to(torch.float32) / self.top_k).log()


class MixedSampler:
    """A fixed share of each row's draws from each component: ``[(sampler, fraction), ...]``, fractions sum to 1.

    ``round(fraction * n_neg)`` draws per component (largest remainder, so they add up to n_neg), then
    concatenated in component order. q is the mixture sum_k fraction_k * q_k.
    """

    def __init__(self, components: Sequence[tuple[NegativeSampler, float]]) -> None:
        fractions = [fraction for _, fraction in components]
        if not components or not all(_is_real(f) and f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"components must be (sampler, fraction > 0) pairs with fractions summing to 1, "
                             f"got fractions {fractions!r}")
        self.components = list(components)

    def counts(self, n_neg: int) -> list[int]:
        """Draws per component for ``n_neg`` draws in all: floors plus the largest remainders."""
        exact = [fraction * n_neg for _, fraction in self.components]
        counts = [math.floor(e) for e in exact]
        by_remainder = sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])
        for k in by_remainder[: n_neg - sum(counts)]:
            counts[k] += 1
        return counts

    def sample(self, user_idx: Tensor, n_neg: int) -> Tensor:
        _check_request(user_idx, n_neg)
        parts = [sampler.sample(user_idx, count)
                 for (sampler, _), count in zip(self.components, self.counts(n_neg)) if count > 0]
        return torch.cat(parts, dim=1)  # (B, n_neg)

    def log_q(self, item_idx: Tensor, user_idx: Tensor | None = None) -> Tensor:
        terms = [math.log(fraction) + sampler.log_q(item_idx, user_idx) for sampler, fraction in self.components]
        return torch.logsumexp(torch.stack(terms), dim=0)  # (K, B, S) -> (B, S)


def make_sampler(strategy: str, n_items: int, *, item_counts: Tensor | None = None, alpha: float = 0.75,
                 hard_fraction: float = 0.5, top_items: TopItemsFn | None = None, top_k: int = 100,
                 seed: int = 0) -> NegativeSampler:
    """The sampler of a strategy: "random" uniform, "hard" popularity, "mixed" both.

    "mixed" draws ``1 - hard_fraction`` uniformly and ``hard_fraction`` by popularity; given
    ``top_items`` the hard share is split evenly between popularity and the model's top items.
    "hard" and "mixed" need ``item_counts``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "random":
        return UniformSampler(n_items, seed=seed)
    if item_counts is None:
        raise ValueError(f"item_counts must be given for strategy {strategy!r}, got None")
    if len(item_counts) != n_items + 1:
        raise ValueError(f"item_counts must have n_items + 1 = {n_items + 1} entries, got {len(item_counts)}")
    popularity = PopularitySampler(item_counts, alpha=alpha, seed=seed + 1)
    if strategy == "hard":
        return popularity
    if not _is_real(hard_fraction) or not 0.0 < hard_fraction < 1.0:
        raise ValueError(f"hard_fraction must be a float in (0, 1), got {hard_fraction!r}")
    components: list[tuple[NegativeSampler, float]] = [(UniformSampler(n_items, seed=seed), 1.0 - hard_fraction)]
    if top_items is None:
        components.append((popularity, hard_fraction))
    else:
        model = ModelHardSampler(top_items, n_items, top_k, seed=seed + 2)
        components += [(popularity, hard_fraction / 2), (model, hard_fraction / 2)]
    return MixedSampler(components)
