"""The calibration fit (bench.collectives) on synthetic points, no emulated nodes: it recovers
the links that generated them through the projection's own pricing (comm_model.comm_seconds),
overlap included, and every point counts."""

import numpy as np
import pytest

from foe_train.bench import collectives
from foe_train.bench.comm_model import Link, comm_seconds

LOOP = Link(latency=2e-3, bandwidth=700e6, overlap=1.5)
WIRE = Link(latency=1.5e-3, bandwidth=55e6, overlap=1.8)
PLAIN = (Link(latency=0.8e-3, bandwidth=650e6), Link(latency=1.2e-3, bandwidth=48e6))


def synthetic(links: dict[str, tuple[Link, Link]], noise: float = 0.0) -> list[dict]:
    """Points of the worker's patterns (2 nodes x 2 ranks) priced by comm_seconds, each times
    a deterministic factor in [1 - noise, 1 + noise]."""
    rng = np.random.default_rng(0)
    groups = {("all_reduce", "intra_node"): [0, 1], ("all_to_all", "intra_node"): [0, 1],
              ("all_reduce", "inter_node"): [0, 2], ("all_to_all", "inter_node"): [0, 1, 2, 3]}
    points = []
    for (op, scope), group in groups.items():
        for size in collectives.SIZES[scope]:
            sent, cross = collectives.traffic(op, group, 0, lambda r: r // 2, size)
            seconds = comm_seconds(1, sent, cross, *links[op])
            points.append({"op": op, "scope": scope, "size": size, "bytes": sent,
                           "cross_node_bytes": cross,
                           "seconds": seconds * (1 + noise * rng.uniform(-1, 1))})
    return points


def test_fit_recovers_overlapping_links():
    points = synthetic({"all_reduce": (LOOP, WIRE), "all_to_all": PLAIN})
    fitted = collectives.fit(points)
    assert collectives.calibration_error(fitted, points) < 0.01
    for op, truth in (("all_reduce", (LOOP, WIRE)), ("all_to_all", PLAIN)):
        for got, want in zip(collectives.links(fitted, op), truth, strict=True):
            assert got.bandwidth == pytest.approx(want.bandwidth, rel=0.03)
            assert got.latency == pytest.approx(want.latency, rel=0.05)
            assert got.overlap == pytest.approx(want.overlap, abs=0.05)
    # the loopback part of the inter-node all-to-all is priced at the fitted loopback rate
    assert fitted["ops"]["all_to_all"]["inter_node"]["beta"] == pytest.approx(48e6, rel=0.03)


def test_fit_counts_every_point_and_tolerates_noise():
    points = synthetic({"all_reduce": (LOOP, WIRE), "all_to_all": (LOOP, WIRE)}, noise=0.08)
    fitted = collectives.fit(points)
    errors = [abs(collectives.point_seconds(fitted, p) - p["seconds"]) / p["seconds"]
              for p in points]
    assert len(errors) == 2 * sum(len(s) for s in collectives.SIZES.values())
    assert collectives.calibration_error(fitted, points) == max(errors) < 0.15
    # plain alpha-beta cannot follow the bend: the same points priced with overlap 1 miss
    plain = {scope: {**fitted[scope], "overlap": 1.0} for scope in collectives.SCOPES}
    assert collectives.calibration_error(plain, points, per_op=False) > 0.25


def test_overlap_pricing():
    one = Link(latency=1.0, bandwidth=1.0)
    # overlap 1 is plain alpha-beta: calls * alpha + intra/beta_intra + cross/beta_inter
    assert comm_seconds(3, 10, 4, one, Link(latency=5.0, bandwidth=2.0)) == 3 * 5 + 6 + 2
    # p = 2: latency and transfer combine as a Euclidean norm; n calls of b bytes cost n times
    # one call of b bytes (aggregates are priced per mean call)
    tilted = Link(latency=3.0, bandwidth=1.0, overlap=2.0)
    assert comm_seconds(1, 4, 0, tilted, tilted) == pytest.approx(5.0)
    assert comm_seconds(7, 28, 0, tilted, tilted) == pytest.approx(35.0)
    # large p tends to the larger of latency and transfer
    steep = Link(latency=3.0, bandwidth=1.0, overlap=50.0)
    assert comm_seconds(1, 4, 0, steep, steep) == pytest.approx(4.0, rel=0.01)
    with pytest.raises(ValueError):
        Link(latency=1.0, bandwidth=1.0, overlap=0.5)


def test_interquartile_mean_drops_the_tails():
    assert collectives.interquartile_mean([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 90.0]) == 2.0
    assert collectives.interquartile_mean([3.0, 5.0]) == 4.0
