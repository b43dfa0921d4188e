"""The ranking service: the ``recsys.v1.RankingService`` front door (Recommend, Rank, RecordInteractions).

Lives here, its domain only: ``pipeline`` (Recommend/Rank/RecordInteractions, gRPC-free),
``selection`` (running top-k, MMR), ``refill`` + ``fresh`` (refilling an empty Redis, fresh
interactions without Redis), ``retrieval_client`` (the channel to retrieval), ``arms`` (canary),
``shadow`` (shadow sampling) with ``shadow_worker`` + ``shadow_runner`` + ``shadow_retrieval``
(the shadow's own process), ``display`` (titles, genres and history when asked),
``batching`` (the DCN pass the kit's micro-batcher batches), ``features`` (the Redis read/record,
and the kit's user view as DCN inputs), ``validation`` (the Ranking-only fields), and, in the same
file shape as the retrieval service, ``config`` (env), ``metrics``, ``state`` (one loaded version),
``servicer`` (gRPC translation), ``server`` (composition, ``create_server``) and the entry point
``__main__``. The shared mechanics (wire validation, user view, RPC wrapper, micro-batcher, reload,
admission) are ``recsys_serving``'s.
May import ``recsys_contracts`` and ``recsys_serving``; never the trainer (it runs exported models),
and the retrieval service only in ``shadow_retrieval`` (the shadow worker runs the candidate's
retrieval in its own idle-priority process).
"""
