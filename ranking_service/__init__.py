"""The ranking service: the ``recsys.v1.RankingService`` front door (Recommend, Rank, RecordInteractions).

Lives here: ``config`` (env), ``state`` (one loaded version), ``features`` + ``fresh`` + ``refill``
(Redis, the artifact fallback, refilling an empty Redis), ``retrieval_client`` (the channel to
retrieval), ``batching`` (DCN micro-batching), ``selection`` (running top-k, MMR), ``pipeline``
(Recommend/Rank/RecordInteractions without gRPC), ``display`` (titles, genres and history when a
request asks), ``validation``, ``metrics``, ``server`` (servicer,
``create_server``) and the composition root ``__main__``.
May import ``recsys_contracts`` and ``recsys_serving``; never the trainer (it runs exported models).
"""
