"""`elu_linear`: normalised linear attention with the φ = elu + 1 feature map (no decay).

    φ(x) = elu(x) + 1  (> 0)
    S_t = S_{t-1} + φ(k_t) v_tᵀ,   z_t = z_{t-1} + φ(k_t)
    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020;
the baseline that T2R (Kasai et al., 2021) and SUPRA (Mercat et al., "Linearizing Large Language Models",
2024) start from when uptraining a pretrained model (they add learned feature maps / normalisation: this is
the parameter-free version, so it needs healing). q and k are the pre-RoPE projections (a positive feature map
of rotated vectors would scramble positions); the feature map is applied in fp32 and no scale is used (the
ratio cancels it).

Computed as one GLA without gates on the values augmented with a column of ones: the state is
[S | z], `[B, Hkv, D, V + 1]` fp32, kept per kv head (query heads of a group read the same state).
Shapes: q_pre_rope `[B, Hq, T, D]`, k_pre_rope / v_kv `[B, Hkv, T, D]`. Output in the input dtype.
Bindings: q_pre_rope, k_pre_rope, v_kv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Operator
from .fused import gla_chunked, gla_step
from .gla import gla_naive
from .registry import register


def elu1(x):
    return F.elu(x.float()) + 1.0


@register
class EluLinear(Operator):
    name = "elu_linear"
    summary = "normalised linear attention with φ = elu + 1 on pre-RoPE q/k (Katharopoulos et al.; T2R/SUPRA baseline)"
    params = {"eps": 1e-6, "chunk": 64}
    inputs = ("q_pre_rope", "k_pre_rope", "v_kv")
    fused_kernels = ("chunk_gla",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config["eps"] < 0:
            raise ValueError("eps must be ≥ 0")

    @staticmethod
    def augmented(q_pre_rope, k_pre_rope, v_kv):
        """(φ(q), φ(k), [v | 1]) in fp32: the last value column accumulates the normaliser z."""
        v = v_kv.float()
        return elu1(q_pre_rope), elu1(k_pre_rope), torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

    def normalise(self, out, dtype):
        return (out[..., :-1] / (out[..., -1:] + self.config["eps"])).to(dtype)

    def naive(self, q_pre_rope, k_pre_rope, v_kv):
        out, _ = gla_naive(*self.augmented(q_pre_rope, k_pre_rope, v_kv), None)
        return self.normalise(out, q_pre_rope.dtype)

    def chunked(self, q_pre_rope, k_pre_rope, v_kv, state=None):
        out, S = gla_chunked(*self.augmented(q_pre_rope, k_pre_rope, v_kv), None, chunk=self.config["chunk"],
                             initial_state=None if state is None else state["rec"], backend=self.backend)
        return self.normalise(out, q_pre_rope.dtype), {"rec": S}

    def init_state(self, batch, dtype=torch.float32, device=None):
        return {"rec": torch.zeros(batch, self.num_kv_heads, self.head_dim, self.v_head_dim + 1, device=device)}

    def step(self, state, q_pre_rope, k_pre_rope, v_kv):
        out, S = gla_step(*self.augmented(q_pre_rope, k_pre_rope, v_kv), None, state["rec"], backend=self.backend)
        return self.normalise(out, q_pre_rope.dtype), {"rec": S}
