"""Model input dictionaries built from the index-aligned feature tables.

The key names are the argument names of the exported programs (docs/ARCHITECTURE.md, "Model
inputs"); the services build the same dictionaries from Redis rows or the artifact tables.
"""

from __future__ import annotations

import numpy as np
import torch

USER_KEYS = ("user_idx", "user_cat", "user_num", "history", "timestamp")
ITEM_KEYS = ("item_idx", "item_cat", "item_num")


def user_inputs(tables, user_idx: np.ndarray, timestamp: np.ndarray,
                device: torch.device | str = "cpu", history: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the user tower for users ``user_idx`` (B,) at times ``timestamp`` (B,) seconds.

    A given ``history`` (B, W) is used instead of the users' stored (B, H) one, which is then not
    gathered (the ranker reads only the last few items of a long history)."""
    user_idx = np.asarray(user_idx, dtype=np.int64)
    history = tables.history[user_idx] if history is None else history
    return {
        "user_idx": torch.as_tensor(user_idx, device=device),
        "user_cat": torch.as_tensor(tables.user_cat[user_idx], device=device),    # (B, Cu)
        "user_num": torch.as_tensor(tables.user_num[user_idx], device=device),    # (B, Nu)
        "history": torch.as_tensor(history, device=device),                       # (B, H) or (B, W)
        "timestamp": torch.as_tensor(np.asarray(timestamp, dtype=np.int64), device=device),
    }


def item_inputs(tables, item_idx: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inputs of the item tower (and the item half of the ranker) for items ``item_idx`` (N,)."""
    item_idx = np.asarray(item_idx, dtype=np.int64)
    return {
        "item_idx": torch.as_tensor(item_idx, device=device),
        "item_cat": torch.as_tensor(tables.item_cat[item_idx], device=device),    # (N, Ci)
        "item_num": torch.as_tensor(tables.item_num[item_idx], device=device),    # (N, Ni)
    }


def mask_items_in_history(history: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
    """Zeroes (pads) occurrences of each row's target item in its history: (B, H), (B,) -> (B, H).

    In training the target must not be visible in the features that predict it.
    """
    return history.masked_fill(history == item_idx.unsqueeze(1), 0)
