"""Smoke test of ``evo-subens bench throughput`` on a tiny setting: every method runs and reports sane
numbers. No timing is asserted (rates only have to be positive)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evo_subens.bench.throughput import METHODS, throughput

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [pytest.mark.skipif(not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"Fashion-MNIST IDX files not found under {FASHION_MNIST}"),
              pytest.mark.ray, pytest.mark.slow]


def test_every_method_runs_and_engine_ships_genomes_not_weights(ray_session):
    result = throughput(models=["cnn"], population=4, actors=[1], validation_size=100, repeats=1,
                        data_root=str(FASHION_MNIST), populations=[])
    rows = {row["method"]: row for row in result["throughput"]}
    assert tuple(rows) == METHODS
    assert result["memory"] == []
    for row in rows.values():
        assert row["rate"] > 0 and row["ratio"] > 0
        assert row["driver_mb"] > 0 and row["actor_mb"] > 0
        assert row["actors"] == 1
    for row in rows.values():  # every rate against the forward-pass limit's
        assert row["ratio"] == pytest.approx(row["rate"] / rows["limit"]["rate"])
    params = rows["limit"]["params"]
    for method in ("engine", "engine, last two, no cache", "engine+cache"):
        assert 0 < rows[method]["bytes_per_candidate"] < 1024
    assert rows["stock EvoTorch"]["bytes_per_candidate"] > 4 * params
