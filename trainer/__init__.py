"""The offline trainer: interaction log -> features -> two-tower + DCN -> evaluation -> published version.

Lives here, by stage of the job (``job``: what ``python -m trainer`` runs, and the steps the
notebook API ``api`` calls in the same code path):

- data: loaders (``data``), splits (``splits``), the data stage (``prepare``: load, split, fit the
  features on train, build the targets), features (``features``, ``inputs``, ``item_metadata``);
- training: models (``models``), losses and the one ``NonFiniteLossError`` (``losses``), negative
  samplers (``negatives``), the loops (``retrieval_training``, ``ranking_training``,
  ``joint_training``), the training stage (``training``), ``distributed``, ``checkpoint``;
- evaluation: the full-ranking protocol (``full_ranking``), metrics (``metrics``), baselines
  (``baselines``), the run's test evaluation (``evaluation``), the report files (``report``);
- publishing: the quality gate and publishing (``publish``), ONNX export (``export``);
- around it: ``config``, ``progress`` (bars, stage timings), ``cli_output``, ``tiny`` (tiny real
  versions for tools and tests), ``legacy_pickle`` (the original design's pickle, read only on trust).

May import ``recsys_contracts`` and third-party libraries; never ``recsys_serving``, the services,
the gateway, the tools (``loadtest``, ``benchmarks``, ``scripts``) or ``tests``. The services never
import this package: they run the exported models.
"""

# The notebook API (trainer.api) is imported on first use: it pulls in torch and the whole job,
# which ``import trainer.config`` (the command line's first step) should not pay for.
_API_NAMES = ("ModelConfig", "ProductionTrainer")


def __getattr__(name: str):
    if name in _API_NAMES:
        from trainer import api
        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


__all__ = list(_API_NAMES)
