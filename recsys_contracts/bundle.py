"""One version's contents, end to end: the file names, ``serving.json``, the score rule, the tables,
the one self-check both services run (``verify_bundle``) and the one go-live order (``go_live``).

A version is good only as a whole: the retrieval service reads the user tower, the item embeddings
and the index, the ranking service the ranker, the user tower and the item embeddings, and both read
the tables. Each service calls ``verify_bundle``, which loads EVERY part and checks that they belong
together, so the two services accept and refuse exactly the same versions:

- the tables agree with each other and with ``feature_spec.json`` (``load_tables``);
- ``serving.json`` is valid (``ServingConfig``);
- user tower output dimension == index dimension == ``item_embeddings.npy`` width, and the index
  holds the catalog;
- the ranker takes this version's rows (its fixed input widths are the spec's and
  ``ranker_history_length``);
- smoke queries (the unknown user and the first known one) give finite embeddings, finite scores,
  item indices inside the catalog, finite CTRs and ratings inside the version's rating range.

Files of a trainer version (docs/ARCHITECTURE.md, "Files of a trainer version"): the trainer writes
them (``trainer.publish``, ``trainer.features.FeatureTables.save``) with the names below; nothing
else spells them. Arrays load with ``allow_pickle=False``, ids from Parquet, JSON as JSON, the
programs through ``recsys_contracts.programs``: nothing read runs code.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recsys_contracts import artifacts, feature_store, item_metadata
from recsys_contracts.ann import Index, IndexParams, read_index
from recsys_contracts.feature_spec import FeatureSpec
from recsys_contracts.programs import USER_TOWER, Program, load_program, load_ranker, run_ranker_program
from recsys_contracts.signing import Trust

log = logging.getLogger(__name__)

FEATURE_SPEC_FILE = "feature_spec.json"
SERVING_FILE = "serving.json"
USER_IDS_FILE = "user_ids.parquet"          # column user_id (str), row 0 = "" (unknown user)
ITEM_IDS_FILE = "item_ids.npy"              # (m+1,) int64, row 0 = -1
USER_TOWER_FILE = "user_tower.onnx"
RANKER_FILE = "ranker.onnx"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
INDEX_FILE = "index.faiss"
# Index-aligned tables, each saved as <name>.npy.
TABLE_FILES = ("user_cat", "user_num", "history", "item_cat", "item_num", "seen_indptr",
               "seen_items", "popular_items", "item_counts")
# Files every trainer version holds besides the tables and the ids.
MODEL_FILES = (FEATURE_SPEC_FILE, SERVING_FILE, USER_TOWER_FILE, RANKER_FILE, ITEM_EMBEDDINGS_FILE, INDEX_FILE)
BUNDLE_FILES = MODEL_FILES + (USER_IDS_FILE, ITEM_IDS_FILE) + tuple(f"{name}.npy" for name in TABLE_FILES)
SCORE_MODES = ("ctr", "ctr_x_rating")
# Fields of the manifest's extra["index"] that are measurements, not IndexParams.
_INDEX_MEASUREMENTS = ("recall@100", "n_items")
_SMOKE_ITEMS = 8


@dataclass(frozen=True)
class ScoreRule:
    """How the served score combines the heads: ``ctr``, or ``ctr * (rating / rating_max) ** rating_weight``.

    The trainer evaluates with it and the ranking service serves with it (one rule, one place)."""

    mode: str
    rating_weight: float
    rating_max: float

    def __post_init__(self) -> None:
        if self.mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {self.mode!r}")
        if not math.isfinite(self.rating_weight) or self.rating_weight < 0:
            raise ValueError(f"rating_weight must be a finite number >= 0, got {self.rating_weight!r}")
        if not math.isfinite(self.rating_max) or self.rating_max <= 0:
            raise ValueError(f"rating_max must be a finite number > 0, got {self.rating_max!r}")

    def apply(self, ctr, rating):
        """(N,) CTRs in [0, 1] and predicted ratings -> (N,) final scores; numpy arrays (float32 stays
        float32) or torch tensors alike (``clip(min=...)`` and ``**`` exist on both)."""
        if self.mode == "ctr":
            return ctr
        return ctr * (rating / self.rating_max).clip(min=0.0) ** self.rating_weight


@dataclass(frozen=True)
class ServingConfig:
    """``serving.json``: what serving needs besides the programs, as the trainer evaluated it."""

    temperature: float               # retrieval score = dot / temperature, > 0
    rating_min: float                # the dataset's rating range
    rating_max: float
    ranker_history_length: int       # the ranker takes the last this-many history items, in [1, H]
    score_mode: str | None = None    # None: the ranking service's configured default
    rating_weight: float = 0.0       # ctr_x_rating: score = ctr * (rating / rating_max) ** weight

    def check(self, history_length: int) -> None:
        """Raises ValueError naming the bad field of serving.json."""
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature <= 0:
            raise ValueError(f"serving.json temperature must be a finite number > 0, got {self.temperature!r}")
        width = self.ranker_history_length
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= history_length:
            raise ValueError(f"serving.json ranker_history_length must be an integer in [1, {history_length}], "
                             f"got {width!r}")
        # Equal bounds: a log with one rating value (implicit feedback), which the rating head predicts.
        if not (math.isfinite(self.rating_min) and self.rating_min <= self.rating_max):
            raise ValueError(f"serving.json rating_min must be finite and at most rating_max {self.rating_max!r}, "
                             f"got {self.rating_min!r}")
        self.score_rule("ctr")   # validates score_mode, rating_weight and rating_max

    def score_rule(self, default_mode: str) -> ScoreRule:
        """The version's rule (it is what offline evaluation used); ``default_mode`` only when it says none."""
        return ScoreRule(self.score_mode or default_mode, float(self.rating_weight), float(self.rating_max))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, history_length: int) -> ServingConfig:
        """Parses serving.json's object; versions before ``ranker_history_length`` gave the ranker all H."""
        if not isinstance(raw, dict):
            raise ValueError(f"serving.json must hold a JSON object, got {type(raw).__name__}")
        known = {"temperature", "rating_min", "rating_max", "ranker_history_length", "score_mode", "rating_weight"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"serving.json has unknown fields {unknown[:8]}, expected only {sorted(known)}")
        missing = sorted({"temperature", "rating_min", "rating_max"} - set(raw))
        if missing:
            raise ValueError(f"serving.json is missing fields {missing}")
        config = cls(temperature=raw["temperature"], rating_min=float(raw["rating_min"]),
                     rating_max=float(raw["rating_max"]),
                     ranker_history_length=raw.get("ranker_history_length", history_length),
                     score_mode=raw.get("score_mode"), rating_weight=float(raw.get("rating_weight", 0.0)))
        config.check(history_length)
        return config


def write_serving(directory: str | Path, config: ServingConfig, history_length: int) -> dict[str, Any]:
    """Writes ``serving.json`` (checked first); returns its content for the manifest's extra section."""
    config.check(history_length)
    body = config.to_dict()
    (Path(directory) / SERVING_FILE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return body


@dataclass(frozen=True, eq=False)
class VersionTables:
    """The index-aligned tables of a version (row 0 = defaults / OOV), the id maps and serving.json."""

    spec: FeatureSpec
    serving: ServingConfig
    user_ids: np.ndarray        # (n+1,) str, row 0 = ""
    item_ids: np.ndarray        # (m+1,) int64, row 0 = -1
    user_cat: np.ndarray        # (n+1, Cu) int64
    user_num: np.ndarray        # (n+1, Nu) float32
    history: np.ndarray         # (n+1, H) int64 item indices, oldest first, 0-padded on the left
    item_cat: np.ndarray        # (m+1, Ci) int64
    item_num: np.ndarray        # (m+1, Ni) float32
    seen_indptr: np.ndarray     # (n+2,) int64 CSR over user index
    seen_items: np.ndarray      # (nnz,) int64 item indices
    popular_items: np.ndarray   # (m,) int64 item indices, most popular first
    item_counts: np.ndarray     # (m+1,) int64 training interactions per item

    @property
    def n_users(self) -> int:
        return self.user_ids.size - 1

    @property
    def n_items(self) -> int:
        return self.item_ids.size - 1

    def user_index(self) -> dict[str, int]:
        """External user id -> user index (built once per version by the caller)."""
        return {uid: i for i, uid in enumerate(self.user_ids.tolist()) if i > 0}

    def seen(self, user_idx: int) -> np.ndarray:
        return self.seen_items[self.seen_indptr[user_idx]:self.seen_indptr[user_idx + 1]]


def load_tables(directory: str | Path) -> VersionTables:
    """Loads and cross-checks the tables of the version in ``directory``; ValueError names the bad file."""
    directory = Path(directory)
    spec = FeatureSpec.from_json((directory / FEATURE_SPEC_FILE).read_text())
    try:
        raw_serving = json.loads((directory / SERVING_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"serving.json must be valid JSON, got error {error}") from None
    serving = ServingConfig.from_dict(raw_serving, spec.history_length)
    user_ids = np.array(pq.read_table(directory / USER_IDS_FILE).column("user_id").to_pylist(), dtype=object)
    item_ids = np.load(directory / ITEM_IDS_FILE, allow_pickle=False)
    arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in TABLE_FILES}
    n, m = user_ids.size, item_ids.size
    expected = {"user_cat": (n, spec.user_cat_dim), "user_num": (n, spec.user_num_dim),
                "history": (n, spec.history_length), "item_cat": (m, spec.item_cat_dim),
                "item_num": (m, spec.item_num_dim), "seen_indptr": (n + 1,),
                "popular_items": (m - 1,), "item_counts": (m,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{name}.npy must have shape {shape}, got {arrays[name].shape}")
    if arrays["seen_indptr"][-1] != arrays["seen_items"].size:
        raise ValueError(f"seen_indptr.npy must end at {arrays['seen_items'].size}, "
                         f"got {arrays['seen_indptr'][-1]}")
    return VersionTables(spec=spec, serving=serving, user_ids=user_ids, item_ids=item_ids, **arrays)


def load_item_embeddings(directory: str | Path, n_items: int) -> np.ndarray:
    """(m+1, D) float32 item embeddings; ValueError unless the rows match the catalog and are finite."""
    embeddings = np.load(Path(directory) / ITEM_EMBEDDINGS_FILE, allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != n_items + 1:
        raise ValueError(f"item_embeddings.npy must have shape ({n_items + 1}, D), got {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("item_embeddings.npy must be finite, got NaN or infinity")
    return embeddings.astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class Bundle:
    """Every part of one version, loaded and checked together; each service keeps what it serves with."""

    version: int
    tables: VersionTables
    user_tower: Program                 # user rows -> (B, D) user vectors (retrieval score = inner product)
    ranker: Program                     # user rows + candidate rows -> (ctr_logit (N,), rating (N,)) (RANKER, or RANKER_ROWS)
    item_embeddings: np.ndarray         # (m+1, D) float32, row 0 = padding
    index: Index                        # ANN over item indices 1..m, inner product, dimension D
    index_params: IndexParams
    build_recall: float | None          # recall@100 measured when the index was built (manifest)
    metadata: item_metadata.ItemMetadata  # display only (titles, genres, recent interactions)

    @property
    def serving(self) -> ServingConfig:
        return self.tables.serving


def _index_params(extra: dict) -> tuple[IndexParams, float | None]:
    raw = dict(extra.get("index", {}))
    recall = raw.get("recall@100")
    fields = {k: v for k, v in raw.items() if k not in _INDEX_MEASUREMENTS}
    return IndexParams(**fields), (None if recall is None else float(recall))


def smoke_users(tables: VersionTables, timestamp: int = 0) -> dict[str, np.ndarray]:
    """User-tower inputs of the unknown user (row 0) and the first known one: the smoke queries' rows."""
    rows = np.array([0, min(1, tables.n_users)], dtype=np.int64)
    return {"user_idx": rows, "user_cat": tables.user_cat[rows], "user_num": tables.user_num[rows],
            "history": tables.history[rows], "timestamp": np.full(rows.size, timestamp, dtype=np.int64)}


def check_search(index: Index, users: np.ndarray, n_items: int) -> None:
    """Raises ValueError unless searching ``users`` (B, D) gives finite scores and indices in [1, m]."""
    scores, ids = index.search(users, min(10, n_items))
    valid = ids[ids >= 0]
    if not np.isfinite(scores[ids >= 0]).all() or ((valid < 1) | (valid > n_items)).any():
        raise ValueError(f"index.faiss smoke query must give finite scores and item indices in "
                         f"[1, {n_items}], got ids {ids.tolist()}")


def check_ranker(ranker, tables: VersionTables, ranker_history: int) -> None:
    """Scores the first items for the unknown user and the first known one; raises ValueError unless
    the CTRs and ratings are finite, one per item, and inside the version's rating range."""
    items = np.arange(1, min(_SMOKE_ITEMS, tables.n_items) + 1, dtype=np.int64)
    n = items.size
    for user in sorted({0, min(1, tables.n_users)}):
        inputs = {"user_idx": np.array([user], dtype=np.int64), "user_cat": tables.user_cat[user][None],  # (1, Cu)
                  "user_num": tables.user_num[user][None], "history": tables.history[user][None, -ranker_history:],
                  "timestamp": np.zeros(1, dtype=np.int64), "row_user": np.zeros(n, dtype=np.int64),
                  "item_idx": items, "item_cat": tables.item_cat[items], "item_num": tables.item_num[items],
                  "retrieval_score": np.zeros(n, dtype=np.float32)}
        logit, rating = run_ranker_program(ranker, inputs)
        if logit.shape != items.shape or rating.shape != items.shape:
            raise ValueError(f"ranker must return ({n},) ctr and rating, got {logit.shape} and {rating.shape}")
        low, high = tables.spec.rating_min, tables.spec.rating_max
        if not (np.isfinite(logit).all() and np.isfinite(rating).all()):
            raise ValueError(f"ranker smoke request must be finite, got ctr logits {logit} ratings {rating}")
        if rating.min() < low - 1e-3 or rating.max() > high + 1e-3:
            raise ValueError(f"ranker ratings must lie in [{low}, {high}], got [{rating.min()}, {rating.max()}]")


def _read_index(directory: Path, params: IndexParams) -> Index:
    try:
        return read_index(directory / INDEX_FILE, params)
    except RuntimeError as error:   # FAISS's reader raises RuntimeError on anything not in its format
        raise ValueError(f"index.faiss must be a FAISS index, FAISS cannot read it: {str(error)[:64]!r}") from None


def verify_bundle(directory: str | Path, version: int, *, device: str = "cpu") -> Bundle:
    """Loads every part of the version in ``directory`` (already signature- and checksum-verified by
    ``artifacts.verify``) and runs the self-check (module docstring); ValueError names the first
    problem. ``device`` is where the user tower runs (the ranker always runs on the CPU)."""
    directory = Path(directory)
    missing = [name for name in BUNDLE_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"version {version} lacks bundle files {missing[:8]} ({len(missing)} missing)")
    params, recall = _index_params(artifacts.read_manifest(directory.parent.parent, version).extra)
    tables = load_tables(directory)
    embeddings = load_item_embeddings(directory, tables.n_items)                     # (m+1, D)
    index = _read_index(directory, params)
    if embeddings.shape[1] != index.dim:
        raise ValueError(f"item_embeddings.npy dimension must equal the index dimension {index.dim}, "
                         f"got {embeddings.shape[1]}")
    if index.size != tables.n_items:
        raise ValueError(f"index.faiss must hold {tables.n_items} items (item_ids.npy), got {index.size}")
    tower = load_program(directory / USER_TOWER_FILE, USER_TOWER, device=device)
    for _ in range(2):                                   # the first call also warms the program up
        users = tower(**smoke_users(tables))[0]                                       # (2, D)
    if users.shape != (2, index.dim):
        raise ValueError(f"user_tower.onnx must output (B, {index.dim}) like the index, got {users.shape}")
    if not np.isfinite(users).all():
        raise ValueError("user_tower.onnx smoke query gave NaN or infinity")
    check_search(index, users, tables.n_items)
    ranker = load_ranker(directory / RANKER_FILE)
    check_ranker(ranker, tables, tables.serving.ranker_history_length)
    # display files too: a version one service would refuse for them, the other must refuse as well
    metadata = item_metadata.load(directory, tables.item_ids)
    return Bundle(version=version, tables=tables, user_tower=tower, ranker=ranker, item_embeddings=embeddings,
                  index=index, index_params=params, build_recall=recall, metadata=metadata)


def go_live(root: str | Path, version: int, *, trust: Trust | None, redis_client=None,
            keys: feature_store.KeyFormat | None = None) -> Bundle:
    """The one go-live order for a version already published without moving CURRENT
    (``artifacts.publish(..., make_current=False)``):

    1. its files verify (``artifacts.verify``: with ``trust``, the signature first; None = the
       publisher's own check, checksums only) and the whole bundle passes ``verify_bundle``, so a
       version the services would refuse never becomes CURRENT;
    2. with ``redis_client``, its features are written to Redis under ``keys`` and the version is
       marked complete, so the services' first request on it finds its features there;
    3. only then CURRENT names it (``artifacts.set_current``).

    The trainer, the notebook API and the load harness all publish through here. Returns the
    checked bundle."""
    root = Path(root)
    artifacts.verify(root, version, trust)
    bundle = verify_bundle(artifacts.version_dir(root, version), version)
    if redis_client is not None:
        if keys is None:
            raise ValueError("keys must be a feature_store.KeyFormat when redis_client is given, got None")
        feature_store.write_tables(redis_client, keys, version, bundle.tables, user_ids=bundle.tables.user_ids,
                                   item_ids=bundle.tables.item_ids)
    artifacts.set_current(root, version, trust)
    log.info("version %d is live under %s", version, root)
    return bundle
