"""Pure forward models: the two-tower retriever and the DCN-V2 ranker, with their building blocks.

Lives here: ``two_tower`` (towers return L2-normalised embeddings), ``sequential`` (the
SASRec-style user tower ``retrieval.user_tower = "sequential"`` selects), ``autoencoder`` (Mult-DAE
served as a two-tower model, ``retrieval.user_tower = "autoencoder"``), ``dcn`` (the ranker returns a
ctr logit and a bounded rating), ``temporal`` (calendar features from the timestamp) and ``layers``
(shared embeddings, pooling, MLPs, config checks). Losses, negative sampling and the training loop do
not live here; they wrap these modules (``trainer.losses``, ``trainer.negatives``).
"""

from trainer.models.dcn import CrossNetV2, DCNConfig, DCNRanker
from trainer.models.temporal import calendar_features
from trainer.models.two_tower import ItemTower, TowerConfig, TwoTower, UserTower, build_two_tower

__all__ = ["CrossNetV2", "DCNConfig", "DCNRanker", "ItemTower", "TowerConfig", "TwoTower", "UserTower",
           "build_two_tower", "calendar_features"]
