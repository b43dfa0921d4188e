"""The trainer's job, top to bottom: load -> prepare -> train -> evaluate -> report -> gate -> publish.

``run`` is what ``python -m trainer train`` runs. Its steps are shared with the notebook API
(``trainer.api``), which sequences the same functions over the caller's frames: ``session`` (the
distributed context, device, threads and seed), ``trainer.prepare.prepare``,
``trainer.training.train_models``, ``evaluate`` (the test report with its ``data`` section) and
``trainer.publish.apply_gate`` / ``publish_evaluated``. Every stage is timed (``Timings``).
The stages' code lives in those modules; this one only orders them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recsys_contracts.signing import signer_for
from trainer.config import TrainConfig
from trainer.data import Dataset
from trainer.distributed import Distributed, init_distributed, resolve_device, shutdown_distributed
from trainer.evaluation import data_report
from trainer.evaluation import evaluate as evaluate_test_split
from trainer.prepare import Prepared, load_dataset, prepare
from trainer.progress import Timings
from trainer.publish import TrainedRun, apply_gate, publish_evaluated
from trainer.report import write_report
from trainer.training import train_models

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    report: dict[str, Any]
    run: TrainedRun
    prepared: Prepared
    version: int | None
    refused: str | None


def apply_threads(cfg: TrainConfig) -> None:
    """torch's intra-op threads = ``run.threads`` (0 leaves torch's default: every core)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


@contextmanager
def session(cfg: TrainConfig) -> Iterator[tuple[Distributed, torch.device]]:
    """The distributed context and device for training (threads and seed set); shut down after."""
    ctx = init_distributed(torch.device("cuda") if cfg.run.device == "cuda" else torch.device("cpu"))
    try:
        device = resolve_device(cfg.run.device, ctx.local_rank)
        apply_threads(cfg)
        torch.manual_seed(cfg.run.seed)
        yield ctx, device
    finally:
        shutdown_distributed(ctx)


def evaluate(cfg: TrainConfig, prep: Prepared, trained: TrainedRun, timings: Timings, *, protocol: str,
             seed: int | None = None) -> dict[str, Any]:
    """The evaluation report on ``prep.test`` (on CPU), with its ``data`` section."""
    report = evaluate_test_split(cfg, prep, trained, torch.device("cpu"), timings)
    report["data"] = data_report(prep, protocol, seed)
    if trained.tower_choice is not None:
        report["user_tower"] = trained.tower_choice
    if trained.ranker_choice is not None:
        report["ranker"] = trained.ranker_choice
    return report


def run(cfg: TrainConfig, dataset: Dataset | None = None) -> RunResult:
    """The whole job: train, evaluate, report, gate, publish (when an artifact root is configured)."""
    timings = Timings()
    signer = signer_for(cfg.publish.signing_key, cfg.publish.unsigned) if cfg.publish.artifact_root else None
    with session(cfg) as (ctx, device):
        with timings.stage("load"):
            dataset = dataset if dataset is not None else load_dataset(cfg)
        if ctx.is_main:                  # what was read and assumed, before minutes of training (also in the report)
            log.info("%s", dataset.report.summary())
        with timings.stage("features"):
            prep = prepare(cfg, dataset)
        trained, histories = train_models(cfg, prep, device, ctx, timings)
        report = evaluate(cfg, prep, trained, timings, protocol=cfg.data.protocol, seed=cfg.data.seed)
        if device.type == "cuda":      # the training stages' peak GPU memory (the report's device section)
            report["device"] = {"name": torch.cuda.get_device_name(device),
                                "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
        version, refused = None, None
        root = Path(cfg.publish.artifact_root) if cfg.publish.artifact_root else None
        if ctx.is_main:
            refused = apply_gate(cfg, report, root)
            report["timings"] = dict(timings.seconds)
            out = Path(cfg.run.output_dir)
            write_report(report, histories, out)
            if root is not None and refused is None:
                with timings.stage("export_index_publish_go_live"):
                    version = publish_evaluated(cfg, root, trained, report, out, signer)
            report["timings"] = dict(timings.seconds)
            write_report(report, histories, out, with_plots=False)    # the plots are written above
        ctx.barrier()
        return RunResult(report, trained, prep, version, refused)
