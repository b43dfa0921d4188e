"""The ranking service: the ``recsys.v1.RankingService`` front door (Recommend, Rank, RecordInteractions).

Lives here: config, the retrieval client, the DCN scorer, the gRPC servicer and the composition root
(``__main__``). May import ``recsys_contracts``; never the trainer (it runs exported models).
"""
