"""Inception Score (Salimans et al. 2016) from class probabilities: exp(E_x KL(p(y|x) || p(y))).

The function takes the probabilities of any classifier: with the 2015 Inception network's 1,008 classes
it is the Inception Score papers report; with dq's digit classifier it is a domain analogue (at most 10,
the number of classes), not comparable to Inception IS.
"""

from __future__ import annotations

import torch

from dq.errors import UserError


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive chunks of probs [N, K] (rows summing to 1), as the
    original implementation reports them; N must be at least `splits`."""
    if probs.ndim != 2:
        raise UserError(f"probs must be [N, K], got shape {tuple(probs.shape)}")
    if not 1 <= splits <= probs.shape[0]:
        raise UserError(f"splits must lie in [1, N={probs.shape[0]}], got {splits}")
    probs = probs.double()
    if not torch.allclose(probs.sum(dim=1), torch.ones(len(probs), dtype=torch.float64), atol=1e-4):
        raise UserError("probs rows must sum to 1 (pass softmax probabilities, not logits)")
    scores = []
    for chunk in probs.tensor_split(splits):
        marginal = chunk.mean(dim=0, keepdim=True)
        # xlogy: 0 * log 0 = 0 for classes a sample gives no probability
        kl = (torch.xlogy(chunk, chunk) - chunk * torch.log(marginal.clamp_min(1e-30))).sum(dim=1)
        scores.append(torch.exp(kl.mean()))
    scores_t = torch.stack(scores)
    std = float(scores_t.std(unbiased=False)) if splits > 1 else 0.0
    return float(scores_t.mean()), std
