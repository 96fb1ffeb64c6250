"""The data source: deterministic, and its entropy floor checked against sampled transitions."""

import numpy as np

from llmbench.data import MarkovSource


def test_batches_are_deterministic_and_streams_differ():
    a, b = MarkovSource(64, seed=3), MarkovSource(64, seed=3)
    assert np.array_equal(a.batch(4, 32, stream=7), b.batch(4, 32, stream=7))
    assert not np.array_equal(a.batch(4, 32, stream=7), a.batch(4, 32, stream=8))
    x = a.batch(4, 32, stream=0)
    assert x.dtype == np.int64 and x.shape == (4, 32) and x.min() >= 0 and x.max() < 64


def test_every_transition_is_allowed():
    src = MarkovSource(64, seed=1, branching=4)
    x = src.batch(16, 64, stream=0)
    for prev, nxt in zip(x[:, :-1].ravel(), x[:, 1:].ravel()):
        assert nxt in src.successors[prev]


def test_entropy_rate_matches_empirical_cross_entropy():
    """The mean -log P(next | prev) over sampled sequences converges to the entropy rate."""
    src = MarkovSource(128, seed=2)
    x = src.batch(256, 256, stream=1)
    prev, nxt = x[:, :-1].ravel(), x[:, 1:].ravel()
    dense = np.zeros((128, 128))
    np.put_along_axis(dense, src.successors, src.probs, axis=1)
    empirical = -np.log(dense[prev, nxt]).mean()
    assert abs(empirical - src.entropy_rate_nats) < 0.02
    assert src.entropy_rate_nats < np.log(128) / 2  # learnable: far below the uniform loss


def test_stationary_distribution_is_fixed_point():
    src = MarkovSource(50, seed=4)
    dense = np.zeros((50, 50))
    np.put_along_axis(dense, src.successors, src.probs, axis=1)
    assert np.allclose(src.stationary @ dense, src.stationary, atol=1e-9)
