"""Joint multi-task training (``multitask.mode = "joint"``): the towers and the DCN learn together.

    L = L_retrieval + alpha * L_rating + beta * L_ctr      (alpha = multitask.rating_weight,
                                                            beta = multitask.ctr_weight)

Each step takes a batch of users, holds out a few training items per user as positives and hides
them (and a random share of the rest) from the history, exactly as retrieval training does
(``retrieval_training.retrieval_step``); L_retrieval is the same sampled softmax. The ranker
sees the same users with the same denoised history:

- a proxy of retrieval's list per user: the step's candidate items (held-out positives and sampled
  negatives) the user may be shown, within the user's top ``ranking.negative_pool / n_items``
  share of them by the live retrieval score;
- positives: the held-out items inside that list (click 1); every held-out item also trains the
  rating head on its observed rating;
- negatives: ``ranking.negatives_per_positive`` per positive, uniform among the list's other items
  (click 0). Both come from the same score range, as in a served list, which the ranker must learn
  to reorder (the separate mode takes lists from a frozen retrieval model instead).

The DCN's ``retrieval_score`` input is computed live from the towers (cosine / temperature), so
L_ctr and L_rating also reach the embeddings through it: that coupling is what training jointly
adds. Early stopping on the full pipeline's validation NDCG@10 (retrieve N -> rank -> top 10);
the best epoch's weights of both models are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.checkpoint import FitHistory
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.full_ranking import EvalTarget
from trainer.features import FeatureTables
from trainer.inputs import item_inputs
from trainer.losses import multitask_loss, optimizer_step, ranking_losses
from trainer.models.dcn import DCNRanker
from trainer.models.two_tower import TwoTower, build_two_tower
from trainer.progress import progress_bar
from trainer.ranking_training import Candidates, Rows, calibrate_start, dcn_config, pipeline_ndcg
from trainer.retrieval_training import Interactions, SamplingSetup, retrieval_step, tower_config

# retrieve(two_tower, users, exclude, n) -> the top-n candidates per user (trainer.evaluation.retrieve)
Retrieve = Callable[[TwoTower, np.ndarray, EvalTarget, int], Candidates]


@dataclass(frozen=True, eq=False)
class RatingLookup:
    """Observed rating of (user, item) training pairs, vectorised (the last one if a pair repeats)."""

    keys: np.ndarray        # (N,) sorted user * width + item
    ratings: np.ndarray     # (N,) aligned with keys
    width: int

    @classmethod
    def from_interactions(cls, train: Interactions, n_items: int) -> "RatingLookup":
        width = n_items + 1
        keys = train.users.astype(np.int64) * width + train.items.astype(np.int64)
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], train.ratings[order].astype(np.float32), width)

    def __call__(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(R,) ratings of the pairs; NaN where the pair is not a training interaction."""
        query = users.astype(np.int64) * self.width + items.astype(np.int64)
        pos = np.searchsorted(self.keys, query, side="right") - 1
        found = (pos >= 0) & (self.keys[np.maximum(pos, 0)] == query)
        return np.where(found, self.ratings[np.maximum(pos, 0)], np.nan).astype(np.float32)


def joint_step(two_tower: TwoTower, ddp_tower, ddp_ranker, users: np.ndarray, positives: np.ndarray,
               timestamps: np.ndarray, setup: SamplingSetup, ratings: RatingLookup, tables: FeatureTables,
               cfg: TrainConfig, device: torch.device,
               generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float], Rows]:
    """(L, its parts, the ranker's rows) for users (U,) with held-out positives (U, P) (0 = padding)."""
    mt = cfg.multitask
    # The ranker draws its negatives from the step's candidates: at least one sampler negative.
    step = retrieval_step(ddp_tower, two_tower.temperature, users, positives, timestamps, setup, tables, cfg,
                          device, generator, min_negatives=1)
    inputs, user_emb, unique_emb, unique = step.inputs, step.user_emb, step.unique_emb, step.unique
    inverse, row_user, pos_idx, user_seen = step.inverse, step.row_user, step.pos_idx, step.user_seen

    # The ranker's rows, from each user's proxy of retrieval's list: the step's candidate columns the
    # user may be shown (not trained on, or held out now), scoring within the user's top share
    # ranking.negative_pool / n_items of them. Held-out positives inside it are clicks; negatives are
    # drawn uniformly from the rest of it. Positives and negatives then come from the same score
    # range, as in a served list (best-scored negatives against all positives would teach the DCN
    # that a high retrieval score means "not taken").
    scores = user_emb @ unique_emb.T / two_tower.temperature                           # (U, K) live, with grad
    own = torch.zeros_like(scores, dtype=torch.bool)
    own[row_user, inverse[:pos_idx.numel()]] = True
    shown = (~user_seen if user_seen is not None else torch.ones_like(own)) | own
    shown &= (unique != 0).unsqueeze(0)
    depth = max(1, min(unique.numel(), int(np.ceil(unique.numel() * cfg.ranking.negative_pool / tables.vocab.n_items))))
    detached = scores.detach().masked_fill(~shown, float("-inf"))
    threshold = detached.topk(depth, dim=1).values[:, -1:]                            # (U, 1)
    in_list = shown & (detached >= threshold)                                         # (U, K)
    pos_col = inverse[:pos_idx.numel()]
    clicked = in_list[row_user, pos_col]                                              # (R,) positives in the list
    wanted = torch.zeros(len(users), dtype=torch.int64, device=device).index_add_(
        0, row_user, clicked.to(torch.int64)) * cfg.ranking.negatives_per_positive   # (U,) negatives per user
    n_neg = int(min(int(wanted.max()) if wanted.numel() else 0, unique.numel()))
    keys = torch.rand(scores.shape, generator=generator).to(device).masked_fill(~in_list | own, -1.0)
    pick = keys.topk(max(n_neg, 1), dim=1)                                            # uniform among the rest
    take = (pick.values >= 0) & (torch.arange(pick.indices.shape[1], device=device).unsqueeze(0) < wanted.unsqueeze(1))
    neg_user, neg_slot = torch.nonzero(take, as_tuple=True)
    neg_col = pick.indices[neg_user, neg_slot]
    # Every positive keeps its observed rating (the rating head learns from all of them); only those
    # in the list are CTR examples (rows outside it get CTR weight 0).
    rows_user = torch.cat([row_user, neg_user])                                       # (R + Rn,) batch rows
    rows_item = torch.cat([pos_idx, unique[neg_col]])
    rows_score = torch.cat([scores[row_user, pos_col], scores[neg_user, neg_col]])
    clicks = torch.cat([torch.ones(pos_idx.numel()), torch.zeros(neg_col.numel())]).to(device)
    ctr_weight = torch.cat([clicked.to(torch.float32), torch.ones(neg_col.numel(), device=device)])
    batch_users = np.asarray(users, dtype=np.int64)
    rated = ratings(batch_users[row_user.cpu().numpy()], pos_idx.cpu().numpy())
    rating_target = torch.as_tensor(np.concatenate([rated, np.full(neg_col.numel(), np.nan, np.float32)]),
                                    device=device)
    ranker_in = {name: value[rows_user] for name, value in inputs.items()}
    ranker_in.update(item_inputs(tables, rows_item.cpu().numpy(), device))
    ctr_logit, rating_pred = ddp_ranker(**ranker_in, retrieval_score=rows_score)
    rating_mask = torch.isfinite(rating_target)
    _, l_rating = ranking_losses(ctr_logit, clicks, rating_pred, torch.nan_to_num(rating_target), rating_mask)
    l_ctr = (F.binary_cross_entropy_with_logits(ctr_logit, clicks, reduction="none") * ctr_weight).sum() \
        / ctr_weight.sum().clamp(min=1.0)
    loss = multitask_loss(step.loss, l_rating, l_ctr, mt.rating_weight, mt.ctr_weight)
    ctr_rows = (ctr_weight > 0).cpu().numpy()
    rows = Rows(batch_users[rows_user.cpu().numpy()], rows_item.cpu().numpy(), timestamps[rows_user.cpu().numpy()],
                rows_score.detach().cpu().numpy(), clicks.cpu().numpy(), rating_target.cpu().numpy()).take(ctr_rows)
    parts = {"retrieval": float(step.loss.detach()), "ctr": float(l_ctr.detach()),
             "rating": float(l_rating.detach())}
    return loss, parts, rows


def fit_joint(cfg: TrainConfig, spec, tables: FeatureTables, train: Interactions, val: EvalTarget,
              eval_timestamps: np.ndarray, device: torch.device, ctx: Distributed,
              retrieve: Retrieve) -> tuple[TwoTower, DCNRanker, FitHistory]:
    """Trains both models on L; returns the best epoch's pair by the pipeline's validation NDCG@10."""
    rc, rk = cfg.retrieval, cfg.ranking
    torch.manual_seed(cfg.run.seed)
    two_tower = build_two_tower(tower_config(cfg, spec, tables), init_temperature=rc.temperature,
                                learn_temperature=rc.learn_temperature).to(device)
    ranker = DCNRanker(dcn_config(cfg, spec, tables, transitions=False)).to(device)
    ddp_tower = ddp_ranker = None      # wrapped after the calibration below (DDP then broadcasts rank 0's)
    optimizer = torch.optim.Adam([{"params": two_tower.parameters(), "lr": rc.learning_rate,
                                   "weight_decay": rc.weight_decay},
                                  {"params": ranker.parameters(), "lr": rk.learning_rate,
                                   "weight_decay": rk.weight_decay}])
    setup = SamplingSetup.build(cfg, tables, train, device)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed)
    ratings = RatingLookup.from_interactions(train, tables.vocab.n_items)
    history, best_state, stale, calibrated = FitHistory(), None, 0, False
    bar = progress_bar(range(rc.epochs), "joint", cfg.run.progress and ctx.is_main)
    for epoch in bar:
        order = setup.epoch_order(rng, ctx)
        losses, parts_sum = [], {"retrieval": 0.0, "ctr": 0.0, "rating": 0.0}
        two_tower.train()
        ranker.train()
        for start in range(0, order.size, rc.batch_size):
            users = order[start:start + rc.batch_size]
            positives, timestamps = setup.user_items.sample(users, rc.positives_per_user, rng)
            if not calibrated:
                # The CTR logit starts as the retrieval score (wide skip): shift it to the base click
                # rate once, before the first update, as the separate mode does; then wrap for DDP,
                # which broadcasts rank 0's weights (calibrated bias included) to every rank.
                with torch.no_grad():
                    _, _, rows = joint_step(two_tower, two_tower, ranker, users, positives, timestamps, setup,
                                            ratings, tables, cfg, device, generator)
                calibrate_start(ranker, rows)
                ddp_tower, ddp_ranker = ctx.wrap(two_tower, device), ctx.wrap(ranker, device)
                calibrated = True
            loss, parts, rows = joint_step(two_tower, ddp_tower, ddp_ranker, users, positives, timestamps, setup,
                                           ratings, tables, cfg, device, generator)
            optimizer_step(optimizer, loss, lambda value: (
                f"joint loss became {value} at epoch {epoch} (parts {parts}); lower retrieval.learning_rate "
                f"(now {rc.learning_rate}) or ranking.learning_rate (now {rk.learning_rate})"))
            losses.append(loss.item())
            for key, value in parts.items():
                parts_sum[key] += value
        two_tower.eval()
        candidates = retrieve(two_tower, val.users, val, rk.candidates)
        ndcg = pipeline_ndcg(ranker, tables, candidates, val, eval_timestamps[val.users], cfg, spec.rating_max, device)
        record = {"epoch": epoch, "loss": ctx.all_reduce_mean(float(np.mean(losses))), "val_ndcg@10": ndcg,
                  "temperature": float(two_tower.temperature.detach()),
                  **{f"loss_{key}": value / max(len(losses), 1) for key, value in parts_sum.items()}}
        history.epochs.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val_ndcg=f"{ndcg:.4f}")
        if ndcg > history.best_score:
            history.best_score, history.best_epoch, stale = ndcg, epoch, 0
            best_state = (copy.deepcopy(two_tower.state_dict()), copy.deepcopy(ranker.state_dict()))
        else:
            stale += 1
            if stale >= rc.patience:
                break
    if best_state is not None:
        two_tower.load_state_dict(best_state[0])
        ranker.load_state_dict(best_state[1])
    two_tower.eval()
    ranker.eval()
    return two_tower, ranker, history


__all__ = ["RatingLookup", "fit_joint", "joint_step"]
