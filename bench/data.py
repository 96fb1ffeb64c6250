"""Deterministic, learnable token data with a known entropy floor; nothing is downloaded.

Tokens come from a seeded first-order Markov chain: every token has `branching` possible
successors with Dirichlet-drawn probabilities. A model that learns the transition table
reaches the chain's entropy rate, H = Σ_i π_i · H(P_i) (Cover & Thomas, Elements of
Information Theory, Thm 4.2.4), with π the stationary distribution; no model can do better
in expectation, so the report can show how close the loss gets to this floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MarkovSource:
    vocab_size: int
    seed: int = 0
    branching: int = 8
    concentration: float = 0.5

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        v, k = self.vocab_size, min(self.branching, self.vocab_size)
        self.successors = np.stack([rng.choice(v, size=k, replace=False) for _ in range(v)])
        self.probs = rng.dirichlet(np.full(k, self.concentration), size=v)
        self._cum = np.cumsum(self.probs, axis=1)
        self._cum[:, -1] = 1.0
        self.stationary = self._stationary()

    def _stationary(self) -> np.ndarray:
        """π with π = π·P, by power iteration on the sparse transition table.

        Never densify P: at a 32k vocabulary a dense float64 matrix is 8 GB per rank (this
        once drove two ranks into the host's OOM killer).
        """
        v = self.vocab_size
        flat_next = self.successors.ravel()
        pi = np.full(v, 1.0 / v)
        for _ in range(10_000):
            step = np.bincount(flat_next, weights=(pi[:, None] * self.probs).ravel(), minlength=v)
            # A lazy chain (P+I)/2 has the same π and converges even if P is periodic.
            nxt = 0.5 * (step + pi)
            if np.abs(nxt - pi).sum() < 1e-13:
                break
            pi = nxt
        return nxt / nxt.sum()

    @property
    def entropy_rate_nats(self) -> float:
        """The loss floor in nats per predicted token (cross-entropy uses natural log)."""
        p = self.probs
        row_h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        return float(self.stationary @ row_h)

    def batch(self, batch_size: int, seq_len: int, stream: int) -> np.ndarray:
        """A [batch, seq_len] int64 array; the same (seed, stream) always gives the same tokens.

        The first token is drawn from π so every prediction faces the chain's entropy rate.
        """
        rng = np.random.default_rng([self.seed, stream])
        out = np.empty((batch_size, seq_len), dtype=np.int64)
        out[:, 0] = rng.choice(self.vocab_size, size=batch_size, p=self.stationary)
        u = rng.random((batch_size, seq_len))
        for t in range(1, seq_len):
            prev = out[:, t - 1]
            idx = (u[:, t, None] > self._cum[prev]).sum(axis=1)
            out[:, t] = self.successors[prev, idx]
        return out
