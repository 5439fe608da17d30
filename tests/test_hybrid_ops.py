"""lolcats, lizard, swa_sinks: initialisation, parameter counts, the exactness each one claims, conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lincompile
from lincompile.errors import MatchError
from lincompile.kernels import registry
from lincompile.kernels.base import repeat_heads
from lincompile.kernels.hedgehog import HedgehogFeatureMap
from lincompile.kernels.swa import swa_naive
from lincompile.site import Site

from conftest import make_spec, spec_text, tiny_model

B, H, HKV, D, D_MODEL = 2, 4, 2, 8, 24
SMALL = {"lolcats": {"window": 5, "chunk": 4}, "lizard": {"window": 5, "chunk": 4, "num_sinks": 3},
         "swa_sinks": {"window": 5, "num_sinks": 2}}


def make_op(name, **params):
    extra = {"hidden_size": D_MODEL} if name == "lizard" else {}
    return registry.get(name)(num_heads=H, num_kv_heads=HKV, head_dim=D, **extra, **{**SMALL[name], **params})


def make_inputs(op, T, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, T, D), "q_pre_rope": (B, H, T, D), "k_kv": (B, HKV, T, D), "k_pre_rope": (B, HKV, T, D),
              "v_kv": (B, HKV, T, D), "hidden": (B, T, D_MODEL)}
    return {n: torch.randn(*shapes[n], generator=g).to(dtype) for n in op.inputs}


def at(inputs, t):
    """The inputs at one position (hidden is [B, T, d], the others [B, heads, T, ·])."""
    return {n: x[:, t] if n == "hidden" else x[:, :, t] for n, x in inputs.items()}


def span(inputs, lo, hi):
    return {n: x[:, lo:hi] if n == "hidden" else x[:, :, lo:hi] for n, x in inputs.items()}


def causal_softmax(op, q, k_kv, v_kv):
    return F.scaled_dot_product_attention(q, repeat_heads(k_kv, H), repeat_heads(v_kv, H), is_causal=True,
                                          scale=op.scale)


def randomise(op):
    """Move every new parameter off its initial value, so exactness claims are not init artefacts."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return op


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------
# All three: forms agree, the state stays the same size, dtypes round-trip.


@pytest.mark.parametrize("name", list(SMALL))
def test_forms_agree_across_window_and_sink_boundaries(name):
    op = randomise(make_op(name))
    T = 2 * op.config["window"] + 3
    x = make_inputs(op, T)
    ref = op.naive(**x)
    out, state = op.chunked(**x)
    assert rel(out, ref) < 1e-5
    # Handoffs at 1 and 3: sinks and ring buffers fill across calls.
    parts, st = [], None
    for lo, hi in ((0, 1), (1, 3), (3, T)):
        o, st = op.chunked(**span(x, lo, hi), state=st)
        parts.append(o)
    assert rel(torch.cat(parts, dim=2), ref) < 1e-5
    st, steps = op.init_state(B), []
    for t in range(T):
        o, st = op.step(st, **at(x, t))
        steps.append(o)
    assert rel(torch.stack(steps, dim=2), ref) < 1e-5
    assert shapes(state) == shapes(st) == shapes(op.init_state(B))  # the state does not grow with T


@pytest.mark.parametrize("T", [3, 5, 7, 10])
@pytest.mark.parametrize("name", list(SMALL))
def test_chunked_matches_naive_around_the_window_length(name, T):
    # Window 5: an input shorter than the window, as long, past it (not a multiple) and twice as long; the
    # gradients include the sink logits (lizard) and go through the sink tokens (swa_sinks).
    op = randomise(make_op(name))
    x = {n: t.requires_grad_() for n, t in make_inputs(op, T).items()}
    leaves = [*x.values(), *op.parameters()]
    weight = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(2))

    def run(form):
        out = form(**x)
        out = out[0] if isinstance(out, tuple) else out
        return out, torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)

    (ref, ref_grads), (out, grads) = run(op.naive), run(op.chunked)
    assert rel(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        assert g is None or torch.allclose(g, r, rtol=1e-4, atol=1e-6)  # γ's is exactly 0 while T ≤ w (lolcats)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(SMALL))
def test_low_precision_inputs(name, dtype):
    op = make_op(name)
    x = make_inputs(op, 23)
    out = op(**{n: v.to(dtype) for n, v in x.items()})
    assert out.dtype == dtype and out.shape == (B, H, 23, D)
    assert rel(out, op(**x)) < 2e-2


# --------------------------------------------------------------------------------------------------
# Hedgehog feature map


def test_hedgehog_identity_init_is_softmax_pair():
    fm = HedgehogFeatureMap(3, 6, 6)
    assert torch.equal(fm.weight, torch.eye(6).expand(3, 6, 6))
    x = torch.randn(2, 3, 5, 6, dtype=torch.bfloat16)
    phi = fm(x)
    assert phi.dtype == torch.float32 and phi.shape == (2, 3, 5, 12)
    assert torch.allclose(phi, torch.cat([x.float().softmax(-1), (-x.float()).softmax(-1)], -1))
    # Narrower / wider feature maps: the first min(D, F) coordinates pass through.
    assert HedgehogFeatureMap(3, 6, 4)(x).shape[-1] == 8
    wide = HedgehogFeatureMap(3, 6, 9)
    assert torch.equal(wide.weight[0, :, :6], torch.eye(6)) and not wide.weight[..., 6:].any()


# --------------------------------------------------------------------------------------------------
# lolcats


def test_lolcats_init():
    op = make_op("lolcats", feature_dim=None)
    assert torch.allclose(torch.sigmoid(op.window_logit), torch.full((H,), 0.1))
    for fm in (op.phi_q, op.phi_k):
        assert torch.equal(fm.weight, torch.eye(D).expand(H, D, D))
    assert op.phi_q.weight is not op.phi_k.weight  # untied
    assert sum(p.numel() for p in op.parameters()) == 2 * H * D * D + H
    op = make_op("lolcats", feature_dim=3)
    assert sum(p.numel() for p in op.parameters()) == 2 * H * D * 3 + H
    assert op.init_state(B)["lin"].shape == (B, H, 2 * 3, D + 1)
    with pytest.raises(ValueError, match="feature_dim"):
        make_op("lolcats", feature_dim=0)


@pytest.mark.parametrize("T", [1, 4, 5])
def test_lolcats_is_softmax_within_the_window(T):
    # No token is older than the window: the linear term is empty and γ cancels, whatever φ and γ are.
    op = randomise(make_op("lolcats"))
    x = make_inputs(op, T)
    ref = causal_softmax(op, **x)
    assert (op.naive(**x) - ref).abs().max() < 1e-6
    assert (op(**x) - ref).abs().max() < 1e-6


def test_lolcats_past_the_window_follows_the_documented_formula():
    # An explicit per-query computation of the docstring's formula: the window's exp(s − c_t) with c_t its own
    # row max, the linear term un-rescaled, one normaliser.
    op = randomise(make_op("lolcats"))
    w, T = op.config["window"], 12
    x = make_inputs(op, T)
    q, k, v = x["q"], repeat_heads(x["k_kv"], H), repeat_heads(x["v_kv"], H)
    fq, fk = op.phi_q(q), op.phi_k(k)
    gamma = torch.sigmoid(op.window_logit)
    out = op(**x)
    for t in (0, w - 1, w, T - 1):
        win, old = range(max(0, t - w + 1), t + 1), range(0, max(0, t - w + 1))
        s = torch.einsum("bhd,bhsd->bhs", q[:, :, t], k[:, :, list(win)]) * op.scale
        e = gamma[:, None] * (s - s.amax(-1, keepdim=True)).exp()
        num, den = torch.einsum("bhs,bhsv->bhv", e, v[:, :, list(win)]), e.sum(-1)
        for j in old:
            a = (fq[:, :, t] * fk[:, :, j]).sum(-1)
            num, den = num + a[..., None] * v[:, :, j], den + a
        assert torch.allclose(out[:, :, t], num / den[..., None], atol=1e-6), t
    assert rel(out, causal_softmax(op, **x)) > 1e-2  # and that is not softmax any more


# --------------------------------------------------------------------------------------------------
# swa_sinks


@pytest.mark.parametrize("T", [1, 6, 7])  # s + w = 7
def test_swa_sinks_is_softmax_up_to_sinks_plus_window(T):
    op = make_op("swa_sinks")
    x = make_inputs(op, T)
    ref = registry.get("softmax")(H, HKV, D, is_causal=True)(x["q"], x["k_kv"], x["v_kv"])
    assert (ref - causal_softmax(op, **x)).abs().max() < 1e-6
    assert (op.naive(**x) - ref).abs().max() < 1e-6
    assert (op(**x) - ref).abs().max() < 1e-6


def test_swa_sinks_drops_what_is_neither_sink_nor_recent():
    op = make_op("swa_sinks")
    s, w, T = op.config["num_sinks"], op.config["window"], 12
    x = make_inputs(op, T)
    out, ref = op(**x), causal_softmax(op, **x)
    assert (out[:, :, :s + w] - ref[:, :, :s + w]).abs().max() < 1e-6
    assert (out[:, :, s + w:] - ref[:, :, s + w:]).abs().amax(dim=(0, 1, 3)).min() > 1e-3  # every later row
    q, k, v = x["q"], repeat_heads(x["k_kv"], H), repeat_heads(x["v_kv"], H)
    for t in range(T):
        keys = sorted(set(range(min(s, t + 1))) | set(range(max(0, t - w + 1), t + 1)))
        p = (torch.einsum("bhd,bhsd->bhs", q[:, :, t], k[:, :, keys]) * op.scale).softmax(-1)
        assert torch.allclose(out[:, :, t], torch.einsum("bhs,bhsv->bhv", p, v[:, :, keys]), atol=1e-6), t
    assert sum(p.numel() for p in op.parameters()) == 0


# --------------------------------------------------------------------------------------------------
# lizard


def test_lizard_init_and_parameter_count():
    op = make_op("lizard", feature_dim=6)
    gamma = torch.sigmoid(op.gate_bias)
    assert gamma.min() >= 0.95 - 1e-6 and gamma.max() <= 0.99 + 1e-6 and len(set(gamma.tolist())) == H
    assert not op.gate_weight.any() and not op.sink_logits.any() and torch.equal(op.alpha, torch.ones(H))
    m = op.config["num_sinks"]
    assert sum(p.numel() for p in op.parameters()) == 2 * H * D * 6 + H * D_MODEL + H + H * m + H
    assert op.init_state(B)["gla"].shape == (B, H, 12, D + 1)
    assert make_op("lizard", num_sinks=0).sink_logits.numel() == 0


def lizard_parts(op, x):
    """(normalised gated linear attention, window softmax without sinks) written out quadratically."""
    fq, fk = op.phi_q(x["q_pre_rope"]), op.phi_k(repeat_heads(x["k_pre_rope"], H))
    log_gate = F.logsigmoid(x["hidden"] @ op.gate_weight.T + op.gate_bias).transpose(1, 2)  # [B,H,T]
    b = log_gate.cumsum(-1)
    T = b.shape[-1]
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    a = (fq @ fk.transpose(-1, -2)) * decay.exp()
    gated = (a @ repeat_heads(x["v_kv"], H)) / a.sum(-1, keepdim=True)
    return gated, swa_naive(x["q"], repeat_heads(x["k_kv"], H), repeat_heads(x["v_kv"], H), op.config["window"],
                            op.scale)


def test_lizard_branches():
    op = randomise(make_op("lizard"))
    x = make_inputs(op, 13)
    gated, swa = lizard_parts(op, x)
    with torch.no_grad():
        op.alpha.zero_()
    assert rel(op(**x), gated) < 1e-5  # α = 0: normalised gated linear attention, gate σ(W_γ x + b)
    with torch.no_grad():
        op.alpha.copy_(torch.arange(1.0, H + 1))
        op.sink_logits.fill_(-1e4)
    # Sinks at −∞: the window branch is plain sliding-window softmax, added with weight α per head.
    assert rel(op(**x), gated + op.alpha[None, :, None, None] * swa) < 1e-5
    # q = 0 makes every window score 0: each window position weighs 1 / (n_t + Σ_j exp(τ_j)).
    with torch.no_grad():
        op.sink_logits.copy_(torch.randn(H, op.config["num_sinks"]))
    x["q"] = torch.zeros_like(x["q"])
    w, v = op.config["window"], repeat_heads(x["v_kv"], H)
    n = torch.arange(1, 14).clamp(max=w)[:, None]
    window_sum = torch.stack([v[:, :, max(0, t - w + 1):t + 1].sum(2) for t in range(13)], dim=2)
    expected = window_sum / (n + op.sink_logits.exp().sum(-1)[:, None, None])
    assert rel(op(**x), gated + op.alpha[None, :, None, None] * expected) < 1e-5


def test_lizard_sinks_far_above_the_scores_stay_finite():
    # Sinks that take (almost) all the mass: exponents are taken against the larger of window max and sinks.
    op = make_op("lizard")
    with torch.no_grad():
        op.sink_logits.fill_(200.0)
    x = make_inputs(op, 9)
    out, _ = op.chunked(**x)
    with torch.no_grad():
        op.alpha.zero_()
    assert rel(out, op(**x)) < 1e-5  # the window branch has vanished
    with torch.no_grad():
        op.alpha.fill_(1.0)
    op(**x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in op.parameters())


def test_lizard_gradients_reach_the_new_parameters():
    op = make_op("lizard")
    x = make_inputs(op, 17)
    x["hidden"].requires_grad_(True)
    op(**x).square().mean().backward()
    for name in ("gate_weight", "gate_bias", "sink_logits", "alpha", "phi_q.weight", "phi_k.weight"):
        grad = op.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert x["hidden"].grad is not None  # through the gate (zero at init since W_γ = 0, but connected)


def test_lizard_needs_hidden():
    bindings = {n: object() for n in ("q", "k", "v", "k_kv", "v_kv", "q_pre_rope", "k_pre_rope")}
    site = Site(module="model.layers.0.self_attn", layer=0, pattern="sdpa", output=None, nodes=[], bindings=bindings,
                attrs={"num_heads": H, "num_kv_heads": HKV, "head_dim": D})
    with pytest.raises(MatchError, match='needs "hidden"'):
        registry.get("lizard").bind(site)
    with pytest.raises(MatchError, match='"hidden"'):
        registry.get("lizard").from_site(site)


# --------------------------------------------------------------------------------------------------
# Conversion of a tiny llama (4 heads, 2 kv heads, head_dim 16, d_model 64)


def new_param_count(op):
    h, d, f = op.num_heads, op.head_dim, op.head_dim
    if op.name == "lizard":
        return 2 * h * d * f + h * 64 + h + h * op.config["num_sinks"] + h
    return {"lolcats": 2 * h * d * f + h, "swa_sinks": 0}[op.name]


def check_re_exports(converted):
    """The converted graph exports again with a symbolic length (the chunked forms are opaque nodes)."""
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(converted.eval(), (torch.randint(0, 128, (2, 10)),),
                             dynamic_shapes={"input_ids": {1: seq}}, strict=False)
    ids = torch.randint(0, 128, (2, 77))
    with torch.no_grad():
        assert (ep.module()(ids) - converted(ids)).abs().max() < 1e-5


def check_trains(converted, ids):
    logits = converted(ids)
    assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    for op in converted.operators.values():
        for pname, p in op.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    return logits


def test_convert_tiny_llama_lolcats_and_swa_sinks():
    # One capture for both (captures dominate the time): lolcats in layer 0, swa_sinks in layer 1.
    spec = ("name: t\nrules:\n  - {layers: [0], op: lolcats}\n"
            "  - {layers: [1], op: swa_sinks, params: {window: 60, num_sinks: 4}}\n")
    model = tiny_model("llama")
    converted = lincompile.convert(model, make_spec(spec))
    ops = converted.operators
    assert sorted(op.name for op in ops.values()) == ["lolcats", "swa_sinks"]
    assert all(sum(p.numel() for p in op.parameters()) == new_param_count(op) for op in ops.values())
    ids = torch.randint(0, 128, (2, 80))
    with torch.no_grad():  # up to 64 tokens both are softmax attention: the logits don't move
        assert (converted(ids[:, :64]) - model(ids[:, :64]).logits).abs().max() < 1e-4
    logits = check_trains(converted, ids)
    assert (logits.detach() - model(ids).logits).abs().max() > 1e-3  # past the window they do
    check_re_exports(converted)


def test_convert_tiny_llama_lizard():
    converted = lincompile.convert(tiny_model("llama"), make_spec(spec_text("lizard")))
    ops = converted.operators
    assert len(ops) == 2 and all(op.name == "lizard" and op.hidden_size == 64 for op in ops.values())
    assert all(sum(p.numel() for p in op.parameters()) == new_param_count(op) for op in ops.values())
    check_trains(converted, torch.randint(0, 128, (2, 40)))
    assert all(op.gate_weight.grad.abs().sum() > 0 for op in ops.values())
    check_re_exports(converted)
