"""The offline trainer: interaction log -> features -> two-tower + DCN -> evaluation -> published version.

Lives here: data loaders (``data``), features and splits, metrics and baselines, models, training,
evaluation, export and publishing. May import ``recsys_contracts``; the services never import this package.
"""
