"""Calendar features derived inside the models from the request timestamp (UTC).

The models compute hour of day, day of week and weekend from ``timestamp`` themselves, so the
exported programs derive them exactly as training did (docs/ARCHITECTURE.md, "Model inputs").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.models.layers import init_embedding

SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
HOURS_PER_DAY = 24
DAYS_PER_WEEK = 7
# 1970-01-01 was a Thursday; with Monday = 0 (Python's ``date.weekday()``) that is 3.
EPOCH_WEEKDAY = 3
SATURDAY = 5


def calendar_features(timestamp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Seconds since the epoch (B,) int64 -> (hour 0..23, weekday 0..6 Monday = 0, weekend 0/1), each (B,) int64.

    ``remainder`` (sign of the divisor) keeps pre-1970 timestamps on the right day. Only small numbers
    are divided: the ONNX export turns an integer division into a float32 one, which rounds a
    timestamp (~1.7e9 > 2**24) by up to a minute, so the week's seconds come first from an exact
    integer ``remainder`` and the divisions run on values below 2**24, which float32 holds exactly.
    """
    seconds_of_day = torch.remainder(timestamp, SECONDS_PER_DAY)  # (B,) in [0, 86400)
    hour = torch.div(seconds_of_day, SECONDS_PER_HOUR, rounding_mode="floor")
    # seconds since the last Monday 00:00: the epoch is EPOCH_WEEKDAY days after a Monday
    seconds_of_week = torch.remainder(timestamp + EPOCH_WEEKDAY * SECONDS_PER_DAY, DAYS_PER_WEEK * SECONDS_PER_DAY)
    weekday = torch.div(seconds_of_week, SECONDS_PER_DAY, rounding_mode="floor")   # (B,) in [0, 7)
    weekend = (weekday >= SATURDAY).to(torch.int64)
    return hour, weekday, weekend


class CalendarEmbedding(nn.Module):
    """timestamp (B,) -> [hour embedding, weekday embedding, weekend flag] (B, 2 * dim + 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.hour = init_embedding(nn.Embedding(HOURS_PER_DAY, dim))
        self.weekday = init_embedding(nn.Embedding(DAYS_PER_WEEK, dim))
        self.output_dim = 2 * dim + 1

    def forward(self, timestamp: Tensor) -> Tensor:
        hour, weekday, weekend = calendar_features(timestamp)
        return torch.cat(
            [self.hour(hour), self.weekday(weekday), weekend.to(self.hour.weight.dtype).unsqueeze(1)],
            dim=1,
        )  # (B, dim) + (B, dim) + (B, 1) -> (B, 2 * dim + 1)
