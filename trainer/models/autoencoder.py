"""The autoencoder tower: a multinomial denoising autoencoder (Mult-DAE, Liang et al. 2018) served as a
two-tower model.

The encoder reads the user's history as a set: each history item's row of an input table (m+1, H), summed
and divided by sqrt(history length) (the L2-normalised multi-hot of the paper times the first weight
matrix), plus a bias, through tanh: the user vector h (B, H). The decoder scores every item as
h . w_i + b_i, a row w_i and a bias b_i per item: an item tower with no inputs but the item's index. So
both halves fit the project's contract unchanged: ``AutoencoderUserTower`` takes the user tower's
inputs (it reads only ``history``) and returns [h, 1] (B, H + 1); ``AutoencoderItemTower`` returns
[w_i, b_i] (N, H + 1); their inner product is the decoder's logit, which the retrieval index searches
(inner product, not cosine) and the services divide by ``temperature`` (fixed at 1 here).

Training (trainer/autoencoder_training.py) hides a share of each history (dropout on the input) and
fits a softmax over the whole catalog to all of the user's training items at once. It reads no user
id, features or time and no item features: everything it knows comes from histories, which is why a
history recorded online moves the user vector at once and why unknown users with a history are
served as well as known ones.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainer.models.layers import check_dropout, check_int


class AutoencoderUserTower(nn.Module):
    """The encoder: ``history`` (B, L) of item indices, 0-padded -> [tanh(sum_j V[j] / sqrt(n) + c), 1]
    (B, H + 1). In training, ``dropout`` of the history entries are hidden (each kept one scaled by
    1 / (1 - dropout), the normalisation still that of the whole history); a history that is empty
    (or all hidden) gives tanh(c)."""

    def __init__(self, n_items: int, hidden: int, dropout: float = 0.5) -> None:
        super().__init__()
        check_int("n_items", n_items, 1)
        check_int("hidden", hidden, 1)
        check_dropout(dropout)
        self.dropout = dropout
        self.gather = False        # True in the copy that is exported and served (``for_serving``)
        self.history_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.bias = nn.Parameter(torch.zeros(hidden))
        bound = 1.0 / math.sqrt(hidden)   # xavier-like for a layer whose input is a unit vector
        nn.init.uniform_(self.history_embedding.weight, -bound, bound)
        with torch.no_grad():
            self.history_embedding.weight[0].zero_()

    def for_serving(self) -> "AutoencoderUserTower":
        """A copy in eval mode that computes the same vectors by gathering the history's rows: a request's
        cost then follows its history (~200 items), not the catalog. This copy is the exported program."""
        served = copy.deepcopy(self).eval()
        served.gather = True
        return served

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor,
                timestamp: Tensor) -> Tensor:
        present = (history != 0).to(self.bias.dtype)                            # (B, L)
        count = present.sum(dim=1, keepdim=True).clamp(min=1.0)                 # (B, 1)
        weights = present / count.sqrt()                                        # the normalised multi-hot
        if self.training and self.dropout > 0:
            keep = torch.rand_like(weights) >= self.dropout
            weights = weights * keep / (1.0 - self.dropout)
        if self.gather:
            # Serving: the L history rows, weighted and summed; its cost follows the history, not the catalog.
            encoded = (self.history_embedding(history) * weights.unsqueeze(-1)).sum(dim=1)        # (B, H)
        else:
            # Training and validation (100-512 users at once): one weighted bag sum per user, without the
            # (B, L, H) gather and its backward (~9x faster per step; not an operator the export takes).
            encoded = F.embedding_bag(history, self.history_embedding.weight, mode="sum",
                                      per_sample_weights=weights)                                  # (B, H)
        hidden = torch.tanh(encoded + self.bias)
        return torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)      # (B, H + 1)


class AutoencoderItemTower(nn.Module):
    """The decoder's item side: ``item_idx`` (N,) -> [w_i, b_i] (N, H + 1). Row 0 (unknown / padding)
    starts at zero; it is left out of the training softmax and of every ranking, as with the other towers."""

    def __init__(self, n_items: int, hidden: int) -> None:
        super().__init__()
        check_int("n_items", n_items, 1)
        check_int("hidden", hidden, 1)
        self.weight = nn.Parameter(torch.empty(n_items + 1, hidden))
        self.bias = nn.Parameter(torch.zeros(n_items + 1))
        bound = 1.0 / math.sqrt(hidden)
        nn.init.uniform_(self.weight, -bound, bound)
        with torch.no_grad():
            self.weight[0].zero_()

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] + 1

    def forward(self, item_idx: Tensor, item_cat: Tensor, item_num: Tensor) -> Tensor:
        return torch.cat([self.weight[item_idx], self.bias[item_idx].unsqueeze(1)], dim=1)   # (N, H + 1)

    def catalog_logits(self, user: Tensor) -> Tensor:
        """Every item's logit (B, m + 1) for user vectors [h, 1] (B, H + 1): ``user @ forward(all).T``
        without gathering the whole table first (a third of a training step's time on a 10k catalog)."""
        return user[:, :-1] @ self.weight.T + self.bias


class AutoencoderTwoTower(nn.Module):
    """Both halves, shaped like ``TwoTower`` for everything downstream (candidate retrieval, the ranker's
    folds and its retrieval-score input, export, the index): scores are inner products over a
    temperature, which is 1."""

    def __init__(self, n_items: int, hidden: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.user_tower = AutoencoderUserTower(n_items, hidden, dropout)
        self.item_tower = AutoencoderItemTower(n_items, hidden)
        self.register_buffer("log_temperature", torch.tensor(0.0))

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor, timestamp: Tensor,
                item_idx: Tensor | None = None, item_cat: Tensor | None = None,
                item_num: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, H+1) user and (N, H+1) item vectors; without items, the user vectors and every item's logit
        (B, m+1) (the training step's call, through DistributedDataParallel when it wraps the model)."""
        user = self.user_tower(user_idx, user_cat, user_num, history, timestamp)
        if item_idx is None:
            return user, self.item_tower.catalog_logits(user)
        return user, self.item_tower(item_idx, item_cat, item_num)
