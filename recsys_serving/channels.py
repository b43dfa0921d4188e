"""Several gRPC channels to one target, used in turn: how a client reaches every worker process of a
service behind one port (``<PREFIX>WORKERS``, ``recsys_serving.workers``).

The kernel spreads a port's CONNECTIONS over the workers' sockets, never the calls of one connection,
and gRPC shares one connection between the equal channels of a process unless each has its own
subchannel pool (``grpc.use_local_subchannel_pool``). ``ChannelPool`` opens ``count`` channels that
way and hands its stubs' calls to them in turn; with ``count`` 1 it is one ordinary channel.
It offers what generated stubs, ``channel_ready`` and ``async with`` use of a ``grpc.aio.Channel``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import grpc

MAX_CHANNELS = 64


class ChannelPool:
    def __init__(self, make: Callable[[list[tuple[str, object]]], grpc.aio.Channel],
                 options: list[tuple[str, object]], count: int = 1) -> None:
        """``make(options)`` opens one channel (insecure or secure, to the one target)."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CHANNELS:
            raise ValueError(f"count must be an integer in [1, {MAX_CHANNELS}], got {count!r}")
        if count > 1:
            options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        self.channels = [make(options) for _ in range(count)]
        self._turn = itertools.count()

    @classmethod
    def insecure(cls, target: str, options: list[tuple[str, object]], count: int = 1) -> ChannelPool:
        return cls(lambda opts: grpc.aio.insecure_channel(target, options=opts), options, count)

    def _in_turn(self, method: str, args: tuple, kwargs: dict):
        calls = [getattr(channel, method)(*args, **kwargs) for channel in self.channels]
        if len(calls) == 1:
            return calls[0]
        return lambda *call_args, **call_kwargs: calls[next(self._turn) % len(calls)](*call_args, **call_kwargs)

    def unary_unary(self, *args, **kwargs):
        return self._in_turn("unary_unary", args, kwargs)

    def unary_stream(self, *args, **kwargs):
        return self._in_turn("unary_stream", args, kwargs)

    async def channel_ready(self) -> None:
        await asyncio.gather(*(channel.channel_ready() for channel in self.channels))

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))

    async def __aenter__(self) -> ChannelPool:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
