"""The offline trainer: interaction log -> features -> two-tower + DCN -> evaluation -> published version.

Lives here: data loaders (``data``), features and splits, metrics and baselines, models, training,
evaluation, export and publishing. May import ``recsys_contracts``; the services never import this package.
"""

# The notebook API (trainer.api) is imported on first use: it pulls in torch and the whole pipeline,
# which ``import trainer.config`` (the command line's first step) should not pay for.
_API_NAMES = ("ModelConfig", "ProductionTrainer")


def __getattr__(name: str):
    if name in _API_NAMES:
        from trainer import api
        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = list(_API_NAMES)
