"""Token-level negative log-likelihood as a torchmetrics metric, and the NLL sum of a causal LM's logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics import Metric

__all__ = ["IGNORE_INDEX", "NLLSum", "TokenNLL", "causal_nll_sum"]

IGNORE_INDEX = -100


@dataclass
class NLLSum:
    """Summed NLL (nats) over ``n_tokens`` scored tokens in ``n_windows`` windows."""

    nll_sum: float
    n_tokens: int
    n_windows: int = 0

    @property
    def nll(self) -> float:
        """Mean NLL per scored token (nats)."""
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.n_tokens else math.nan


def causal_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of -log p(labels[t+1] | ..t), number of scored tokens)`` for a causal LM.

    ``logits``: ``[B, L, V]``; ``labels``: ``[B, L]`` with :data:`IGNORE_INDEX` where nothing is scored. The
    prediction at position ``t`` is scored against ``labels[t + 1]`` (the Hugging Face convention), in float32.
    """
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].reshape(-1, vocab).float()  # [B * (L-1), V]
    targets = labels[:, 1:].reshape(-1)  # [B * (L-1)]
    nll = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")  # []
    return nll, (targets != IGNORE_INDEX).sum()


class TokenNLL(Metric):
    """Mean NLL per token over everything seen since the last reset, summed over processes before computing.

    ``update(nll_sum, n_tokens)`` adds a batch's summed NLL and its token count; ``compute()`` returns
    ``nll_sum / n_tokens`` (``exp`` of it is the perplexity). Sums are kept in float64 so that millions of
    tokens do not lose precision.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False
    nll_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_windows: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_tokens", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_windows", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, nll_sum: torch.Tensor, n_tokens: torch.Tensor, n_windows: torch.Tensor | int = 0
    ) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.n_tokens += torch.as_tensor(n_tokens, device=self.n_tokens.device).long()
        self.n_windows += torch.as_tensor(n_windows, device=self.n_windows.device).long()

    def compute(self) -> torch.Tensor:
        return self.nll_sum / self.n_tokens.clamp_min(1)
