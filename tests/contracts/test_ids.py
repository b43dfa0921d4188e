"""Item-id arithmetic of the services: the lookup and the sorted distinct values."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_contracts.ids import ItemLookup, in_sorted, sorted_unique


@pytest.mark.parametrize("values", [[], [7], [3, 3], [5, 1, 5, 2, 1, 9], list(range(40, 0, -3)) * 2])
def test_sorted_unique_equals_numpy_unique(values):
    array = np.asarray(values, dtype=np.int64)
    got = sorted_unique(array)
    assert got.dtype == np.int64 and got.tolist() == np.unique(array).tolist()


def test_sorted_unique_on_random_ids():
    array = np.random.default_rng(0).integers(0, 300, size=1000)
    assert np.array_equal(sorted_unique(array), np.unique(array))


def test_item_lookup_maps_an_empty_request_to_no_indices():
    indices = ItemLookup(np.array([-1, 50, 7], dtype=np.int64)).indices(np.zeros(0, dtype=np.int64))
    assert indices.dtype == np.int64 and indices.shape == (0,)


@pytest.mark.parametrize("known", [[], [4], [1, 2, 3, 9, 400]])
def test_in_sorted_equals_numpy_isin(known):
    values = np.array([-1, 0, 1, 3, 4, 5, 9, 400, 401, 3], dtype=np.int64)
    known = np.asarray(known, dtype=np.int64)
    assert in_sorted(values, known).tolist() == np.isin(values, known).tolist()
