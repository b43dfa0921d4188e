"""The evaluation report of a run: ``report.json``, ``report.md`` and PNG plots in one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

TABLE_METRICS = ("recall@10", "precision@10", "ndcg@10", "map@10", "mrr@10", "hit@10",
                 "recall@20", "ndcg@20", "hit@20", "coverage@20", "diversity@20")


def comparison_rows(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Model name -> metrics, for the table: the pipeline (and with the ranker's start, where a trained epoch
    replaced it), the two-tower alone and the baselines."""
    rows = {"pipeline (two-tower -> DCN)": report["pipeline"]}
    if report.get("pipeline_start"):
        rows["pipeline, the ranker's start (before its epochs)"] = report["pipeline_start"]
    rows["two-tower alone"] = report["two_tower"]
    rows.update({name: values for name, values in report["baselines"].items()})
    return rows


def _context_words(data: dict[str, Any]) -> str:
    """What every model knew of the test users (``eval.test_context``); reports from before it say nothing."""
    context = data.get("test_context")
    return f"; every model judged knowing each user's {context} interactions" if context else ""


def markdown(report: dict[str, Any]) -> str:
    rows = comparison_rows(report)
    lines = [f"# Evaluation report: {report['data']['dataset']}, protocol {report['data']['protocol']}", "",
             f"Test split; {report['data']['test_users']} users with test items; "
             f"{report['data']['n_items']} items" + _context_words(report['data']) + ".", "", *_load_lines(report['data'].get('load')),
             "| model | " + " | ".join(TABLE_METRICS) + " |", "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for name, values in rows.items():
        cells = [f"{values[m]:.4f}" if isinstance(values.get(m), float) else "-" for m in TABLE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("paired"):
        lines += ["", f"Paired over the {next(iter(report['paired'].values()))['users']} test users (NDCG@10 ratio, "
                  "its 95 % bootstrap interval over users, t of the per-user difference): " + "; ".join(
                      f"{name} {_paired(v)}" for name, v in report["paired"].items())]
    lines += ["", "Retrieval alone (candidate recall bounds the ranker): " +
              ", ".join(f"{k} {v:.4f}" for k, v in report["retrieval"].items()), "",
              "Ranking heads: " + ", ".join(f"{k} {v:.4f}" for k, v in report["ranking_heads"].items()), ""]
    if report.get("diversity_tradeoff"):
        lines += ["MMR diversity re-rank (strength: NDCG@10 / intra-list diversity@10): " +
                  ", ".join(f"{s}: {v['ndcg@10']:.4f} / {v['diversity@10']:.4f}"
                            for s, v in report["diversity_tradeoff"].items()), ""]
    if report.get("user_tower"):
        choice = report["user_tower"]
        lines += [f"User tower ({choice['setting']}): {choice['kept']}; validation NDCG@10 " +
                  ", ".join(f"{name} {score:.4f}" for name, score in choice["validation_ndcg@10"].items()) +
                  (f"; the ranker's tower channels: {', '.join(choice['ranker_channels'])}"
                   if choice.get("ranker_channels") else ""), ""]
    if (report.get("ranker") or {}).get("kept"):
        kept = report["ranker"]["kept"]
        lines += ["Ranker kept: " + ("its fitted start (no epoch passed the keep rule on the stopping half)"
                                     if kept == "start" else f"{kept} (its start scored beside it in the table)"), ""]
        if report["ranker"].get("start"):
            start = report["ranker"]["start"]
            lines += [f"Ranker start: the {start['kept']}; stopping-half NDCG@10 " + ", ".join(
                f"{name} {v['ndcg@10']:.4f}" + ("" if name == "retrieval order" else
                                                f" (t {v['t_vs_retrieval_order']:.2f} against retrieval's order)")
                for name, v in start["stopping_half"].items()), ""]
    if (report.get("ranker") or {}).get("transitions"):
        check = report["ranker"]["transitions"]
        lines += [f"Ranker transition channels: {'kept' if check['kept'] else 'left out'} (t "
                  f"{check['t_vs_retrieval_order']:.2f} against retrieval's order); stopping-half NDCG@10 " +
                  ", ".join(f"{name} {v:.4f}" for name, v in check["stopping_half"].items()), ""]
    if (report.get("ranker") or {}).get("affinity_rank"):
        choice = report["ranker"]["affinity_rank"]
        lines += [f"Ranker affinity rank: {choice['rank']}; share of EASE's top 10 its factors keep, by rank: " +
                  ", ".join(f"{r} {v:.3f}" for r, v in choice["ease_top10_kept"].items()), ""]
    lines += ["Stage times (s): " + ", ".join(f"{k} {v}" for k, v in report["timings"].items()), ""]
    if report.get("gate"):
        lines += [f"Quality gate: {report['gate']}", ""]
    return "\n".join(lines)


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _paired(values: dict[str, Any]) -> str:
    """"1.031 (0.990-1.072, t 1.52)": a paired comparison's ratio, interval (where there is one) and t."""
    interval = [f"{values['ratio_95'][0]:.3f}-{values['ratio_95'][1]:.3f}"] if "ratio_95" in values else []
    return f"{_figure(values['ratio'], 3)} ({', '.join([*interval, 't ' + _figure(values['t'], 2)])})"


def _load_lines(load: dict[str, Any] | None) -> list[str]:
    """What the loader read and kept, the rows it dropped by reason and what it assumed, for the report."""
    if not load:                     # a report written before the section existed
        return []
    dropped = "".join(f"; {reason} {count:,}" for reason, count in sorted(load["dropped"].items()) if count)
    lines = [f"Loaded {load['source']}: {load['rows_read']:,} rows read, {load['rows_kept']:,} kept{dropped}.", ""]
    if load["warnings"]:
        lines += ["Load warnings:", *(f"- {warning}" for warning in load["warnings"]), ""]
    return lines


def _labelled(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _saved(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plots(report: dict[str, Any], histories: dict[str, list[dict[str, float]]], out: Path) -> list[Path]:
    paths = []
    stages = [stage for stage in histories if histories[stage]] or ["retrieval"]   # joint mode: one curve
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for stage, ax in zip(stages, axes[0]):
        epochs = [r["epoch"] for r in histories.get(stage, [])]
        ax.plot(epochs, [r["loss"] for r in histories.get(stage, [])], label="train loss")
        ax2 = ax.twinx()
        ax2.plot(epochs, [r["val_ndcg@10"] for r in histories.get(stage, [])], color="tab:orange",
                 label="val NDCG@10")
        _labelled(ax, "epoch", "loss", f"{stage} training")
        ax2.set_ylabel("val NDCG@10")
    paths.append(_saved(fig, out / "training_curves.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [int(k.split("@")[1]) for k in report["retrieval"]]
    ax.plot(ks, list(report["retrieval"].values()), marker="o")
    ax.set_xscale("log")
    _labelled(ax, "K (candidates)", "test recall@K", "Two-tower retrieval recall@K")
    paths.append(_saved(fig, out / "recall_at_k.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    profile = report["recommended_popularity"]
    deciles = range(len(profile["recommended"]))
    ax.bar([d - 0.2 for d in deciles], profile["recommended"], width=0.4, label="recommended (top 20)")
    ax.bar([d + 0.2 for d in deciles], profile["catalog"], width=0.4, label="catalog")
    ax.legend()
    _labelled(ax, "item popularity decile (0 = most popular)", "share", "Recommendation vs catalog popularity")
    paths.append(_saved(fig, out / "popularity.png"))
    return paths


def write_report(report: dict[str, Any], histories: dict, out: Path, with_plots: bool = True) -> None:
    """Writes report.json and report.md into ``out``, and the PNG plots unless ``with_plots`` is False
    (a rewrite that only adds stage times: the plots do not show them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "histories": histories}, indent=2,
                                                sort_keys=True, default=float) + "\n")
    (out / "report.md").write_text(markdown(report))
    if with_plots:
        plots(report, histories, out)
