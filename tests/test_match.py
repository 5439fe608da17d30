"""Match pass: bindings, mask classification, rule selection, mixed specs, node counts after substitute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lincompile
from lincompile.errors import SpecError, VerifyError
from lincompile.graph import op_counts, record, short_op
from lincompile.kernels.base import Operator
from lincompile.passes.capture import capture
from lincompile.passes.match import alibi_slopes, classify_mask, find_sites, match
from lincompile.spec import CaptureConfig

from conftest import COMMON, make_spec, spec_text, tiny_config, tiny_model


def test_bindings_on_gqa_llama():
    model = tiny_model("llama")
    spec = make_spec(spec_text("liger_attention"))
    result = match(capture(model, CaptureConfig()), spec)
    site = result.sites[0]
    assert (site.module, site.layer, site.pattern) == ("model.layers.0.self_attn", 0, "sdpa")
    a = site.attrs
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["scale"]) == (4, 2, 16, 0.25)
    assert a["q_proj"] == "model.layers.0.self_attn.q_proj" and a["o_proj"] == "model.layers.0.self_attn.o_proj"
    assert a["k_proj"].endswith("k_proj") and a["v_proj"].endswith("v_proj")
    assert a["mask_kind"] == "causal" and a["rope"]
    shapes = site.describe_bindings()
    assert shapes["k"].startswith("[") and ", 4, " in shapes["k"]  # repeated for GQA
    assert ", 2, " in shapes["k_kv"] and ", 2, " in shapes["k_pre_rope"]
    # The weight accessor reaches the projection's parameters through the graph module.
    assert site.weight("q_proj").shape == (64, 64)


def test_pre_rope_values_are_the_projection_outputs():
    model = tiny_model("llama")
    cap = capture(model, CaptureConfig())
    site = match(cap, make_spec(spec_text("softmax"))).sites[0]
    from lincompile.graph import record

    vals = record(cap.gm, [site.bindings["k_pre_rope"], site.bindings["hidden"]], cap.probe)
    hidden = vals[site.bindings["hidden"]]
    k = model.model.layers[0].self_attn.k_proj(hidden)  # [B, T, 2*16]
    expected = k.view(*k.shape[:2], 2, 16).transpose(1, 2)
    assert torch.allclose(vals[site.bindings["k_pre_rope"]], expected, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_masks_are_classified(impl):
    # Gemma2: alternating sliding (window 4) and full layers; it has no sdpa path, capture falls back to eager.
    model = tiny_model("gemma2", impl)
    cap = capture(model, CaptureConfig(attn_implementation=impl))
    result = match(cap, make_spec(spec_text("softmax", impl)))
    kinds = [(s.layer, s.attrs["mask_kind"], s.attrs.get("window")) for s in result.sites]
    assert kinds == [(0, "sliding", 4), (1, "causal", None)]
    assert result.sites[0].attrs["softcap"] == 50.0
    if impl == "sdpa":
        assert any("captured with eager" in n for n in cap.notes)


def test_a_window_longer_than_the_mask_probe_is_still_found():
    # A window of 1100 probed at the default 1024 tokens would read as causal: the config's window lengthens it.
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from lincompile.passes.match import declared_window, mask_probe_length

    gqa = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = tf.Gemma2Config(**gqa, sliding_window=1100, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    cap = capture(model, CaptureConfig(attn_implementation="eager"))
    result = match(cap, make_spec(spec_text("softmax", "eager")))
    kinds = [(s.attrs["mask_kind"], s.attrs.get("window")) for s in result.sites]
    assert kinds == [("sliding", 1100), ("causal", None)]
    assert declared_window(cfg) == 1100 and mask_probe_length(cfg, 1024, 8192) == 1164
    assert mask_probe_length(cfg, 1024, 1000) == 1000  # a window past the graph's length never applies
    assert mask_probe_length(tf.LlamaConfig(), 1024, 8192) == 1024
    assert declared_window(tf.Qwen2Config(use_sliding_window=False)) is None
    assert mask_probe_length(tf.MistralConfig(sliding_window=30000), 1024, 32768) == 16384  # capped: T x T masks
    assert declared_window(tf.Llama4Config()) == 8192  # attention_chunk_size, in its text config

    # Past the cap, the causal sites say how long a probe tells them apart.
    from lincompile.passes import match as match_pass

    cap = capture(model, CaptureConfig(attn_implementation="eager"))
    old = match_pass.MAX_MASK_PROBE
    match_pass.MAX_MASK_PROBE = 512
    try:
        result = match(cap, make_spec(spec_text("softmax", "eager")))
    finally:
        match_pass.MAX_MASK_PROBE = old
    assert [s.attrs["mask_kind"] for s in result.sites] == ["causal", "causal"]
    assert all("capture.mask_probe_len: 1164 tells them apart" in " ".join(s.notes) for s in result.sites)


def test_rules_select_on_mask_kind_and_keep_sliding_layers():
    model = tiny_model("gemma2", "eager")
    spec = make_spec("capture: {attn_implementation: eager}\nrules:\n"
                     "  - {mask: sliding, op: keep}\n  - {op: liger_attention, params: {window: 8}}\n")
    converted = lincompile.convert(model, spec)
    assert [(s["layer"], s["op"]) for s in converted.report["sites"]] == [(0, "keep"), (1, "liger_attention")]
    counts = op_counts(converted.graph_module.graph)
    assert counts["aten.softmax"] == 1 and counts["call_module"] >= 1


def test_classify_mask_kinds():
    T = 12
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    i = torch.arange(T)
    assert classify_mask(causal, False) == ("causal", None)
    assert classify_mask(causal & (i[:, None] - i[None, :] < 5), False) == ("sliding", 5)
    assert classify_mask(causal & (i[:, None] // 4 == i[None, :] // 4), False) == ("chunked", 4)
    assert classify_mask(torch.ones(T, T, dtype=torch.bool), False) == ("bidirectional", None)
    additive = torch.zeros(T, T).masked_fill(~causal, float("-inf"))
    assert classify_mask(additive[None, None], False) == ("causal", None)
    assert classify_mask(None, True) == ("causal", None)


def test_mixed_spec_inter_layer_hybrid():
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    spec = make_spec("rules:\n  - {layers: [0, '2-3'], op: liger_gla}\n  - {layers: {every: 4, offset: 1}, op: keep}\n")
    converted = lincompile.convert(model, spec)
    assert [s["op"] for s in converted.report["sites"]] == ["liger_gla", "keep", "liger_gla", "liger_gla"]
    assert op_counts(converted.graph_module.graph)["aten.scaled_dot_product_attention"] == 1
    ids = torch.randint(0, 128, (1, 20))
    assert torch.isfinite(converted(ids)).all()
    # layers {except: ...} and module regexes
    spec = make_spec("rules:\n  - {layers: {except: [1]}, modules: 'model\\.layers\\.[0-2]\\.self_attn', op: liger_gla}\n")
    converted = lincompile.convert(tiny_model("llama").eval() if False else model, spec)
    assert [s["layer"] for s in converted.report["sites"]] == [0, 2]


def test_selector_matching_nothing_lists_what_exists():
    model = tiny_model("llama")
    spec = make_spec("rules:\n  - {modules: 'decoder\\..*', op: liger_gla}\n")
    with pytest.raises(SpecError) as info:
        lincompile.convert(model, spec)
    msg = str(info.value)
    assert msg.startswith("test.yaml:2:5:") and "selects no site" in msg and "model.layers.0.self_attn" in msg


class _NaNOp(Operator):
    name = "nan_op"
    inputs = ("q", "v")

    def forward(self, q, v):
        return q * float("nan")


def test_nan_output_is_refused_naming_the_layer(monkeypatch):
    from lincompile.kernels import registry

    monkeypatch.setitem(registry._OPS, "nan_op", _NaNOp)
    model = tiny_model("llama")
    with pytest.raises(VerifyError, match=r"nan_op at model.layers.0.self_attn \(layer 0\) produced NaN"):
        lincompile.convert(model, make_spec(spec_text("nan_op")))


def test_converted_graph_re_exports_at_any_length():
    model = tiny_model("llama")
    converted = lincompile.convert(model, make_spec(spec_text("liger_attention")))
    ids = torch.randint(0, 128, (2, 10))
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(converted.eval(), (ids,), dynamic_shapes={"input_ids": {1: seq}}, strict=False)
    other = torch.randint(0, 128, (2, 77))
    assert torch.allclose(ep.module()(other), converted(other), atol=1e-5)


def test_user_op_without_opt_in_is_refused():
    from lincompile.errors import UsageError

    with pytest.raises(UsageError, match="--allow-code"):
        lincompile.convert(tiny_model("llama"), make_spec(spec_text("mypkg.ops:Op")))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bfloat16_models_convert(impl):
    model = tiny_model("llama", impl).to(torch.bfloat16)
    identity = lincompile.convert(model, make_spec(spec_text("softmax", impl)))
    assert identity.report["capture_max_abs_diff"] == 0.0
    assert identity.report["logits_max_abs_diff"] <= 0.02
    converted = lincompile.convert(tiny_model("llama", impl).to(torch.bfloat16),
                                   make_spec(spec_text("liger_attention", impl)))
    out = converted(torch.randint(0, 128, (1, 70)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Architectures outside the nine of conftest.ARCHS, each for one graph shape the match pass must read.


def _from_config(cfg, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def falcon(alibi: bool):
    """Falcon: ALiBi (bias folded into the sdpa mask, no position_ids) or RoPE; `x @ weight.T` projections."""
    import transformers as tf

    if alibi:
        cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                              multi_query=True, parallel_attn=True, new_decoder_architecture=False)
    else:
        cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True, alibi=False)
    return _from_config(cfg)


def test_classify_mask_sees_bias_values_and_per_head_patterns():
    T = 12
    i = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    blocked = torch.zeros(T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    # ALiBi as Falcon / BLOOM fold it in: slope · key position (per head), on a causal mask.
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    alibi = blocked + slopes[:, None, None] * i[None, None, :].float()
    assert classify_mask(alibi[None], False) == ("custom", None)
    # A relative bias that is 0 on the diagonal: its zeros alone would read as a window of 1.
    relative = blocked - 0.5 * (i[:, None] - i[None, :]).clamp_min(0).float()
    assert classify_mask(relative[None, None], False) == ("custom", None)
    # Both are ALiBi: −s_h·(i − j) on a causal mask, up to a constant per query row (which softmax ignores).
    assert alibi_slopes(alibi[None]) == slopes.tolist() and alibi_slopes(relative[None, None]) == [0.5]
    assert alibi_slopes(alibi[None].bfloat16()) == pytest.approx(slopes.tolist(), rel=1e-2)
    square = blocked - 0.5 * ((i[:, None] - i[None, :]).clamp_min(0).float() ** 2)  # not linear in the distance
    sliding = alibi.masked_fill(i[:, None] - i[None, :] >= 4, torch.finfo(torch.float32).min)  # not causal
    per_row = torch.stack([alibi, alibi + 0.01 * i.float()])  # batch rows differ
    for other in (square[None, None], sliding[None], per_row, causal[None, None]):
        assert alibi_slopes(other) is None
    # Real slope sets (12 heads: no powers of two), read where values are near s·T; and distances whose bias is far
    # below the row's top (0.5 · 2,199 > 1,000), which classify_mask's margin would call blocked.
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    cases = ((12, 300, torch.float32, 1e-6), (12, 300, torch.bfloat16, 1e-2), (1, 2200, torch.float32, 1e-6))
    for H, n, dtype, rel in cases:
        s = build_alibi_tensor(torch.ones(1, 2), H, torch.float32).view(H, 2)[:, 1] if H > 1 else torch.tensor([0.5])
        j = torch.arange(n)
        bias = (s[:, None, None] * j.float()).expand(H, n, n)
        mask = bias.masked_fill(j[:, None] < j[None, :], torch.finfo(dtype).min).to(dtype)
        assert alibi_slopes(mask[None]) == pytest.approx(s.tolist(), rel=rel), (H, n, dtype)
    # Heads with different windows are no single pattern.
    w2, w3 = causal & (i[:, None] - i[None, :] < 2), causal & (i[:, None] - i[None, :] < 3)
    assert classify_mask(torch.stack([w2, w3])[None], False) == ("custom", None)
    # The same pattern for every head, and a constant per row (no effect after softmax), are still that pattern.
    assert classify_mask(torch.stack([w2, w2])[None], False) == ("sliding", 2)
    assert classify_mask((blocked + i[:, None].float())[None, None], False) == ("causal", None)
    assert classify_mask(blocked.masked_fill(~causal, -1e4)[None, None], False) == ("causal", None)
    # Blocking values that are not the dtype's minimum: -1e4 in bfloat16 is -9984, and -2000 blocks as well
    # (exp(-2000) is 0); a row blocked everywhere attends to nothing.
    for fill in (-1e4, -2000.0):
        bf16 = torch.zeros(T, T).masked_fill(~causal, fill).to(torch.bfloat16)
        assert classify_mask(bf16[None, None], False) == ("causal", None), fill
    padded = blocked.clone()
    padded[0] = torch.finfo(torch.float32).min
    assert classify_mask(padded[None, None], False) == ("custom", None)  # row 0 sees nothing: not causal


def test_alibi_bias_is_not_dropped_silently():
    model = falcon(alibi=True)
    result = match(capture(model, CaptureConfig()), make_spec(spec_text("softmax")))
    assert [s.mask_kind for s in result.sites] == ["custom", "custom"]
    # An operator that takes no mask would drop the bias: refused, naming the layers and the way out.
    with pytest.raises(SpecError) as info:
        lincompile.convert(model, make_spec(spec_text("liger_attention")))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("test.yaml:4:5:")
    assert "liger_attention takes no attention mask" in msg and "layer(s) 0, 1" in msg and "custom" in msg
    assert "`{mask: custom, op: keep}`" in msg
    # Kept softmax: the logits are the model's (identity), nothing converted.
    kept = lincompile.convert(model, make_spec("rules:\n  - {mask: custom, op: keep}\n"))
    assert [s["op"] for s in kept.report["sites"]] == ["keep", "keep"]
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert (kept(ids) - model(ids).logits).abs().max() <= 1e-5
    # The softmax operator takes the mask: an identity conversion is exact.
    identity = lincompile.convert(model, make_spec(spec_text("softmax")))
    with torch.no_grad():
        assert (identity(ids) - model(ids).logits).abs().max() <= 1e-5
    # Naming the mask kind in the rule asks for the lossy conversion: done, with a note on each site.
    lossy = lincompile.convert(model, make_spec("rules:\n  - {mask: custom, op: elu_linear}\n"))
    assert all(any("custom attention mask is dropped" in n for n in d["notes"]) for d in lossy.report["site_details"])


def test_projections_through_a_transposed_weight():
    # Falcon's linear layers compute `x @ self.weight.T`: the weight reaches the matmul through a transpose.
    model = falcon(alibi=False)
    site = match(capture(model, CaptureConfig()), make_spec(spec_text("lizard"))).sites[0]
    a = site.attrs
    assert a["q_proj"] == a["k_proj"] == a["v_proj"] == "transformer.h.0.self_attention.query_key_value"
    assert a["o_proj"] == "transformer.h.0.self_attention.dense"
    assert "hidden" in site.bindings and a["rope"]
    assert site.weight("q_proj").shape == (128, 64)  # fused q (4 heads), k, v (2 heads each) × 16
    converted = lincompile.convert(model, make_spec(spec_text("lizard", extra="    params: {window: 8}\n")))
    assert [s["op"] for s in converted.report["sites"]] == ["lizard", "lizard"]
    assert torch.isfinite(converted(torch.randint(0, 128, (2, 20)))).all()


def test_pre_rope_through_a_transpose():
    # GPT-J applies RoPE (interleaved, partial) in [B, T, H, D] and transposes to [B, H, T, D] afterwards.
    import transformers as tf
    from lincompile.graph import record

    model = _from_config(tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256))
    cap = capture(model, CaptureConfig())
    site = match(cap, make_spec(spec_text("liger_attention"))).sites[0]
    assert site.attrs["rope"] and not any("rotary" in n for n in site.notes)
    b = site.bindings
    vals = record(cap.gm, [b["q_pre_rope"], b["k_pre_rope"], b["hidden"]], cap.probe)
    attn = model.transformer.h[0].attn
    for name, proj in (("q_pre_rope", attn.q_proj), ("k_pre_rope", attn.k_proj)):
        x = proj(vals[b["hidden"]])
        assert torch.allclose(vals[b[name]], x.view(*x.shape[:2], 4, 16).transpose(1, 2), atol=1e-6)


def rope_forms(arch):
    import transformers as tf

    gqa = dict(COMMON, num_attention_heads=4, num_key_value_heads=2)
    mla = dict(COMMON, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    moe = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    return _from_config({
        # multi-head latent attention: q = cat(no-RoPE, RoPE'd) and k filled by copies into an empty tensor, the
        # RoPE part one head broadcast to all; V3's RoPE interleaved (strided halves)
        "deepseek_v3": lambda: tf.DeepseekV3Config(**mla, **moe, n_group=1, topk_group=1),
        # RoPE as a complex product (view_as_complex · freqs), on the MLA parts
        "deepseek_v2": lambda: tf.DeepseekV2Config(**mla, **moe),
        "minicpm3": lambda: tf.MiniCPM3Config(**mla),
        # the complex product, then an L2 norm of q / k (no weight) after RoPE; layer 1 has no RoPE at all
        "llama4": lambda: tf.Llama4TextConfig(**gqa, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                              num_experts_per_tok=1, no_rope_layers=[1, 0], attention_chunk_size=8),
    }[arch]())


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "minicpm3", "llama4"])
def test_pre_rope_in_latent_attention_complex_rope_and_norms_after_rope(arch):
    model = rope_forms(arch)
    cap = capture(model, CaptureConfig())
    sites = match(cap, make_spec(spec_text("softmax"))).sites
    roped = [s.layer for s in sites if s.attrs["rope"]]
    assert roped == ([0] if arch == "llama4" else [0, 1])
    s = sites[0]
    b = s.bindings
    # Layer 0 sees only the token: before RoPE, one token gives the same q / k wherever it stands.
    ids = torch.tensor([[5, 9, 5, 7, 3, 5, 11, 5]])
    vals = record(cap.gm, [b[n] for n in ("q", "k_kv", "q_pre_rope", "k_pre_rope")], ids)
    for post, pre in ((vals[b["q"]], vals[b["q_pre_rope"]]), (vals[b["k_kv"]], vals[b["k_pre_rope"]])):
        assert pre.shape == post.shape
        for t in (2, 5, 7):
            assert torch.allclose(pre[0, :, t], pre[0, :, 0], atol=1e-6)
            assert not torch.allclose(post[0, :, t], post[0, :, 0], atol=1e-3)
        # RoPE turns pairs of channels: lengths stay; at position 0 it turns nothing (the channels may be ordered
        # otherwise: the interleaved form's pairs are strided)
        assert torch.allclose(pre.norm(dim=-1), post.norm(dim=-1), atol=1e-5)
        assert torch.allclose(pre[0, :, 0].sort(-1).values, post[0, :, 0].sort(-1).values, atol=1e-6)
    identity = lincompile.convert(model, make_spec(spec_text("softmax")))
    with torch.no_grad():
        assert (identity(ids) - model(ids).logits).abs().max() <= 1e-5
    liger = make_spec(spec_text("liger_attention", extra="    params: {window: 4}\n"))
    if arch == "llama4":  # its chunked layers need a rule of their own (tests/test_runtime.py keeps them)
        with pytest.raises(SpecError, match=r"layer\(s\) 0 .* chunked mask \(each query sees only the keys of its "
                                            r"own chunk\) that it would silently drop; keep them with a rule "
                                            r"`{mask: chunked"):
            lincompile.convert(model, liger)
        return
    liger = lincompile.convert(model, liger)
    assert not [n for site in liger.sites for n in site.notes if "rotary" in n]
    assert torch.isfinite(liger(ids)).all()


class Assembled(nn.Module):
    """k made empty and filled by copies along its last axis, RoPE on the second part (DeepSeek's keys)."""

    def __init__(self, then=None):
        super().__init__()
        self.then = then

    def forward(self, x, cos, sin):
        a, b = x[..., :8], x[..., 8:]
        k = x.new_empty(x.shape)
        k[..., :8].copy_(a)
        k[..., 8:].copy_(b * cos + torch.cat([-b[..., 4:], b[..., :4]], -1) * sin)
        if self.then is not None:
            self.then(k)
        return k * 1.0


@pytest.mark.parametrize("then", [None, lambda k: k[:, 0].fill_(0.0), lambda k: k[:, :1].copy_(k[:, 1:2]),
                                  lambda k: k.view(-1)[:3].zero_()])
def test_pre_rope_of_a_tensor_filled_by_copies_only_when_nothing_else_writes_it(then):
    from lincompile.walk import find_pre_rope

    x, cos, sin = torch.randn(2, 3, 5, 16), torch.randn(5, 8), torch.randn(5, 8)
    gm = torch.export.export(Assembled(then), (x, cos, sin), strict=False).module()
    k = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].args[0]
    pre = find_pre_rope(k)
    if then is not None:  # a write through another view: the copies do not say what k holds
        assert pre is None
        return
    assert torch.equal(record(gm, [pre], x, cos, sin)[pre], x)


def test_kv_heads_repeated_before_rope():
    # Falcon (new decoder architecture) broadcasts k / v to all query heads before RoPE: k_kv is one head per
    # group of the roped keys, and the operators keep 2 kv heads of state, not 4.
    from lincompile.graph import record

    model = falcon(alibi=False)
    cap = capture(model, CaptureConfig())
    site = match(cap, make_spec(spec_text("liger_attention"))).sites[0]
    b = site.bindings
    assert (site.attrs["num_heads"], site.attrs["num_kv_heads"]) == (4, 2)
    vals = record(cap.gm, [b[n] for n in ("k", "v", "k_kv", "v_kv", "k_pre_rope")], cap.probe)
    assert torch.equal(vals[b["k_kv"]].repeat_interleave(2, dim=1), vals[b["k"]])
    assert torch.equal(vals[b["v_kv"]].repeat_interleave(2, dim=1), vals[b["v"]])
    assert vals[b["k_pre_rope"]].shape[1] == 2
    identity = lincompile.convert(model, make_spec(spec_text("softmax")))
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert (identity(ids) - model(ids).logits).abs().max() <= 1e-5
    converted = lincompile.convert(model, make_spec(spec_text("liger_attention", extra="    params: {window: 8}\n")))
    assert [d["num_kv_heads"] for d in converted.report["site_details"]] == [2, 2]
    assert torch.isfinite(converted(torch.randint(0, 128, (2, 20)))).all()


def gpt_oss():
    import transformers as tf

    cfg = tf.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)  # zeros at init: make them matter
    return model


def test_attention_sinks_are_bound_kept_exactly_and_decoded():
    """GPT-OSS: softmax over the scores and one learned sink logit per head, the sink column sliced off after.
    The sinks are bound (`sinks`), the identity keeps them (exact logits, prefill + decode), lizard starts its
    sink logits from them, operators without sinks say they drop them; its MoE router softmax is no attention."""
    from lincompile.runtime import Runtime

    model = gpt_oss()
    cap = capture(model, CaptureConfig(attn_implementation="eager", max_seq_len=256))
    result = match(cap, make_spec(spec_text("softmax", "eager")))
    kinds = [(s.layer, s.mask_kind, s.attrs.get("window")) for s in result.sites]
    assert kinds == [(0, "sliding", 8), (1, "causal", None)]
    assert any("not attention scores" in m.reason or "not the key dimension" in m.reason for m in result.near_misses)
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    for s in result.sites:
        attn = model.model.layers[s.layer].self_attn
        assert torch.equal(s.constant("sinks"), attn.sinks)
        # GPT-OSS's rotary form (halves: x1·cos − x2·sin, x2·cos + x1·sin) is found: q before it is q_proj's.
        vals = record(cap.gm, [s.bindings["q_pre_rope"], s.bindings["k_pre_rope"], s.bindings["hidden"]], ids)
        hidden = vals[s.bindings["hidden"]]
        q, k = attn.q_proj(hidden).view(2, 19, 4, 16), attn.k_proj(hidden).view(2, 19, 2, 16)
        assert torch.allclose(vals[s.bindings["q_pre_rope"]], q.transpose(1, 2), atol=1e-6)
        assert torch.allclose(vals[s.bindings["k_pre_rope"]], k.transpose(1, 2), atol=1e-6)
    with torch.no_grad():
        want = model(ids).logits
    identity = lincompile.convert(model, make_spec(spec_text("softmax", "eager")))
    assert (identity(ids) - want).abs().max() <= 1e-5
    rt = Runtime.from_model(model, make_spec(spec_text("softmax", "eager")))
    logits, state = rt.prefill(ids[:, :12])
    steps = [logits[:, -1]]
    for t in range(12, 18):
        logits, state = rt.decode(ids[:, t:t + 1], state=state)
        steps.append(logits[:, -1])
    assert (torch.stack(steps, 1) - want[:, 11:18]).abs().max() <= 1e-5
    pads = torch.zeros(2, 3, dtype=torch.long)  # left padding: one call per row, the sinks passed to each as they are
    padded = rt(torch.cat([pads, ids], 1), attention_mask=torch.cat([pads, torch.ones_like(ids)], 1)).logits
    assert (padded[:, 3:] - want).abs().max() <= 1e-4

    lizard = lincompile.convert(model, make_spec(spec_text("lizard", "eager", "    params: {window: 4}\n")))
    for d, (name, op) in zip(lizard.report["site_details"], lizard.operators.items()):
        assert "initialise lizard's sink logits" in " ".join(d["notes"])
        sinks = model.model.layers[d["layer"]].self_attn.sinks
        assert torch.allclose(op.sink_logits.exp().sum(1), sinks.exp(), rtol=1e-5)  # the same mass
    liger = lincompile.convert(model, make_spec(spec_text("liger_attention", "eager")))
    assert all("attention sinks (one learned logit per head) are dropped: liger_attention takes none"
               in " ".join(d["notes"]) for d in liger.report["site_details"])
    no_sinks = lincompile.convert(model, make_spec(spec_text("lizard", "eager",
                                                             "    params: {window: 4, num_sinks: 0}\n")))
    assert all("are dropped: num_sinks is 0" in " ".join(d["notes"]) for d in no_sinks.report["site_details"])
    assert torch.isfinite(no_sinks(ids)).all()


class _Sinks(nn.Module):
    """softmax(cat([scores, column], -1) − max)[..., :-1] @ v, with the column and the max chosen by `kind`."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.sinks = kind, nn.Parameter(torch.randn(2))

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        if self.kind == "from scores":
            column = s.mean(-1, keepdim=True)
        elif self.kind == "from tokens":  # one per head, but computed from the input
            column = q.mean((0, 2, 3)).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        elif self.kind == "two columns":
            column = self.sinks.reshape(1, -1, 1, 1).expand(*s.shape[:-1], 2)
        else:  # "cast", "max over queries"
            column = self.sinks.float().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        x = torch.cat([s, column], -1)
        x = x - x.max(dim=-2 if self.kind == "max over queries" else -1, keepdim=True).values
        return x.softmax(-1)[..., :-2 if self.kind == "two columns" else -1] @ v


@pytest.mark.parametrize("kind, reason", [
    ("from scores", "not the scores concatenated with one sink logit per row"),
    ("from tokens", "not the scores concatenated with one sink logit per row"),
    ("max over queries", "not the scores concatenated with one sink logit per row"),
    ("two columns", "attention sinks in a form not matched"),
])
def test_a_sliced_softmax_without_sink_logits_is_a_near_miss(kind, reason):
    # Not GPT-OSS's sinks: a column that is no per-head constant, a max over another axis (which, unlike a row's
    # max, changes softmax), or two sink columns.
    x = torch.randn(1, 2, 5, 4)
    gm = torch.export.export(_Sinks(kind), (x, x, x)).module()
    result = find_sites(gm, ["eager_softmax_attention"])
    assert not result.sites and reason in result.near_misses[0].reason


def test_sinks_read_through_a_cast_are_the_parameter():
    model = _Sinks("cast")
    x = torch.randn(1, 2, 5, 4)
    gm = torch.export.export(model, (x, x, x)).module()
    result = find_sites(gm, ["eager_softmax_attention"])
    site = result.sites[0]
    site.gm = gm
    assert torch.equal(site.constant("sinks"), model.sinks)


class _ScaledSinks(nn.Module):
    """softmax(s + mask) @ v · sigmoid(logsumexp(s + mask) − sink) (Granite SWA's sinks), or (`leak`) the scores
    also read outside the attention."""

    def __init__(self, leak=False, twice=False):
        super().__init__()
        self.leak, self.twice, self.sinks = leak, twice, nn.Parameter(torch.randn(2))

    def forward(self, q, k, v):
        T = q.shape[2]
        mask = torch.full((T, T), float("-inf")).triu(1)
        s = q @ k.transpose(-1, -2) * 0.5 + mask
        out = s.softmax(-1) @ v
        if self.leak:
            return out + s.amax(-1, keepdim=True)
        scale = (torch.logsumexp(s, -1) - self.sinks.view(1, -1, 1)).float().sigmoid()
        if self.twice:  # not a sink: the scale is no longer softmax's missing mass
            scale = scale.sigmoid()
        return out * scale.unsqueeze(-1).to(out.dtype)


def test_sinks_as_an_output_scale_are_sinks():
    """out · sigmoid(lse − sink) is softmax over the scores and one sink logit, the sink's column dropped: the
    site ends at the scaled output and binds the parameter as `sinks` (Granite SWA end to end: test_architectures)."""
    model = _ScaledSinks()
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    gm = torch.export.export(model, (q, k, v)).module()
    site = find_sites(gm, ["eager_softmax_attention"]).sites[0]
    site.gm = gm
    assert torch.equal(site.constant("sinks"), model.sinks)
    assert short_op(site.output) == "mul" and list(site.output.users)[0].op == "output"
    assert {"logsumexp", "sigmoid", "unsqueeze"} <= {short_op(n) for n in site.nodes}  # replaced with the site
    scores = (q @ k.transpose(-1, -2) * 0.5 + torch.full((6, 6), float("-inf")).triu(1))
    column = model.sinks.view(1, -1, 1, 1).expand(1, 2, 6, 1)
    want = torch.cat([scores, column], -1).softmax(-1)[..., :-1] @ v
    with torch.no_grad():
        assert torch.allclose(model(q, k, v), want, atol=1e-6)


@pytest.mark.parametrize("kind, reader", [("leak", "amax"), ("twice", "logsumexp")])
def test_scores_read_outside_the_attention_are_a_near_miss(kind, reader):
    """A replaced site no longer computes its scores: a value read from them outside it would be left to a decode
    step that sees one key. Such a softmax is no site (a scale that is not a sink's reads them too)."""
    q = torch.randn(1, 2, 6, 4)
    gm = torch.export.export(_ScaledSinks(**{kind: True}), (q, q, q)).module()
    result = find_sites(gm, ["eager_softmax_attention"])
    assert not result.sites
    assert f"inside the attention is also read by {reader}" in result.near_misses[0].reason


def test_a_bias_under_a_softcap_is_no_mask():
    """baddbmm(bias, q, kᵀ) then a tanh softcap: cap·tanh((bias + α·qkᵀ)/cap) is not softcapped scores plus a
    mask, so the eager pattern must not bind the bias as the site's mask (it would compute something else)."""
    from lincompile.passes.match import match_eager

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, bias, causal):  # [B, H, T, D], attended on [B·H, T, D] as BLOOM does
            q, k, v = (x.reshape(8, x.shape[2], 16) for x in (q, k, v))
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.25)
            if self.cap:
                scores = torch.tanh(scores / 5.0) * 5.0
            probs = torch.softmax(scores + causal, dim=-1)
            return torch.bmm(probs, v).view(2, 4, -1, 16)

    T = 6
    args = (torch.randn(2, 4, T, 16), torch.randn(2, 4, T, 16), torch.randn(2, 4, T, 16), torch.randn(8, 1, T),
            torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9))
    for cap, found in ((False, 1), (True, 0)):
        module = Attention()
        module.cap = cap
        gm = torch.export.export(module, args).module()
        sites, misses = match_eager(gm)
        assert len(sites) == found, (cap, misses)
        if cap:
            assert "baddbmm bias inside a logit softcap" in misses[0].reason


def test_recording_a_value_of_the_second_input_alone_binds_it_right():
    """Only what the wanted node needs runs, but every input still takes its own argument: a mask made from the
    positions alone (DeepSeek-V3.2's indexer) is evaluated on the positions, not on the token ids."""

    class Two(nn.Module):
        def forward(self, input_ids, position_ids):
            return input_ids * (position_ids + 100)

    ids, pos = torch.tensor([[7, 8, 9]]), torch.tensor([[0, 1, 2]])
    gm = torch.export.export(Two(), (ids, pos)).module()
    add = next(n for n in gm.graph.nodes if short_op(n) == "add")
    assert torch.equal(record(gm, [add], ids, pos, only_needed=True)[add], pos + 100)


class _OldStyleMasks(nn.Module):
    """Masks as GPT-1 and XLM write them: `scores·b + c·(1 − b)` on keys permuted straight to [B, H, D, T]
    (`kind` "arith"), or an in-place masked_fill_ with the mask expanded to the scores' shape ("inplace").
    `c` is the blocked value: not blocking, the arithmetic is no mask."""

    def __init__(self, kind, c=-1e4):
        super().__init__()
        self.kind, self.c = kind, c
        self.register_buffer("b", torch.ones(8, 8).tril().view(1, 1, 8, 8))

    def forward(self, q, k, v):  # [B, T, H, D]
        T = q.shape[1]
        q, v = q.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if self.kind in ("arith", "bias, arith"):
            w = torch.matmul(q, k.permute(0, 2, 3, 1)) / 2.0
            if self.kind == "bias, arith":  # an additive bias first: the 0/1 mask then selects from a sum
                w = w + torch.arange(T, dtype=w.dtype) * 0.1
            b = self.b[:, :, :T, :T]
            w = w * b + self.c * (1 - b)
        elif self.kind == "inplace":
            w = torch.matmul(q, k.permute(0, 2, 1, 3).transpose(2, 3)) / 2.0
            blocked = (self.b[0, 0, :T, :T] == 0).view(1, 1, T, T).expand_as(w)
            w.masked_fill_(blocked, torch.finfo(w.dtype).min)
        else:  # "rowmax": MiMo-V2-Flash subtracts each row's max itself
            w = torch.matmul(q, k.permute(0, 2, 1, 3).transpose(2, 3)) / 2.0
            w = w.masked_fill(self.b[0, 0, :T, :T] == 0, float("-inf"))
            w = w - w.max(dim=-1, keepdim=True).values
        return torch.matmul(w.softmax(-1), v)


@pytest.mark.parametrize("kind", ["arith", "bias, arith", "inplace", "rowmax"])
def test_masks_written_the_old_way_bind_causal(kind):
    """GPT-1's arithmetic select, XLM's in-place fill, MiMo-V2-Flash's own max subtraction: one site each, q, k, v
    bound as [B, H, T, D], a
    boolean causal mask, and softmax(q kᵀ/2 + mask)·v from those bindings equals the module (end to end, decodes
    included: test_architectures). The site keeps none of the scores' nodes outside it."""
    model = _OldStyleMasks(kind)
    q, k, v = (torch.randn(2, 6, 3, 4) for _ in range(3))
    gm = torch.export.export(model, (q, k, v)).module()
    result = find_sites(gm, ["eager_softmax_attention"])
    assert len(result.sites) == 1, result.near_misses
    site = result.sites[0]
    b = site.bindings
    got = record(gm, [b["q"], b["k"], b["v"], b["mask"]], q, k, v)
    mask = got[b["mask"]]
    if kind == "bias, arith":  # additive: the bias where the 0/1 mask keeps, blocked elsewhere
        assert classify_mask(mask.expand(2, 3, 6, 6), False) == ("custom", None)
    else:
        assert mask.dtype == torch.bool and classify_mask(mask.expand(2, 3, 6, 6), False) == ("causal", None)
    assert got[b["k"]].shape == (2, 3, 6, 4) and torch.equal(got[b["k"]], k.permute(0, 2, 1, 3))
    want = torch.nn.functional.scaled_dot_product_attention(got[b["q"]], got[b["k"]], got[b["v"]], attn_mask=mask,
                                                            scale=site.attrs["scale"])
    with torch.no_grad():
        assert torch.allclose(model(q, k, v), want, atol=1e-6)
    assert site.attrs["scale"] == 0.5
    inside = {short_op(n) for n in site.nodes}
    replaced = {"arith": {"rsub", "mul"}, "bias, arith": {"rsub", "mul", "add"},
                "inplace": {"masked_fill_", "expand_as"}, "rowmax": {"sub", "max"}}
    assert replaced[kind] <= inside


def test_arithmetic_with_a_value_that_does_not_block_is_no_mask():
    q = torch.randn(1, 6, 2, 4)
    gm = torch.export.export(_OldStyleMasks("arith", c=-5.0), (q, q, q)).module()
    result = find_sites(gm, ["eager_softmax_attention"])
    assert not result.sites and "neither side leads to matmul" in result.near_misses[0].reason
