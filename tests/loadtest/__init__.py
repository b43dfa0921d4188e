"""Tests of the load-test harness (loadtest/): pure parts by hand, the drivers against real services."""
