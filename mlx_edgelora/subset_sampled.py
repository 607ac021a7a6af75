"""--subset-fill sampled: a cached top set plus importance-sampled negatives (issue 21).

Why: the predicted fill's scoring pass (two no-gradient passes over the whole head) costs about
what the exact chunked loss does, so it only pays when it runs every N micro-batches; in
between, `PredictedSubset` models the rest of the vocabulary with one cached direction, a
first-order guess that was measured to cost quality. Here the calls between scoring passes
estimate the rest of the partition function by sampled softmax with the importance correction
(Jean et al. 2015; Bengio & Senecal 2008): S = this call's targets + the (k - m) tokens of
highest mass at the last scoring pass (deterministic), plus m draws with replacement from a
proposal q over the tokens outside that set. A drawn token u (c_u times) enters the softmax with
the logit z_u + log(c_u / (m q_u)), so sum_u exp(corrected) is an unbiased estimate of the
outside-S sum for every row: the loss log(Z_S + Z_out_hat) - z_y is approximate (a little low,
Jensen) and its gradient tends to the exact one as m grows (tests/test_subset_sampled.py).

q mixes the last scoring pass's predicted mass (what the model expects), a running unigram
table of the targets seen so far (what the data holds), and a uniform floor (every token can
be drawn, so the estimate stays unbiased): weights PROPOSAL_MIX. Scoring calls (the first, then
every `refresh`) are the predicted fill's: exact value, tail pseudo-token. The draws are seeded
by (--seed, call index) and the running state (call count, mass and unigram tables) is saved
with each checkpoint (`state_dict`), so a resumed run continues exactly as an unbroken one.
"""

from __future__ import annotations

import base64

import mlx.core as mx
import numpy as np
from mlx import nn

from .blocks import head_shape, head_weight_rows
from .loss import _fill, predicted_scores, subset_tail_ce

# q = 0.85 * last predicted mass + 0.10 * running target unigram + 0.05 * uniform (normalized
# each; then restricted to the tokens outside the deterministic set). Chosen a priori, not tuned.
PROPOSAL_MIX = (0.85, 0.10, 0.05)


def _pack(a: np.ndarray | None) -> str | None:
    """float64 array -> base64 (state.json is JSON; exact bits, ~1.4x the raw size)."""
    return None if a is None else base64.b64encode(a.astype(np.float64).tobytes()).decode()


def _unpack(s: str | None) -> np.ndarray | None:
    return None if s is None else np.frombuffer(base64.b64decode(s), np.float64).copy()


class SampledSubset:
    """(x, targets) -> summed CE: scoring pass every `refresh` calls, sampled softmax between.

    `samples` (m) of the k head rows are drawn; the rest are the targets and the cached most
    expected tokens. `last_exact` says whether the last value was the exact CE.
    """

    def __init__(self, model: nn.Module, k: int, chunk: int, refresh: int, samples: int, seed=0):
        self.model, self.k, self.chunk, self.refresh, self.seed = model, k, chunk, refresh, seed
        self.V = head_shape(model)[0]
        self.m = samples or k // 2
        if not 0 < self.m < k:
            raise ValueError(f"samples must be in (0, k): {self.m} of {k}")
        self.calls, self.mass, self.unigram = 0, None, np.zeros(self.V)
        self.last_exact = True

    def __call__(self, x: mx.array, targets: np.ndarray) -> mx.array:
        fresh = self.mass is None or self.calls % self.refresh == 0
        call = self.calls
        self.calls += 1
        self.last_exact = fresh
        if fresh:
            scores = predicted_scores(x, self.model, self.chunk)
            self.mass = scores.mass / max(scores.mass.sum(), 1e-300)
            self.order = np.argsort(-self.mass, kind="stable")
            s = self.last_subset = _fill(targets, self.order, self.k, self.V)
            np.add.at(self.unigram, targets, 1.0)
            return subset_tail_ce(x, targets, s, self.model, scores)
        det = _fill(targets, self.order, self.k - self.m, self.V)
        np.add.at(self.unigram, targets, 1.0)
        q = self.proposal(det)
        rng = np.random.default_rng([self.seed, call])
        drawn, counts = np.unique(rng.choice(self.V, size=self.m, p=q), return_counts=True)
        self.last_subset = np.concatenate([det, drawn])
        w = head_weight_rows(self.model, self.last_subset)  # [|det| + |drawn|, D]
        corr = np.concatenate([np.zeros(det.size), np.log(counts / (self.m * q[drawn]))])
        logits = x @ w.T + mx.array(corr.astype(np.float32))
        pos = mx.array(np.searchsorted(det, targets).astype(np.int32))  # targets are in det
        target = mx.take_along_axis(logits, pos[:, None], axis=-1)[:, 0]
        return (mx.logsumexp(logits, axis=-1) - target).sum()

    def proposal(self, det: np.ndarray) -> np.ndarray:
        """[V] q: PROPOSAL_MIX of predicted mass, target unigram and uniform; 0 on `det`."""
        a, b, c = PROPOSAL_MIX
        uni = self.unigram / max(self.unigram.sum(), 1.0)
        q = a * self.mass + b * uni + c / self.V
        q[det] = 0.0
        return q / q.sum()

    def state_dict(self) -> dict:
        """The running state, JSON-able, exact: restored by load_state_dict on --resume."""
        return {
            "fill": "sampled",
            "calls": self.calls,
            "mass": _pack(self.mass),
            "unigram": _pack(self.unigram),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fill") != "sampled":
            return  # a checkpoint of another head: start afresh (the first call scores)
        self.calls, self.mass = int(state["calls"]), _unpack(state["mass"])
        self.unigram = _unpack(state["unigram"])
        if self.mass is not None:
            self.order = np.argsort(-self.mass, kind="stable")
