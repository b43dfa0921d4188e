"""Tests of recsys_contracts.feature_spec: encoding rules, validation and the pinned JSON format."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from recsys_contracts.feature_spec import CategoricalColumn, FeatureSpec, NumericColumn


def make_spec(**overrides) -> FeatureSpec:
    fields = dict(
        user_categorical=(CategoricalColumn("gender", ("F", "M")),
                          CategoricalColumn("occupation", ("writer", "artist", "doctor"))),
        user_numeric=(NumericColumn("mean_rating", 3.5, 0.5), NumericColumn("log_count", 2.0, 0.0, "log1p"),
                      NumericColumn("age", 30.0, 10.0)),
        item_categorical=(CategoricalColumn("studio", ("A",)),),
        item_genres=("Action", "Comedy", "Drama"),
        item_numeric=(NumericColumn("log_popularity", 1.0, 2.0, "log1p"), NumericColumn("year", 1990.0, 10.0)),
        history_length=4,
        n_users=10,
        n_items=20,
        rating_min=1.0,
        rating_max=5.0,
    )
    return FeatureSpec(**{**fields, **overrides})


GOLDEN_JSON = """\
{
  "history_length": 4,
  "item_categorical": [
    {
      "name": "studio",
      "vocabulary": [
        "A"
      ]
    }
  ],
  "item_genres": [
    "Action",
    "Comedy",
    "Drama"
  ],
  "item_numeric": [
    {
      "high": null,
      "low": null,
      "mean": 1.0,
      "name": "log_popularity",
      "std": 2.0,
      "transform": "log1p"
    },
    {
      "high": null,
      "low": null,
      "mean": 1990.0,
      "name": "year",
      "std": 10.0,
      "transform": "identity"
    }
  ],
  "n_items": 20,
  "n_users": 10,
  "rating_max": 5.0,
  "rating_min": 1.0,
  "schema_version": 2,
  "user_categorical": [
    {
      "name": "gender",
      "vocabulary": [
        "F",
        "M"
      ]
    },
    {
      "name": "occupation",
      "vocabulary": [
        "writer",
        "artist",
        "doctor"
      ]
    }
  ],
  "user_numeric": [
    {
      "high": null,
      "low": null,
      "mean": 3.5,
      "name": "mean_rating",
      "std": 0.5,
      "transform": "identity"
    },
    {
      "high": null,
      "low": null,
      "mean": 2.0,
      "name": "log_count",
      "std": 0.0,
      "transform": "log1p"
    },
    {
      "high": null,
      "low": null,
      "mean": 30.0,
      "name": "age",
      "std": 10.0,
      "transform": "identity"
    }
  ]
}
"""


# --- JSON format ---------------------------------------------------------------------------------

def test_json_is_pinned():
    # A change here changes feature_spec.json in every version: bump SCHEMA_VERSION deliberately.
    assert make_spec().to_json() == GOLDEN_JSON


def test_json_round_trips_exactly():
    spec = make_spec(user_numeric=(NumericColumn("x", 0.1 + 0.2, 1 / 3),))
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec
    assert again.user_numeric[0].mean == 0.1 + 0.2


def test_from_json_accepts_integral_numbers_for_floats():
    data = json.loads(GOLDEN_JSON)
    data["rating_min"], data["user_numeric"][2]["mean"] = 1, 30
    spec = FeatureSpec.from_json(json.dumps(data))
    assert spec.rating_min == 1.0 and isinstance(spec.rating_min, float)
    assert spec.user_numeric[2].mean == 30.0


def test_from_json_rejects_unknown_top_level_key():
    data = {**json.loads(GOLDEN_JSON), "item_text": []}
    with pytest.raises(ValueError, match=r"feature spec has unknown keys \['item_text'\]"):
        FeatureSpec.from_json(json.dumps(data))


def test_from_json_rejects_missing_top_level_key():
    data = json.loads(GOLDEN_JSON)
    del data["history_length"], data["n_items"]
    with pytest.raises(ValueError, match=r"feature spec is missing keys \['history_length', 'n_items'\]"):
        FeatureSpec.from_json(json.dumps(data))


def test_from_json_rejects_unknown_and_missing_column_keys():
    data = json.loads(GOLDEN_JSON)
    data["user_numeric"][0]["clip"] = 3.0
    with pytest.raises(ValueError, match=r"user_numeric column has unknown keys \['clip'\]"):
        FeatureSpec.from_json(json.dumps(data))
    data = json.loads(GOLDEN_JSON)
    del data["item_categorical"][0]["vocabulary"]
    with pytest.raises(ValueError, match=r"item_categorical column is missing keys \['vocabulary'\]"):
        FeatureSpec.from_json(json.dumps(data))


def test_from_json_rejects_non_objects_and_non_lists():
    with pytest.raises(ValueError, match="feature spec must be a JSON object, got"):
        FeatureSpec.from_json("[1, 2]")
    for key, bad in (("user_numeric", {"a": 1}), ("item_genres", "Action|Comedy")):
        data = {**json.loads(GOLDEN_JSON), key: bad}
        with pytest.raises(ValueError, match=f"{key} must be a JSON list"):
            FeatureSpec.from_json(json.dumps(data))
    data = json.loads(GOLDEN_JSON)
    data["user_categorical"][0]["vocabulary"] = "FM"
    with pytest.raises(ValueError, match="user_categorical.vocabulary must be a JSON list, got 'FM'"):
        FeatureSpec.from_json(json.dumps(data))


def test_from_json_rejects_wrong_schema_version():
    data = {**json.loads(GOLDEN_JSON), "schema_version": 1}   # before numeric bounds: no low / high
    with pytest.raises(ValueError, match="schema_version must be 2, got 1"):
        FeatureSpec.from_json(json.dumps(data))


# --- columns -------------------------------------------------------------------------------------

def test_categorical_index_is_position_plus_one_and_zero_for_oov_or_missing():
    column = CategoricalColumn("occupation", ("writer", "artist", "doctor"))  # deliberately unsorted
    assert column.encode("writer") == 1 and column.encode("doctor") == 3
    assert column.encode("astronaut") == 0
    values = np.array(["artist", None, float("nan"), "", "doctor", 7], dtype=object)
    np.testing.assert_array_equal(column.encode_array(values), [2, 0, 0, 0, 3, 0])
    assert column.encode_array(values).dtype == np.int64


def test_categorical_with_empty_vocabulary_encodes_everything_to_zero():
    np.testing.assert_array_equal(CategoricalColumn("c", ()).encode_array(["a", "b"]), [0, 0])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="", vocabulary=("a",)), "CategoricalColumn.name must be a non-empty str, got ''"),
    (dict(name="c", vocabulary=["a"]), r"c.vocabulary must be a tuple of str, got \['a'\]"),
    (dict(name="c", vocabulary=("a", 1)), r"c.vocabulary must be a tuple of str, got \('a', 1\)"),
    (dict(name="c", vocabulary=("a", "b", "a")), "c.vocabulary must not repeat values"),
])
def test_categorical_column_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CategoricalColumn(**kwargs)


def test_numeric_identity_and_log1p_scaling():
    identity = NumericColumn("age", 30.0, 10.0)
    np.testing.assert_allclose(identity.encode_array([30.0, 45.0, 10.0]), [0.0, 1.5, -2.0])
    log1p = NumericColumn("log_count", 1.0, 2.0, "log1p")
    # (log1p(e - 1) - 1) / 2 = (1 - 1) / 2 = 0; (log1p(e**5 - 1) - 1) / 2 = (5 - 1) / 2 = 2
    np.testing.assert_allclose(log1p.encode_array([math.e - 1, math.e ** 5 - 1]), [0.0, 2.0], atol=1e-6)
    assert identity.encode_array([1.0]).dtype == np.float32


def test_numeric_missing_non_finite_and_out_of_domain_encode_to_the_mean():
    np.testing.assert_array_equal(NumericColumn("a", 5.0, 2.0).encode_array([np.nan, np.inf, -np.inf]), [0, 0, 0])
    np.testing.assert_array_equal(NumericColumn("c", 5.0, 2.0, "log1p").encode_array([-1.0, -3.0]), [0, 0])


def test_numeric_zero_std_is_treated_as_one():
    np.testing.assert_allclose(NumericColumn("a", 2.0, 0.0).encode_array([2.0, 5.0]), [0.0, 3.0])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(name="", mean=0.0, std=1.0), "NumericColumn.name must be a non-empty str, got ''"),
    (dict(name="a", mean=0.0, std=1.0, transform="log"),
     r"a.transform must be one of \('identity', 'log1p'\), got 'log'"),
    (dict(name="a", mean=float("nan"), std=1.0), "a.mean must be a finite float, got nan"),
    (dict(name="a", mean=1, std=1.0), "a.mean must be a finite float, got 1"),
    (dict(name="a", mean=0.0, std=-1.0), "a.std must be a finite float >= 0, got -1.0"),
    (dict(name="a", mean=0.0, std=float("inf")), "a.std must be a finite float >= 0, got inf"),
])
def test_numeric_column_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NumericColumn(**kwargs)


# --- FeatureSpec validation ----------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (dict(schema_version=0), "schema_version must be 2, got 0"),
    (dict(user_numeric=[NumericColumn("a", 0.0, 1.0)]), "user_numeric must be a tuple of NumericColumn"),
    (dict(item_categorical=(NumericColumn("a", 0.0, 1.0),)), "item_categorical must be a tuple of CategoricalColumn"),
    (dict(item_genres=("Action", "")), "item_genres must be a tuple of non-empty str"),
    (dict(user_numeric=(NumericColumn("gender", 0.0, 1.0),)),
     r"user features must have unique names, got duplicates \['gender'\]"),
    (dict(item_numeric=(NumericColumn("y", 0.0, 1.0),) * 2),
     r"item features must have unique names, got duplicates \['y'\]"),
    (dict(item_genres=("Drama", "Drama")), r"item_genres must have unique names, got duplicates \['Drama'\]"),
    (dict(history_length=0), "history_length must be an int >= 1, got 0"),
    (dict(n_users=-1), "n_users must be an int >= 0, got -1"),
    (dict(n_items=2.0), "n_items must be an int >= 0, got 2.0"),
    (dict(rating_min=1), "rating_min must be a finite float, got 1"),
    (dict(rating_max=float("inf")), "rating_max must be a finite float, got inf"),
    (dict(rating_min=5.5), r"rating_min must be <= rating_max \(5.0\), got 5.5"),
])
def test_feature_spec_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_spec(**overrides)


def test_dimensions():
    spec = make_spec()
    assert (spec.user_cat_dim, spec.user_num_dim, spec.item_cat_dim, spec.item_num_dim) == (2, 3, 1, 5)


# --- encoding rows -------------------------------------------------------------------------------

def test_encode_user_known_values_and_defaults_for_absent_names():
    cat, num = make_spec().encode_user({"occupation": "doctor"}, {"age": 45, "log_count": math.e - 1})
    np.testing.assert_array_equal(cat, [0, 3])  # gender absent -> 0
    # mean_rating absent -> 0; log_count: (1 - 2) / 1 (std 0 -> 1) = -1; age: (45 - 30) / 10 = 1.5
    np.testing.assert_allclose(num, [0.0, -1.0, 1.5], atol=1e-6)
    assert cat.dtype == np.int64 and num.dtype == np.float32
    assert cat.shape == (2,) and num.shape == (3,)


def test_encode_user_out_of_vocabulary_value_is_zero():
    cat, _ = make_spec().encode_user({"gender": "X"}, {})
    np.testing.assert_array_equal(cat, [0, 0])


def test_encode_user_accepts_numpy_numbers():
    _, num = make_spec().encode_user({}, {"age": np.float32(40.0)})
    assert num[2] == pytest.approx(1.0)


@pytest.mark.parametrize(("categorical", "numeric", "message"), [
    ({"genre": "F"}, {}, r"categorical user feature names must be in \['gender', 'occupation'\], got \['genre'\]"),
    ({}, {"height": 1.8},
     r"numeric user feature names must be in \['age', 'log_count', 'mean_rating'\], got \['height'\]"),
    ({"gender": 1}, {}, "categorical user feature 'gender' must be a str, got 1"),
    ({}, {"age": float("nan")}, "numeric user feature 'age' must be a finite number, got nan"),
    ({}, {"age": float("inf")}, "numeric user feature 'age' must be a finite number, got inf"),
    ({}, {"age": True}, "numeric user feature 'age' must be a finite number, got True"),
    ({}, {"age": "31"}, "numeric user feature 'age' must be a finite number, got '31'"),
    ({}, {"log_count": -2.0}, "numeric user feature 'log_count' must be > -1 for log1p, got -2.0"),
])
def test_encode_user_rejects_bad_input(categorical, numeric, message):
    with pytest.raises(ValueError, match=message):
        make_spec().encode_user(categorical, numeric)


def test_encode_users_frame_matches_encode_user_row_by_row():
    spec = make_spec()
    frame = pd.DataFrame({"gender": ["M", None, "F"], "occupation": ["artist", "doctor", "pilot"],
                          "mean_rating": [4.0, np.nan, 3.0], "log_count": [0.0, 10.0, 3.0],
                          "age": [20.0, 35.0, np.nan], "ignored": [1, 2, 3]})
    cat, num = spec.encode_users_frame(frame)
    assert cat.shape == (3, 2) and num.shape == (3, 3)
    assert cat.dtype == np.int64 and num.dtype == np.float32
    for row in range(3):
        record = frame.iloc[row]
        c, n = spec.encode_user({k: record[k] for k in ("gender", "occupation") if isinstance(record[k], str)},
                                {k: record[k] for k in ("mean_rating", "log_count", "age") if not np.isnan(record[k])})
        np.testing.assert_array_equal(cat[row], c)
        np.testing.assert_array_equal(num[row], n)


def test_encode_users_frame_requires_every_spec_column():
    with pytest.raises(ValueError, match=r"frame must have the spec's columns, missing \['occupation', 'log_count'\]"):
        make_spec().encode_users_frame(pd.DataFrame({"gender": ["F"], "mean_rating": [1.0], "age": [1.0]}))


def test_encode_items_frame_genre_flags_then_scaled_numerics():
    spec = make_spec()
    frame = pd.DataFrame({"studio": ["A", "B", None], "genres": ["Comedy|Action", None, "Drama|Western"],
                          "log_popularity": [math.e - 1, 0.0, np.nan], "year": [2000.0, 1980.0, 1990.0]})
    cat, num = spec.encode_items_frame(frame)
    np.testing.assert_array_equal(cat, [[1], [0], [0]])
    # flags (Action, Comedy, Drama) are unscaled; log_popularity (log1p(x) - 1) / 2; year (x - 1990) / 10
    np.testing.assert_allclose(num, [[1, 1, 0, 0.0, 1.0],
                                     [0, 0, 0, -0.5, -1.0],
                                     [0, 0, 1, 0.0, 0.0]], atol=1e-6)
    assert num.dtype == np.float32


def test_encode_items_frame_without_genres_or_columns():
    spec = make_spec(item_categorical=(), item_genres=(), item_numeric=())
    cat, num = spec.encode_items_frame(pd.DataFrame({"title": ["x", "y"]}))
    assert cat.shape == (2, 0) and num.shape == (2, 0)
    with pytest.raises(ValueError, match=r"missing \['genres'\]"):
        make_spec().encode_items_frame(pd.DataFrame({"studio": ["A"], "log_popularity": [1.0], "year": [1.0]}))


def test_default_rows_are_zeros_of_the_right_shape():
    spec = make_spec()
    cat, num = spec.default_user_row()
    assert cat.shape == (2,) and num.shape == (3,) and not cat.any() and not num.any()
    cat, num = spec.default_item_row()
    assert cat.shape == (1,) and num.shape == (5,) and not cat.any() and not num.any()
    assert cat.dtype == np.int64 and num.dtype == np.float32


def test_replace_keeps_validation():
    with pytest.raises(ValueError, match="history_length must be an int >= 1, got -3"):
        replace(make_spec(), history_length=-3)


def test_numeric_bounds_clip_raw_values_before_the_transform():
    column = NumericColumn(name="age", mean=30.0, std=10.0, low=10.0, high=80.0)
    np.testing.assert_array_equal(column.encode_array([1e30, -1e30, 50.0, float("nan")]),
                                  column.encode_array([80.0, 10.0, 50.0, float("nan")]))
    with pytest.raises(ValueError, match=r"age.low must be <= high \(1.0\), got 2.0"):
        NumericColumn(name="age", mean=0.0, std=1.0, low=2.0, high=1.0)
    with pytest.raises(ValueError, match="age.high must be null or a finite float, got inf"):
        NumericColumn(name="age", mean=0.0, std=1.0, high=float("inf"))
