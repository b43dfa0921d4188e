"""The retrieval service: user tower + ANN index behind ``recsys.v1.RetrievalService``.

Lives here: config, the candidate generator, the gRPC servicer and the composition root (``__main__``).
May import ``recsys_contracts``; never the trainer (it runs exported models from the artifact volume).
"""
