"""`softmax`: softmax attention re-implemented through the operator machinery (the identity conversion).

    o = softmax(scale · q kᵀ [→ softcap] + mask) v
    with sinks (GPT-OSS): p = softmax([scale · q kᵀ + mask, sink_h]) without its last column; o = p v

Converting every site with `softmax` must reproduce the original logits (fp32, max abs ≤ 1e-5): it proves
that capture, match, substitute and emit lose nothing. Uses the site's q, k, v, mask as fed to attention,
and its scale / logit softcap. The `step` form keeps a full KV cache, so hybrid models that keep softmax
layers can decode too (state grows with T: that is what the other operators remove).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Operator, repeat_heads
from .registry import register


@register
class Softmax(Operator):
    name = "softmax"
    summary = "softmax attention as the original computes it (identity conversion, full KV cache)"
    inputs = ("q", "k", "v")
    optional_inputs = ("mask", "sinks")

    def __init__(self, *args, softcap: float | None = None, is_causal: bool = False, window: int | None = None,
                 attention_chunk: int | None = None, alibi_slopes: list[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.softcap = softcap
        self.is_causal = is_causal
        # For the masks the cached forms build themselves: a sliding mask's window, a chunked mask's chunk.
        self.window = window
        self.attention_chunk = attention_chunk
        # ALiBi (a custom mask of bias −s_h·(i − j) on causal): the cached forms add it to the scores themselves.
        self.alibi_slopes = alibi_slopes

    @classmethod
    def from_site(cls, site, **params):
        a = site.attrs
        # Window and chunk are read off the site's own mask (match.classify_mask), never from a model config.
        window = a.get("window") if a.get("mask_kind") == "sliding" else None
        chunk = a.get("window") if a.get("mask_kind") == "chunked" else None
        slopes = a.get("alibi_slopes") if a.get("mask_kind") == "custom" else None
        return cls(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                   v_head_dim=a.get("v_head_dim"), scale=a.get("scale"), softcap=a.get("softcap"),
                   is_causal=bool(a.get("is_causal", False)), window=window, attention_chunk=chunk,
                   alibi_slopes=slopes, **params)

    def forward(self, q, k, v, mask=None, sinks=None):
        if self.softcap is None and sinks is None:
            k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  is_causal=self.is_causal and mask is None)
        return self.naive(q, k, v, mask, sinks)

    def naive(self, q, k, v, mask=None, sinks=None):
        k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
        scores = (q @ k.transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        T, S = q.shape[2], k.shape[2]
        if mask is None and self.is_causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if sinks is None:
            return (scores.float().softmax(-1).to(q.dtype)) @ v
        column = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # not rounded to bf16 first
        return (torch.cat([scores.float(), column], -1).softmax(-1)[..., :-1].to(q.dtype)) @ v

    def chunked(self, q, k, v, mask=None, state=None, sinks=None):
        # The cache holds one key/value per kv head (init_state's shape) even when the site feeds keys already
        # repeated for GQA: naive() repeats them again.
        k, v = self._kv_heads(k), self._kv_heads(v)
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
            if mask is None:
                T, S = q.shape[2], k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
                if self.window is not None:  # query t (at S - T + t) sees the `window` keys up to itself
                    mask = mask & ~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T - self.window)
                if self.attention_chunk is not None:  # ... or the keys of its own chunk up to itself (Llama 4)
                    at = torch.arange(S - T, S, device=q.device)
                    start = torch.div(at, self.attention_chunk, rounding_mode="floor") * self.attention_chunk
                    mask = mask & (torch.arange(S, device=q.device)[None, :] >= start[:, None])
                if self.alibi_slopes is not None:  # the bias −s_h·(i − j) on the causal mask, per head
                    distance = (torch.arange(S - T, S, device=q.device)[:, None]
                                - torch.arange(S, device=q.device)[None, :]).float()
                    slopes = torch.tensor(self.alibi_slopes, device=q.device).view(-1, 1, 1)
                    mask = (-slopes * distance).masked_fill(~mask, float("-inf"))
        return self.naive(q, k, v, mask, sinks), {"k": k, "v": v}

    def _kv_heads(self, x):
        """Undo a GQA repeat (head h of the repeated tensor is kv head h // group, as repeat_heads makes it)."""
        if x.shape[1] == self.num_kv_heads or x.shape[1] % self.num_kv_heads:
            return x
        return x[:, ::x.shape[1] // self.num_kv_heads]

    def init_state(self, batch, dtype=torch.float32, device=None):
        return {"k": torch.zeros(batch, self.num_kv_heads, 0, self.head_dim, dtype=dtype, device=device),
                "v": torch.zeros(batch, self.num_kv_heads, 0, self.v_head_dim, dtype=dtype, device=device)}

    def step(self, state, q, k, v, mask=None, sinks=None):
        out, state = self.chunked(q[:, :, None], k[:, :, None], v[:, :, None], state=state, sinks=sinks)
        return out[:, :, 0], state
