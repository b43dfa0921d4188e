"""Typed trainer configuration: a TOML/YAML/JSON file plus ``section.key=value`` overrides.

Read once at start-up. Unknown sections or keys, wrong types and out-of-range values fail with
their dotted name, the value and what was expected. The whole config travels into the artifact
manifest, so a published version says how it was trained.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "ml-100k"          # a folder name under data_dir, or a path to a log file/folder
    data_dir: str = ""                 # "" = $RECSYS_DATA_DIR, else ../shared/data
    protocol: str = "random"           # "random" (RecBole full ranking), "temporal" or "leave_one_out"
    seed: int = 2020                   # split seed
    # generic logs: our name -> the file's column; every value a number = 0-based field positions in a file
    # without a header line (user_id:0,item_id:1,rating:3)
    column_map: dict[str, str] = field(default_factory=dict)
    sep: str = "auto"                  # generic CSV logs: auto (tab for .tsv, else sniffed), comma, tab, semicolon, pipe, space
    bad_rows: str = "error"            # generic logs: a missing/unreadable value stops the load (error) or its row is dropped, counted (drop)


@dataclass(frozen=True)
class FeatureConfig:
    history_length: int = 200          # items pooled into the user's history feature


@dataclass(frozen=True)
class RetrievalConfig:
    embedding_dim: int = 64
    # Each tower's hidden widths, and history_dropout below: (256, 128) + 0.3 against (128, 64) + 0.5,
    # chosen on the tower's validation NDCG@10 with EASE help off (retrieval.distill_weight=0,
    # ranking.affinity=none), seed 0: ml-100k random 0.2403 -> 0.2475, ml-100k temporal 0.1358 ->
    # 0.1388, synthetic 10k-item log random 0.1305 -> 0.1372; with EASE help on, ml-100k random
    # 0.2587 -> 0.2650. Either change alone on ml-100k random: widths 0.2434, dropout 0.2460;
    # embedding_dim 128 (widths as they were) 0.2410. With run seed 1: synthetic 0.1308 -> 0.1360,
    # ml-100k random 0.2398 -> 0.2431, but ml-100k temporal 0.1407 -> 0.1381 (within one seed's
    # spread); the ranker's stopping half with EASE help off moved -0.7 / -5.6 / -1.3 % (seed 0),
    # with EASE help on +1.2 %. docs/RESULTS.md, "Wider towers".
    user_tower_dims: tuple[int, ...] = (256, 128)
    item_tower_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.1
    history_table: str = "shared"      # shared (the item tower's id table) | separate (its own id table)
    history_pooling: str = "mean"      # mean | attention (learned, mask-aware, with recency)
    # pooled: the history pooled as a set (history_pooling); sequential: causal self-attention over
    # its last sequence_length items with positions (SASRec style, trainer/models/sequential.py),
    # trained to predict each user's next items from a random point of their training history.
    # Same program inputs and outputs either way: serving does not change. "validated" (the default):
    # under the temporal and leave-one-out protocols, where each user's held-out items are their
    # latest, both towers train and the one with the higher validation NDCG@10 is kept; under the
    # random protocol, whose held-out items have no order, no sequential one (the joint mode always
    # trains the pooled one). Validation NDCG@10 of the tower, pooled -> sequential (quality grid at
    # 94632b9, EASE help on / off): ml-100k temporal 0.1374 -> 0.1955 / 0.1373 -> 0.2046, leave-one-out
    # 0.0679 -> 0.0893 / 0.0650 -> 0.1022; the ~10k-item synthetic log (no order in its generator)
    # temporal 0.1335 -> 0.1250 / 0.1315 -> 0.1289, leave-one-out 0.1042 -> 0.1024 / 0.1060 -> 0.1020;
    # random: ml-100k 0.2646 -> 0.2226, synthetic 0.1371 -> 0.1341. Validation picks the sequential
    # tower on ml-100k and the pooled one on the synthetic log, as its test split does in 7 of those 8
    # ordered cells (docs/RESULTS.md, "The user tower chosen by validation").
    # autoencoder (trainer/models/autoencoder.py, the autoencoder_* settings below) joins "validated"
    # under every protocol where the catalog fits it (autoencoder_below): its validation NDCG@10
    # beat the pooled tower's in 10 of the 12 cells of the quality grid at 0734444 (EASE help on /
    # off; pooled -> autoencoder): ml-100k random 0.2646 -> 0.2630 / 0.2472 -> 0.2630, temporal
    # 0.1374 -> 0.1401 / 0.1373 -> 0.1401, leave-one-out 0.0679 -> 0.0669 / 0.0650 -> 0.0669; the
    # synthetic log random 0.1371 -> 0.1417 / 0.1381 -> 0.1417, temporal 0.1335 -> 0.1337 / 0.1315 ->
    # 0.1337, leave-one-out 0.1042 -> 0.1119 / 0.1060 -> 0.1119. The pooled tower stays beside it: with
    # EASE's distillation it won two ml-100k cells, and it is the tower of catalogs over the bound
    # (docs/RESULTS.md, "The autoencoder tower").
    user_tower: str = "validated"
    sequence_length: int = 20          # attention cost grows with it; the whole history is also pooled
    sequence_blocks: int = 2
    sequence_heads: int = 2
    temperature: float = 0.05          # initial softmax temperature
    learn_temperature: bool = True
    # Catalogs of at most this many items train the tower with a full softmax: every item the user
    # has not seen is a negative (the item tower embeds the whole catalog each step), no sampler and
    # no logQ correction; larger catalogs keep the sampled softmax below. 0 = always sampled. Off
    # by default: validation NDCG@10 of the tower, EASE help off, seed 0, sampled -> full: ml-100k
    # random 0.2436 -> 0.2488, ml-100k temporal 0.1371 -> 0.1313, synthetic 10k-item log random
    # 0.1319 -> 0.1294 (and its retrieval training 45 -> 109 s).
    full_softmax_below: int = 0
    # The autoencoder tower (user_tower "autoencoder"; trainer/models/autoencoder.py): Mult-DAE (Liang et
    # al. 2018) served as a two-tower model, the user vector tanh of the normalised history's rows,
    # the item vector a row and a bias per item, trained to rebuild each user's training items
    # (softmax over the whole catalog) from their history with autoencoder_dropout of it hidden. The
    # paper's settings (one hidden layer of 600, dropout 0.5, Adam 1e-3, 100 users a step), not tuned; epochs
    # and early stopping as the other towers' (epochs, patience, min_improvement below).
    # It trains only on catalogs of at most autoencoder_below items (a step's cost grows with the
    # catalog; the pooled tower's sampled softmax does not).
    autoencoder_hidden: int = 600
    autoencoder_dropout: float = 0.5
    autoencoder_learning_rate: float = 1e-3
    autoencoder_batch_size: int = 100
    # Users an epoch trains on at most (a fresh random subset each epoch; 0 = all): a step costs
    # (users x items x hidden) whatever the users' history lengths, so a log of many light users (the
    # shop-like log of docs/RESULTS.md: 83,868 users, 5,000 items) would take ~15 s an epoch without it.
    # ml-100k, the ~10k-item log and the ml-1m shape have fewer users: nothing changes there.
    autoencoder_users_per_epoch: int = 20_000
    autoencoder_below: int = 100_000
    negative_sampling_strategy: str = "mixed"   # random | hard | mixed
    num_negatives: int = 256           # sampler negatives per batch (shared by its rows)
    # Held-out items predicted per user per step (denoising). ml-100k validation NDCG@10, seeds 0-2:
    # 8 gives 0.2387/0.2355/0.2370 against 0.2287/0.2291/0.2346 with 16 (twice the steps per epoch).
    positives_per_user: int = 8
    # The sequential tower predicts each prefix's next positives_per_user items; the k-th (0-based) weighs
    # next_item_decay ** k in the loss. 1 = all alike; 0 = the next item alone. 0.5 was tried (2026-12-07,
    # nineteenth session) and not adopted: validation NDCG@10 of the sequential tower, leave-one-out, EASE help
    # off, 1 -> 0.5: ml-100k 0.0999 -> 0.1040, the planted-order synthetic log 0.1089 -> 0.1045.
    next_item_decay: float = 1.0
    history_dropout: float = 0.3       # share of the remaining history hidden in training (see the widths)
    hard_fraction: float = 0.5         # share of hard negatives when mixed
    model_hard_every: int = 0          # refresh model-mined hard negatives every N epochs (0 = off)
    logq_correction: bool = True
    id_dropout: float = 0.5            # chance a user id is replaced by the unknown id in training
    # A ceiling: training stops on validation (patience, min_improvement), so the data decide. It was
    # 14, fitted to ml-100k, where the tower still improved at its last epoch (best epoch 13 of 14,
    # val NDCG@10 0.2436 without distillation), as it did on a 9k-item log the project never saw.
    epochs: int = 40
    batch_size: int = 128              # users per step (each with positives_per_user rows)
    # 1e-3 was tried on 2026-12-06 (seventh session) and not adopted: on validation over four logs and
    # two seeds it led by 1-4 % on the ordered protocols' tower, but tied on ml-100k random at the
    # default two threads and took up to 32 % more training time there (docs/RESULTS.md, "The tower's
    # learning rate").
    learning_rate: float = 2e-3
    lr_decay: float = 1.0              # epoch e trains at learning_rate * lr_decay ** e
    # In (0, 1): validate and keep a bias-corrected exponential moving average of the weights, this
    # decay per step; 0 = the raw weights. Not when the id tables train with lazy Adam (see
    # lazy_adam_above). ml-100k validation NDCG@10 with 8 positives per user, seeds 0-2: raw weights
    # 0.2387/0.2355/0.2370. Without the bias correction (a share left on the initial weights):
    # 0.995 0.2426/0.2383/0.2412, 0.998 0.2457/0.2431/0.2441 over 20 epochs, 0.997 over 14 epochs
    # 0.2450/0.2427, but short runs then barely move from the initial weights. Bias-corrected over
    # 14 epochs: 0.997 0.2436/0.2416, 0.998 0.2428/0.2422.
    weight_average: float = 0.997
    weight_decay: float = 0.0
    # Early stopping on validation NDCG@10 (epochs without a new best). The validation curve dips for
    # up to 3 epochs before rising again (ml-100k seeds 0-2: best val 0.2287/0.2291/0.2346 with 4 and
    # 20 epochs, 0.2287/0.2291/0.2240 with the former 3 and 12; raw weights, 16 positives per user).
    patience: int = 4
    # An epoch restarts the patience only when its validation NDCG@10 beats the score that last restarted
    # it by this fraction (the best weights are kept whatever the gain): the weight average makes the
    # curve creep up by ~0.1-0.2% an epoch long after the gains that matter (ml-100k: 0.2598 at 14
    # epochs, 0.2615 at 18), and the ceiling above would otherwise be reached.
    min_improvement: float = 0.005
    # Knowledge distillation from EASE (fitted on the training log, l2 = distill_l2): each step adds
    # distill_weight x the cross-entropy between the teacher's softmax over the user's unseen items
    # (EASE scores / distill_temperature, computed once from the full training history) and the
    # tower's full-catalog softmax. 0 = off. Separate mode only; left out, with a warning, when EASE's
    # dense matrices do not fit (large catalogs). ml-100k validation NDCG@10, seeds 0-2: off
    # 0.2436/0.2416/0.2428; weight 0.25, l2 200 0.2606/0.2545/0.2558; seed 0 only: weight 0.125 /
    # 0.25 / 0.5 / 1 / 2 / 4 (l2 500) 0.2553/0.2562/0.2542/0.2526/0.2496/0.2474; weight 0.25 with
    # l2 100 0.2541; temperature 0.02 / 0.1 / 0.2 (weight 1 / 1 / 0.5) 0.2480/0.2524/0.2476; with the
    # default: learning rate 3e-3 0.2598, 18 epochs 0.2615 (not worth 4 more epochs of the time budget).
    distill_weight: float = 0.25
    distill_l2: float = 200.0
    distill_temperature: float = 0.05
    # The items the distillation's two softmaxes cover: "candidates" (the step's positives and sampler
    # negatives, which the tower embeds anyway) or "all" (the whole catalog: the item tower embeds
    # every item each step, ~40% more retrieval training time on ml-100k). Validation NDCG@10, seeds
    # 0-2: candidates 0.2587/0.2574/0.2575, all 0.2606/0.2545/0.2558 (the grid above ran with all).
    distill_items: str = "candidates"
    # Id tables (user + item rows) larger than this train with sparse (lazy) Adam: a step updates
    # only the rows it used instead of every row of the catalog. 0 = always; needs weight_decay 0.
    lazy_adam_above: int = 100_000


@dataclass(frozen=True)
class RankingConfig:
    embedding_dim: int = 16
    cross_layers: int = 3
    # Low-rank cross weights (0 = full rank) and a 128/64 deep tower: the ranker scores ~500 rows per
    # request, and this size halves its cost (500 rows, 1 thread: ~2.4 -> ~1.3 ms; ranker training
    # ~5 s shorter) at the same quality: ml-100k validation pipeline NDCG@10 (stopping half), seeds
    # 0-2, 0.1962/0.2045/0.2024 against 0.1960/0.2044/0.2021 for full rank with (256, 128).
    low_rank: int = 32
    deep_dims: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    structure: str = "stacked"         # stacked | parallel
    candidates: int = 500              # N retrieved per user before ranking
    negatives_per_positive: int = 4    # retrieved-but-not-taken negatives per positive
    negative_pool: int = 100           # the ranker learns from retrieval's top this-many candidates
    epochs: int = 20
    # 256 since the training-log folds (below): with 2048 an epoch was ~30 steps and the ranker never
    # beat its untrained start. ml-100k, EASE help off (distill_weight 0, affinity none), one tower,
    # validation (stopping half) pipeline NDCG@10 by epoch, start 0.1719: batch 2048 + folds 2
    # 0.1719/0.1719 (kept the start; test 0.2962 = tower); batch 256 + folds 2 0.1721/0.1753/0.1723
    # (test 0.3056 = 1.032 x tower, CTR AUC 0.58 -> 0.71); batch 256 without folds 0.1429/0.1567/
    # 0.1611/0.1642 (kept the start); batch 256 + folds 2 at learning rate 3e-4 best 0.1754 at
    # epoch 3 (test 1.021 x tower, twice the epochs).
    batch_size: int = 256
    # Rows an epoch trains on at most (a fresh random subset of the fitting rows each epoch; 0 = all of
    # them): an epoch is then followed by its stopping-half check after at most this many rows. ml-100k
    # and the ~10k-item logs have ~80k rows, so nothing changes there; the ml-1m-shaped log has 569k, and
    # its two trained epochs (neither beat the start) took 96 s of the job's 307 s (docs/RESULTS.md,
    # "The ranker's epochs on larger logs").
    max_rows_per_epoch: int = 200_000
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    # Epochs without a new best before stopping. 2 since the rating affinity channel: with 3, seed 0
    # ran 15 epochs (ranker stage ~17 -> ~33 s) for gains that do not hold up (0.1965 -> 0.1992 at
    # learning rate 1e-3, none at 2e-3); 2 stops after two epochs (0.1965/0.2083/0.2061).
    patience: int = 2
    # An epoch restarts the patience only when its stopping-half NDCG@10 beats the score that last
    # restarted it by this fraction, as in retrieval. With the refitted fold affinities (fold_affinity
    # below) the curve creeps instead of falling: on the ~10k-item synthetic log 0.1281 (start), 0.1285,
    # 0.1287, 0.1293, 0.1268 took the ranking stage from 30 to 65 s for a ranker the keep rule did not keep.
    min_improvement: float = 0.005
    # The trained ranker replaces its start (the best on the stopping half of retrieval's order and the
    # affinities' logistic and listwise fits, ranking_training.fit_wide) only when its per-user NDCG@10 gain on the stopping half is at least this many standard
    # errors of that gain (a paired t); 0 = any gain, the rule before. Chosen by validation across
    # datasets (docs/RESULTS.md, "The ranker's keep rule"): splitting each run's stopping users into
    # halves, choosing on one and scoring on the other (500 draws), the mean gain over eight runs
    # (ml-100k random, temporal, leave-one-out pooled and sequential, the generic CSV, a ~7k-item
    # catalog; with and without EASE help) was +2.87 % at 0 and +3.65 / +3.74 / +3.74 % at 1 / 1.5 / 2,
    # the worst loss -6.1 % at 0 and -1.3 % at 1. 1 is the smallest of the thresholds within 0.1 point
    # of the best: halves have half the users, so they understate what a rule finds on the whole half.
    keep_min_t: float = 1.0
    # The CTR head's loss: "pointwise" (binary cross-entropy per row, batches of random rows) or
    # "listwise" (each positive's softmax against the negatives of its own candidate list, batches
    # of whole lists: one user's rows of the validation fitting half or of one training-log fold).
    # Separate mode only (joint training keeps its per-row loss).
    # Pipeline NDCG@10 on the stopping half, EASE help off, seed 0, pointwise -> listwise with 16
    # negatives per positive: ml-100k random 0.1753 -> 0.1741, ml-100k temporal 0.1012 -> 0.1012
    # (both keep the start), synthetic 10k-item log random 0.1216 -> 0.1247; seed 1: ml-100k random
    # 0.1852 -> 0.1828, synthetic 0.1268 -> 0.1236.
    loss: str = "pointwise"
    score_mode: str = "ctr"            # ctr | ctr_x_rating
    # After the CTR selection, refit the rating head alone (trunk frozen) on this many training
    # ratings (0 = off; only with score_mode ctr, where it cannot change the order). The kept ranker
    # is often the untrained start, whose rating head is random: test RMSE 1.136 without the refit.
    rating_refit_rows: int = 20_000
    # ease: the ranker also sees a rank-affinity_rank factorisation of EASE's (l2 = affinity_l2) user x
    # item scores on the training log, and its wide logit (retrieval score + affinity) starts from a
    # logistic fit on the fitting rows; none: the ranker without it (retrieval's order at start).
    # ml-100k validation pipeline NDCG@10 (stopping half), seeds 0-2: none 0.1725/0.1807/0.1853
    # (retrieval's order 0.1719/0.1807/0.1853), ease 0.1960/0.2044/0.2021 (EASE alone on the same
    # half 0.1946/0.1985/0.2031). l2 (with an exact SVD): 100 0.1932/0.2022/0.2001, 200
    # 0.1966/0.2044/0.2030, 500 0.1955/0.2030/0.2003, 1000 0.1903/0.1993/0.1975; with l2 500, rank
    # 32 0.1932/0.2030/0.1987 and 128 0.1945/0.2020/0.2010 against 64's 0.1955/0.2030/0.2003.
    affinity: str = "ease"
    affinity_l2: float = 200.0
    affinity_rank: int = 64
    # The rank grows (affinity_rank, x4, x16 ... up to affinity_rank_max and EASE's full rank) until the binary
    # channel's factors keep affinity_fidelity of exact EASE's top 10 over each user's unseen items (500
    # users; ranking_training.affinity_rank); affinity_rank_max <= affinity_rank = affinity_rank alone. Share
    # of the top 10 kept at ranks 64 / 256 / 512 / full (docs/RESULTS.md, "The ranker's affinity rank"):
    # ml-100k 0.77 / 0.91 / 0.98 / 1 (temporal 0.79, leave-one-out 0.78 at 64), the ~10k-item log 0.85 /
    # 0.94 / 0.97 / 1, a catalog of rarer items (each ml-100k item split into five copies) 0.32 / 0.61 /
    # 0.87 / 1. Validation agrees where it can tell: forcing rank 256 left ml-100k's and the ~10k-item log's
    # stopping halves level (0.2030 -> 0.2028, 0.1313 -> 0.1318), and raised the five-copies catalog's in all
    # three seeds (+12 / +14 / +24 %); 512 over 256 there +5 % on the mean of three seeds. 0.65: the middle
    # of the shares that separate the logs as validation does, 0.61 (five copies at 256, where 512 still
    # helped) to 0.699 (a log shaped like ml-1m at 64, where 256 did not help: stopping half 0.2017 at 64,
    # 0.2007 at 256, with 1.8 against 3.2 GB and 248 against 342 s of ranking; "The ranker's affinity rank
    # on logs shaped like other MovieLens releases"). It was 0.7 before that log was tried.
    affinity_rank_max: int = 1024
    affinity_fidelity: float = 0.65
    # A second affinity channel: EASE on the rating values (l2 = affinity_l2 x mean squared rating),
    # joining x0 and the wide logit beside the binary one; false = the binary channel only. ml-100k
    # validation pipeline NDCG@10 (stopping half), seeds 0-2, untrained start (wide logistic fit):
    # binary only 0.1960/0.2044/0.2020, with ratings 0.1965/0.2083/0.2061; after training (patience
    # 3) 0.1962/0.2045/0.2024 against 0.1992/0.2084/0.2073. Other wide inputs did not help (linear or
    # small-MLP fits): item popularity, retrieval x affinity, user activity x affinity, EASE l2 50 or
    # 1000, RP3beta, item / user kNN, EASE on the last 20 items; nor a listwise (per-user softmax)
    # fit of the wide weights or of the DCN.
    affinity_ratings: bool = True
    # The user towers retrieval.user_tower "validated" trained and did not keep join the ranker as affinity
    # channels of their own (trainer/tower_affinity.py: each tower's training-log scores as rank
    # affinity_rank factors, beside EASE's or alone), so the ranker can blend what they know. "on": under
    # every protocol; "off": the ranker sees the kept tower's score only; "auto" (the default): under the
    # random protocol only. Separate mode only. Chosen by validation across logs and seeds, side by side
    # with "off" (docs/RESULTS.md, "The towers not kept as ranker channels"): under random the stopping
    # half rose in all 6 runs (ml-100k seeds 0 and 1, the ~10k-item log; EASE help on and off), and test
    # with it (+1.0 to +3.9 %); under temporal and leave-one-out it was mixed (6 of 8 up with seed 0, down
    # on ml-100k temporal with seed 1, test -3.6 to +4.7 %). There the folds hide each user's latest
    # items, on which the towers not kept were trained: their scores on those rows leak what the served
    # rows cannot show, and retraining them per fold (as EASE is refitted) is not done.
    tower_affinity: str = "auto"
    # The user x item genre cross inside the ranker (trainer/models/dcn.py), derived from the inputs it
    # already takes (history, item_num) and a fixed table of each item's genre flags.
    genre_cross: bool = True
    # Transition channels (trainer/transitions.py, trainer/models/dcn.py): each item's `transitions` strongest
    # successors in the training log (pairs up to transition_window places apart, weighted transition_decay **
    # (gap - 1)), and for each of the user's transition_items latest history items the candidate's weight in
    # its list; 0 = none. They join x0 and the wide logit, whose start is fitted with them. transition_mode
    # "auto" (the default): under the temporal and leave-one-out protocols, whose held-out items come after the
    # history as served requests do, the channels are kept where the wide logit fitted with them beats
    # retrieval's order on the stopping half by ranking.keep_min_t standard errors (the report's
    # ranker.transitions), else the ranker is built without them; under random, none. "on" / "off": under
    # every protocol, unchecked. Side by side on ml-100k, seed 0 (docs/RESULTS.md, "Transition channels"):
    # leave-one-out, sequential tower, EASE help off, stopping half 0.0997 -> 0.1252; temporal, defaults, 0.1580
    # -> 0.1720; random, defaults, 0.2030 -> 0.2015; on the ~10k-item synthetic log (no order in it),
    # leave-one-out, EASE help off, 0.1194 -> 0.1155, which the check avoids.
    transitions: int = 32
    transition_mode: str = "auto"
    transition_items: int = 4
    transition_window: int = 3
    transition_decay: float = 0.5
    # Training-log folds: each fold hides a random fold_share of every user's training items, retrieves
    # with the rest (the tower sees the remaining history) and adds the hidden items found among the
    # top negative_pool candidates as positives, other candidates as negatives: many more examples
    # than the validation fitting half alone. 0 = the validation fitting half only.
    folds: int = 2
    fold_share: float = 0.2
    # Which items a fold hides: "random" (a random fold_share of each user's items), "recent" (each
    # user's most recent items, fold f the f-th most recent window, the history the items before it:
    # the next-item task the leave-one-out and temporal protocols test), "auto" (recent under those
    # two protocols, random under "random"). Tried at ml-100k leave-one-out, sequential tower, EASE
    # help off: "recent" gave 6,070 fold rows (one hidden item per user per fold) against 83,050 and
    # its ranker beat retrieval's order on the stopping half (~470 users, one item each) but not on
    # test (pipeline 0.0395 against the tower's 0.0430; "random" kept the start, 0.0430): too few
    # rows and too small a stopping half to tell ("validated" below would keep recent there, as the
    # stopping half says, and lose on that test split). With the pooled tower,
    # EASE help off, stopping-half pipeline NDCG@10 random -> recent: ml-100k temporal 0.1012 ->
    # 0.1264, ml-100k leave-one-out 0.0654 -> 0.0693, synthetic 10k-item log temporal 0.1213 -> 0.1177
    # (a win on one dataset, a loss on the other). Hence "validated", the default: under temporal and
    # leave-one-out, a ranker trained with random folds and one with recent folds, the one with the
    # higher stopping-half NDCG@10 kept (twice the ranker training there; under the random protocol
    # random folds alone, as before): 0.1264, 0.0693 and 0.1213 on those three.
    fold_order: str = "validated"
    fold_users: int = 5000             # users drawn per fold (each is one full-catalog retrieval)
    # The EASE affinity of the fold rows: "refit" (each fold's EASE refitted without the entries it hid,
    # so a hidden positive's affinity is that of an unseen pair, as a served candidate's is) or "shared"
    # (the ranker's own tables, fitted on every training interaction, the rule before: a hidden positive
    # then carries the affinity of a pair EASE learnt to reproduce, and the ranker learnt to trust the
    # affinity more than a served candidate deserves). Validation pipeline NDCG@10 (stopping half), EASE
    # help on, shared -> refit: ml-100k random 0.2008 -> 0.2008 (both keep the logistic start; the first
    # trained epoch 0.1871 -> 0.1992), temporal 0.1249 -> 0.1389, leave-one-out 0.0751 -> 0.0778; the
    # ~10k-item synthetic log random 0.1289 -> 0.1289 (start kept), temporal 0.1261 -> 0.1274
    # (docs/RESULTS.md, "Fold rows without EASE's leak").
    fold_affinity: str = "refit"
    # The transition channels of the fold rows, the same leak: "refit" (each fold's successor lists built
    # without the entries it hid, so a hidden positive is not counted among the successors of the user's own
    # items before it, as a served candidate is not) or "shared" (the ranker's lists from every training
    # interaction, the rule before the nineteenth session). Validation pipeline NDCG@10 (stopping half), shared
    # -> refit: ml-100k leave-one-out 0.1259 -> 0.1292 (defaults), 0.1276 -> 0.1275 (EASE help off), temporal
    # (EASE help off) 0.1598 both (start kept); the planted-order log leave-one-out (EASE help off) 0.1109 ->
    # 0.1132, temporal 0.1231 -> 0.1223 (docs/RESULTS.md, "Fold rows without the transitions' leak").
    fold_transitions: str = "refit"


@dataclass(frozen=True)
class MultitaskConfig:
    # separate: the two-tower, then the DCN on its candidates; retrieval_only: the DCN is not
    # trained and serves retrieval's order (its wide skip) with a calibrated bias; joint: both
    # trained together on L = L_retrieval + alpha L_rating + beta L_ctr (trainer/joint_training.py).
    mode: str = "separate"
    rating_weight: float = 0.5         # alpha in L = L_retrieval + alpha L_rating + beta L_ctr
    ctr_weight: float = 1.0            # beta


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 20)
    retrieval_ks: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
    ease_grid: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0)
    ease_search: str = "climb"         # "climb": a hill climb over the sorted grid (3 of 5 values, usually); "grid": all
    diversity_strengths: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)
    max_users: int = 0                 # evaluate (and fit the ranker) on at most this many users; 0 = all
    test_context: str = "auto"         # what every model knows of a user when judged on test: "validation" = train
                                       # + the validation interactions (histories, EASE's rows; as served, where a
                                       # recorded interaction joins the history); "train" = train only (every
                                       # figure before the nineteenth session); "auto" = validation under the
                                       # temporal and leave-one-out protocols, whose validation interactions come
                                       # before the test ones (SASRec's leave-one-out), train under random, whose
                                       # may come after them (RecBole's full ranking)


@dataclass(frozen=True)
class PublishConfig:
    artifact_root: str = ""            # "" = do not publish
    retain: int = 5                    # versions kept (the current one always is)
    redis_url: str = ""                # "" = do not materialise features into Redis
    redis_namespace: str = "recsys"
    gate: bool = True                  # false = publish without the quality gate (toy data, smoke tests)
    gate_margin: float = 0.05          # refuse a run whose NDCG@10 is this fraction below the served one
    index: str = "auto"                # auto | flat | ivf | hnsw
    index_exact_below: int = 50_000    # auto: exact search below this many items
    signing_key: str = ""              # Ed25519 private key (PEM) kept OFF the artifact volume; "" = $RECSYS_SIGNING_KEY
    unsigned: bool = False             # true = publish unsigned versions (local experiments; services refuse
                                       # them unless RECSYS_ALLOW_UNSIGNED=1)


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: str = "cpu"                # cpu | cuda | auto
    threads: int = 0                   # torch intra-op threads, 0 = torch default
    tower_workers: int = 0             # user towers trained at once under retrieval.user_tower=validated, each
                                       # in its own process on a share of the threads; 1 = one after another;
                                       # 0 = auto: one per thread up to the towers compared, but one after
                                       # another for the pooled tower and an autoencoder whose epoch spans
                                       # < 10M users x items (trainer/tower_processes.py)
    checkpoint_dir: str = ""           # "" = no checkpoints
    resume: bool = False
    progress: bool = True
    output_dir: str = "runs/latest"    # report and plots of the run


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_CHOICES = {
    "data.protocol": ("random", "temporal", "leave_one_out"),
    "data.sep": ("auto", "comma", "tab", "semicolon", "pipe", "space"),
    "data.bad_rows": ("error", "drop"),
    "ranking.fold_order": ("auto", "random", "recent", "validated"),
    "ranking.tower_affinity": ("auto", "on", "off"),
    "ranking.fold_affinity": ("refit", "shared"),
    "ranking.fold_transitions": ("refit", "shared"),
    "ranking.transition_mode": ("auto", "on", "off"),
    "retrieval.negative_sampling_strategy": ("random", "hard", "mixed"),
    "retrieval.history_table": ("shared", "separate"),
    "retrieval.history_pooling": ("mean", "attention"),
    "retrieval.user_tower": ("validated", "pooled", "sequential", "autoencoder"),
    "retrieval.distill_items": ("all", "candidates"),
    "ranking.structure": ("stacked", "parallel"),
    "ranking.score_mode": ("ctr", "ctr_x_rating"),
    "ranking.loss": ("pointwise", "listwise"),
    "ranking.affinity": ("none", "ease"),
    "multitask.mode": ("separate", "retrieval_only", "joint"),
    "run.device": ("cpu", "cuda", "auto"),
    "publish.index": ("auto", "flat", "ivf", "hnsw"),
    "eval.ease_search": ("climb", "grid"),
    "eval.test_context": ("auto", "validation", "train"),
}
_UNIT_INTERVAL = {"ranking.fold_share", "retrieval.next_item_decay", "retrieval.dropout", "retrieval.hard_fraction", "retrieval.id_dropout",
                  "retrieval.history_dropout", "retrieval.weight_average", "retrieval.autoencoder_dropout",
                  "ranking.dropout", "publish.gate_margin", "ranking.affinity_fidelity", "ranking.transition_decay"}
_NON_NEGATIVE = {"retrieval.min_improvement", "ranking.min_improvement", "retrieval.weight_decay", "ranking.weight_decay", "multitask.rating_weight",
                 "multitask.ctr_weight", "ranking.low_rank", "retrieval.model_hard_every",
                 "run.threads", "run.tower_workers", "retrieval.num_negatives", "eval.max_users", "retrieval.lazy_adam_above",
                 "ranking.rating_refit_rows", "retrieval.distill_weight", "ranking.folds",
                 "retrieval.full_softmax_below", "retrieval.autoencoder_below", "retrieval.autoencoder_users_per_epoch",
                 "ranking.keep_min_t", "ranking.max_rows_per_epoch", "ranking.affinity_rank_max",
                 "ranking.transitions"}


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Converts a file or command-line value to the field's declared type, or raises naming it."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, v, item_type) for v in value)
    if origin is dict:
        if isinstance(value, str):
            value = dict(kv.split(":", 1) for kv in value.split(",") if kv)
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type for {name}: {annotation}")  # internal invariant


def _check(name: str, value: Any) -> None:
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    if name in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if name in ("retrieval.weight_average", "retrieval.autoencoder_dropout") and value >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if name in _NON_NEGATIVE and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    numeric_positive = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric_positive and name not in _UNIT_INTERVAL | _NON_NEGATIVE and name != "run.seed" \
            and name != "data.seed" and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if isinstance(value, tuple) and not value:
        raise ValueError(f"{name} must not be empty")


def build_config(values: Mapping[str, Any]) -> TrainConfig:
    """Builds a TrainConfig from nested {section: {key: value}}; unknown names fail with their name."""
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected {sorted(sections)}")
    built = {}
    for section_name, section_field in sections.items():
        section_cls = section_field.default_factory  # type: ignore[misc]
        given = values.get(section_name, {}) or {}
        if not isinstance(given, Mapping):
            raise ValueError(f"config section {section_name} must be a table, got {given!r}")
        hints = typing.get_type_hints(section_cls)
        known = {f.name for f in dataclasses.fields(section_cls)}
        bad = sorted(set(given) - known)
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{section_name}.{k}' for k in bad]}; "
                             f"{section_name} has {sorted(known)}")
        kwargs = {}
        for key, raw in given.items():
            name = f"{section_name}.{key}"
            kwargs[key] = _coerce(name, raw, hints[key])
        section = section_cls(**kwargs)
        for f in dataclasses.fields(section):
            _check(f"{section_name}.{f.name}", getattr(section, f.name))
        built[section_name] = section
    return TrainConfig(**built)


def read_config_file(path: Path) -> dict[str, Any]:
    """Reads a .toml, .yaml/.yml or .json config file into nested dicts."""
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(text) or {}
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")


def apply_overrides(values: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` overrides (values are coerced to the field type later)."""
    merged = {k: dict(v) for k, v in values.items()}
    for override in overrides:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ValueError(f"override must look like section.key=value, got {override!r}")
        dotted, value = override.split("=", 1)
        section, key = dotted.split(".", 1)
        merged.setdefault(section, {})[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values = read_config_file(Path(path)) if path else {}
    return build_config(apply_overrides(values, overrides or []))


def replace(config: TrainConfig, **sections: Mapping[str, Any]) -> TrainConfig:
    """A copy with some keys changed, validated like a file: replace(cfg, run={"seed": 1})."""
    values = config.to_dict()
    for section, changes in sections.items():
        values.setdefault(section, {}).update(changes)
    return build_config(values)


__all__ = ["TrainConfig", "load_config", "build_config", "apply_overrides", "read_config_file",
           "replace"]
