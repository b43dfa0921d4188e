"""Interaction logs in, ``Dataset`` out: MovieLens and generic loaders, download, synthetic data.

Lives here: ``dataset`` (the ``Dataset`` record, ``LoadReport``, ``DataError`` and the checks every
loader shares), ``movielens`` (100K, 1M/10M, latest/20M/25M folders), ``generic`` (any CSV or
Parquet log with a column mapping), ``download`` (``ensure_movielens``, ``data_dir_from_env``) and
``synthetic`` (MovieLens-shaped data with planted preferences, and MovieLens-like file writers).
Nothing here knows about features, models or the services.
"""

from trainer.data.dataset import DataError, Dataset, LoadReport, validate_interactions
from trainer.data.download import data_dir_from_env, ensure_movielens
from trainer.data.generic import load_interactions, logs_in
from trainer.data.movielens import is_movielens_folder, load_movielens
from trainer.data.synthetic import generate, write_movielens_like

__all__ = [
    "DataError", "Dataset", "LoadReport", "data_dir_from_env", "ensure_movielens", "generate",
    "is_movielens_folder", "load_interactions", "load_movielens", "logs_in", "validate_interactions", "write_movielens_like",
]
