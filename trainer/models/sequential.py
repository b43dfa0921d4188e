"""The sequential user tower: causal self-attention over the user's most recent items (SASRec style).

It takes exactly the user tower's inputs (docs/ARCHITECTURE.md, "Model inputs") and returns (B, D)
L2-normalised embeddings, so the exported program and the services are unchanged. The history is
read as a sequence: its last ``sequence_length`` items (oldest first, left-padded with 0) get a
learned embedding for their distance from the newest slot, pass through ``sequence_blocks``
pre-norm Transformer blocks with a causal mask (a position sees itself and older items only; padding
is never attended to), and the state at the newest item stands for the user's current intent.
Beside it the tower keeps the mean of the whole history (long-term taste), the user id,
features and calendar, as the pooled tower does.

Time gaps between history items are left out: the served inputs carry item indices only (no
per-item timestamps), so a model that used them could not be fed when serving.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainer.models.layers import CategoricalEmbedding, init_embedding, masked_mean, mlp
from trainer.models.temporal import CalendarEmbedding

# Large and finite: a row whose every key is masked (a padding position, an empty history) gets a
# uniform softmax instead of NaN; its output is zeroed afterwards.
MASKED_SCORE = -1e9


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention (B, L, D) -> (B, L, D) under a boolean ``allowed`` (B, L, L) mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding_dim must be divisible by sequence_heads={heads}, got {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)                # (B, h, L, d) @ (B, h, d, L)
        scores = scores.masked_fill(~allowed.unsqueeze(1), MASKED_SCORE)      # (B, h, L, L)
        weights = torch.softmax(scores, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)     # (B, h, L, d) -> (B, L, D)
        return self.out(mixed)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)); padding rows are kept at zero.

    No dropout inside the block: on CPU each dropout over (B, L, L) or (B, L, D) cost more than the
    attention itself (ml-100k: ~60% of a step); the encoder's input dropout regularises instead.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor, allowed: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x), allowed)
        x = x + self.ffn(self.norm2(x))
        return x * keep                                                       # (B, L, D) * (B, L, 1)


class SequenceEncoder(nn.Module):
    """Item rows (B, L, D) and their mask (B, L) -> the state at the newest unmasked item (B, D); 0 if none."""

    def __init__(self, dim: int, length: int, blocks: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.length = length
        # Position p counts back from the newest slot (p = 0 is the most recent item).
        self.positions = init_embedding(nn.Embedding(length, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, rows: Tensor, mask: Tensor) -> Tensor:
        length = rows.shape[1]
        if length > self.length:
            raise ValueError(f"sequence length must be <= {self.length}, got {length}")
        keep = mask.unsqueeze(-1).to(rows.dtype)                                            # (B, L, 1)
        slots = torch.arange(length, device=rows.device)
        x = (rows + self.positions(slots.flip(0)).unsqueeze(0)) * keep                      # (B, L, D)
        x = self.dropout(x)
        causal = slots.unsqueeze(0) <= slots.unsqueeze(1)                                   # (L, L) key <= query
        allowed = causal.unsqueeze(0) & mask.unsqueeze(1)                                   # (B, L, L)
        for block in self.blocks:
            x = block(x, allowed, keep)
        x = self.norm(x) * keep
        # The newest unmasked slot: the largest masked position index (0 and a zero state if none).
        newest = (mask.to(torch.int64) * (slots + 1).unsqueeze(0)).argmax(dim=1)            # (B,)
        state = x.gather(1, newest.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)     # (B, D)
        return state * mask.any(dim=1, keepdim=True).to(x.dtype)


class SequentialUserTower(nn.Module):
    """User inputs (docs/ARCHITECTURE.md, "Model inputs") -> (B, D) L2-normalised embeddings.

    Built by ``trainer.models.two_tower.build_two_tower`` for ``user_tower = "sequential"``; the
    attributes the trainer reaches for (``user_embedding``, ``item_embedding``,
    ``history_embedding``) are those of the pooled ``UserTower``.
    """

    def __init__(self, config, item_embedding: nn.Embedding, history_embedding: nn.Embedding) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.sequence_length = config.sequence_length
        self.user_embedding = init_embedding(nn.Embedding(config.n_users + 1, dim))
        self.item_embedding = item_embedding
        self.history_embedding = history_embedding
        self.encoder = SequenceEncoder(dim, config.sequence_length, config.sequence_blocks, config.sequence_heads,
                                       config.dropout)
        self.categorical = CategoricalEmbedding(config.user_cat_cardinalities, dim)
        self.calendar = CalendarEmbedding(dim)
        # user id + categorical + numeric + sequence state + mean of the whole history + calendar
        input_dim = dim + self.categorical.output_dim + config.n_user_num + 2 * dim + self.calendar.output_dim
        self.mlp = mlp(input_dim, config.user_hidden_dims, config.dropout)
        self.projection = nn.Linear(config.user_hidden_dims[-1], dim)

    def forward(self, user_idx: Tensor, user_cat: Tensor, user_num: Tensor, history: Tensor,
                timestamp: Tensor) -> Tensor:
        rows, mask = self.history_embedding(history), history != 0                      # (B, H, D), (B, H)
        recent = min(self.sequence_length, history.shape[1])
        state = self.encoder(rows[:, -recent:], mask[:, -recent:])                        # (B, D)
        features = torch.cat([
            self.user_embedding(user_idx),  # (B, D)
            self.categorical(user_cat),  # (B, Cu * D)
            user_num,  # (B, Nu)
            state,  # (B, D)
            masked_mean(rows, mask),  # (B, D)
            self.calendar(timestamp),  # (B, 2D + 1)
        ], dim=1)
        return F.normalize(self.projection(self.mlp(features)), dim=1)  # (B, D)
