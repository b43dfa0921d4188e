"""Building blocks shared by the two towers and the ranker, and the checks of their configs.

``CategoricalEmbedding`` embeds several categorical columns from one table, ``masked_mean`` pools a
0-padded history (``padded_mean`` the same from a padding_idx-0 table's ids, faster), ``mlp`` builds
the ReLU stacks. Everything here is torch.export-able.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Why small: id and categorical embeddings start at the scale of standardised numeric features'
# noise instead of N(0, 1), so no single input dominates the first MLP layer at initialisation.
EMBEDDING_INIT_STD = 0.05


def init_embedding(table: nn.Embedding) -> nn.Embedding:
    """Re-initialises ``table`` with N(0, EMBEDDING_INIT_STD), keeping a padding row at zero."""
    nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
    if table.padding_idx is not None:
        with torch.no_grad():
            table.weight[table.padding_idx].zero_()
    return table


class CategoricalEmbedding(nn.Module):
    """Embeds C categorical columns, each an index into its own vocabulary (0 = OOV), from one table.

    Column c's indices are shifted by the sum of the previous cardinalities, so one lookup serves
    all columns. Output (B, C * dim); C may be 0, giving (B, 0).
    """

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        offsets = [0]
        for cardinality in cardinalities[:-1]:
            offsets.append(offsets[-1] + cardinality)
        self.n_columns = len(cardinalities)
        self.dim = dim
        self.table = init_embedding(nn.Embedding(sum(cardinalities), dim))
        self.register_buffer("offsets", torch.tensor(offsets[: self.n_columns], dtype=torch.int64))

    @property
    def output_dim(self) -> int:
        return self.n_columns * self.dim

    def forward(self, cat: Tensor) -> Tensor:
        rows = cat + self.offsets.unsqueeze(0)  # (B, C)
        return self.table(rows).flatten(1)  # (B, C, dim) -> (B, C * dim)


def masked_mean(embeddings: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``embeddings`` (B, H, D) over the positions where ``mask`` (B, H) is True; 0 if none."""
    weights = mask.to(embeddings.dtype).unsqueeze(-1)  # (B, H, 1)
    total = (embeddings * weights).sum(dim=1)  # (B, D)
    count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1); an empty history pools to zeros
    return total / count


def padded_mean(table: nn.Embedding, ids: Tensor) -> Tensor:
    """Mean of ``table``'s rows for the non-zero ``ids`` (B, H) -> (B, D); 0 where every id is 0.

    ``table`` must have padding_idx 0: its row 0 is zero and gets no gradient, so summing every
    position gives ``masked_mean(table(ids), ids != 0)`` bit for bit, gradients included, without
    the (B, H, D) mask product and its backward (a 200-item history, 128 rows: about 2.3x faster
    forward + backward, measured on one thread).
    """
    if table.padding_idx != 0:
        raise ValueError(f"padded_mean needs a table with padding_idx 0, got {table.padding_idx!r}")
    total = table(ids).sum(dim=1)                                               # (B, H, D) -> (B, D)
    count = (ids != 0).sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)    # (B, 1)
    return total / count


def mlp(input_dim: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for every width in ``hidden_dims``; output width hidden_dims[-1]."""
    layers: list[nn.Module] = []
    width = input_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*layers)


def check_int(name: str, value: object, low: int) -> None:
    """Raises ValueError unless ``value`` is an int (not bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_int_tuple(name: str, value: object, low: int, allow_empty: bool) -> None:
    """Raises ValueError unless ``value`` is a tuple of ints >= ``low`` (non-empty unless allowed)."""
    if (not isinstance(value, tuple) or (not value and not allow_empty)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        emptiness = "a" if allow_empty else "a non-empty"
        raise ValueError(f"{name} must be {emptiness} tuple of ints >= {low}, got {value!r}")


def check_dropout(value: object) -> None:
    """Raises ValueError unless ``value`` is a probability in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")


def check_feature_sizes(n_users: object, n_items: object, user_cat_cardinalities: object, n_user_num: object,
                        item_cat_cardinalities: object, n_item_num: object) -> None:
    """The checks both model configs share: vocabulary sizes and feature widths."""
    check_int("n_users", n_users, 0)
    check_int("n_items", n_items, 0)
    # Each cardinality includes the OOV row 0, so a vocabulary has at least one row.
    check_int_tuple("user_cat_cardinalities", user_cat_cardinalities, 1, allow_empty=True)
    check_int_tuple("item_cat_cardinalities", item_cat_cardinalities, 1, allow_empty=True)
    check_int("n_user_num", n_user_num, 0)
    check_int("n_item_num", n_item_num, 0)


def check_finite(name: str, value: object) -> float:
    """Returns ``value`` as a float, raising ValueError unless it is a finite real number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)
