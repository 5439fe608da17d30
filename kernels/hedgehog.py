"""The Hedgehog feature map, shared by `lolcats` and `lizard`.

    φ(x) = [softmax(x W_h) ⊕ softmax(−x W_h)]          per head h, softmax over the F features

Shapes: x `[B, H, ..., D]` -> φ(x) `[B, H, ..., 2F]` in fp32; W `[H, D, F]` (one matrix per head).
W starts as the identity (rectangular when F ≠ D: the first min(D, F) coordinates pass through), so at
init φ(q)·φ(k) = softmax(q)·softmax(k) + softmax(−q)·softmax(−k): a positive kernel that grows with q·k,
which is what training then bends towards exp(q·k) (Zhang et al., "The Hedgehog & the Porcupine:
Expressive Linear Attentions with Softmax Mimicry", 2024; LoLCATs uses it with W untied for q and k).
Both halves are distributions, so φ(x) > 0 and φ(q)·φ(k) ∈ (0, 2]: linear-attention denominators stay
positive.
"""

from __future__ import annotations

import torch
from torch import nn


def resolve_feature_dim(value, head_dim: int) -> int:
    """The operators' `feature_dim` param: a positive integer, or null for head_dim."""
    if value is None:
        return head_dim
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"feature_dim must be a positive integer (or null for head_dim), got {value!r}")
    return value


class HedgehogFeatureMap(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.reset_parameters()

    @property
    def feature_dim(self) -> int:
        return self.weight.shape[-1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.weight.shape[1], self.weight.shape[2], device=self.weight.device)
            self.weight.copy_(eye.expand_as(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 whatever x is: the features feed fp32 states, and bf16 softmax over F would cost precision.
        z = torch.einsum("bh...d,hdf->bh...f", x.float(), self.weight.float())
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)

    def extra_repr(self) -> str:
        h, d, f = self.weight.shape
        return f"heads={h}, head_dim={d}, feature_dim={f} (φ has {2 * f})"
