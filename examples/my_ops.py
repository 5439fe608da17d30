"""A user-defined operator for `specs/custom-op.yaml` (loaded only with --allow-code).

    PYTHONPATH=examples lincompile apply specs/custom-op.yaml smollm2-135m -o out/custom --allow-code

`TemperedSoftmax` is softmax attention with a learnable per-head temperature (initialised to 1, so the
converted model starts identical to the original). It implements the lincompile Operator interface:
`inputs` names the site bindings it needs, `params` its spec parameters, and the three forms.
"""

import torch
from torch import nn

from lincompile.kernels.base import Operator, repeat_heads


class TemperedSoftmax(Operator):
    name = "tempered_softmax"
    params = {"init_temperature": 1.0}
    inputs = ("q", "k", "v")
    optional_inputs = ("mask",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        t = float(self.config["init_temperature"])
        self.log_temperature = nn.Parameter(torch.full((self.num_heads, 1, 1), t).log())

    def naive(self, q, k, v, mask=None):
        k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
        scores = (q @ k.transpose(-1, -2)) * self.scale / self.log_temperature.exp()
        T, S = q.shape[2], k.shape[2]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.float().softmax(-1).to(q.dtype) @ v

    def chunked(self, q, k, v, mask=None, state=None):
        return self.naive(q, k, v, mask), None

    def forward(self, q, k, v, mask=None):
        return self.naive(q, k, v, mask)
