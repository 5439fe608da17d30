"""Runtime: prefill/decode programs with explicit state, generation, left padding, the CLI, .pt2 export.

Consistency is checked for every registered operator and for an inter-layer hybrid (a kept softmax layer
decodes through a KV cache), on a tiny Llama captured once (capture is the slow part on small machines).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lincompile
from lincompile import runtime
from lincompile.cli import main
from lincompile.errors import UsageError
from lincompile.graph import short_op
from lincompile.kernels import registry
from lincompile.kernels.base import Operator
from lincompile.passes import lift_state
from lincompile.passes.capture import capture
from lincompile.runtime import Runtime, load_exported, positions_from_mask, runtime_of
from lincompile.spec import CaptureConfig

from conftest import make_spec, spec_text, tiny_model

# Small windows and chunks so that short sequences cross ring-buffer and chunk boundaries.
SMALL = {"window": 4, "chunk": 8, "num_sinks": 2, "num_slots": 8}
HYBRID = "name: hybrid\nrules:\n  - op: keep\n    layers: [1]\n  - op: liger_attention\n    params: {window: 4, chunk: 8}\n"
CASES = registry.names() + ["hybrid"]
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # deepcopy of a captured graph


def spec_for(case: str):
    if case == "hybrid":
        return make_spec(HYBRID)
    params = {k: v for k, v in SMALL.items() if k in registry.get(case).params}
    extra = f"    params: {json.dumps(params)}\n" if params else ""
    return make_spec(spec_text(case, extra=extra))


@pytest.fixture(scope="module")
def captured():
    return capture(tiny_model("llama"), CaptureConfig(), positions=True)


@pytest.fixture(scope="module")
def runtimes(captured):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = Runtime.from_captured(copy.deepcopy(captured), spec_for(case))
        return cache[case]

    return get


def ids_of(*shape, seed=0):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def full_logits(rt, ids):
    """The plain chunked forward (no state) over the whole sequence: the reference."""
    with torch.no_grad():
        return rt(ids).logits


def decoded_logits(rt, ids, prompt: int):
    """Prefill ids[:, :prompt], then decode the rest one token at a time: every position's logits."""
    logits, state = rt.prefill(ids[:, :prompt])
    steps = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, state = rt.decode(ids[:, t:t + 1], state=state)
        steps.append(logits)
    return torch.cat(steps, 1)


# --------------------------------------------------------------------------------------------------
# Consistency, for every operator and the hybrid


@pytest.mark.parametrize("case", CASES)
def test_greedy_decode_equals_recomputing_the_full_forward(runtimes, case):
    rt = runtimes(case)
    prompt = ids_of(2, 5)
    got = rt.generate(prompt, 32)
    ids = prompt
    for _ in range(32):
        ids = torch.cat([ids, full_logits(rt, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids)
    # Not only the argmax: the decode logits are the full forward's at every position.
    assert (decoded_logits(rt, got, 5) - full_logits(rt, got)).abs().max() < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_prompt_split_anywhere(runtimes, case):
    rt = runtimes(case)
    ids = ids_of(2, 11, seed=1)
    whole, state = rt.prefill(ids)
    assert (whole - full_logits(rt, ids)).abs().max() < 1e-4
    for cut in range(1, 11):
        a, mid = rt.prefill(ids[:, :cut])
        b, end = rt.prefill(ids[:, cut:], state=mid)
        assert (torch.cat([a, b], 1) - whole).abs().max() < 1e-4, cut
        for name, t in state.items():
            assert end[name].shape == t.shape and (end[name].float() - t.float()).abs().max() < 1e-4, (cut, name)


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_equals_one_by_one(runtimes, case):
    rt = runtimes(case)
    lengths, T = [11, 3, 7], 11
    rows = [ids_of(1, n, seed=10 + n)[0] for n in lengths]
    mask = torch.zeros(3, T, dtype=torch.long)
    batch = torch.full((3, T), 5)
    for i, row in enumerate(rows):
        mask[i, T - len(row):] = 1
        batch[i, T - len(row):] = row
    out = rt.generate(batch, 6, attention_mask=mask)
    logits, _ = rt.prefill(batch, positions_from_mask(mask))
    for i, row in enumerate(rows):
        alone = rt.generate(row[None], 6)
        assert torch.equal(out[i, T:], alone[0, len(row):]), i
        assert (logits[i, T - len(row):] - rt.prefill(row[None])[0][0]).abs().max() < 1e-4, i


@pytest.mark.parametrize("case", CASES)
def test_state_size_does_not_grow(runtimes, case):
    rt = runtimes(case)
    _, state = rt.prefill(ids_of(1, 4))
    for token in ids_of(16, seed=2):
        _, state = rt.decode(token.view(1, 1), state=state)
    short = {n: tuple(t.shape) for n, t in state.items()}
    # 4096 tokens in: a long prompt (prefill ≡ decode, as tested above), then generation again. Softmax
    # layers (a KV cache, quadratic prefill) are only checked to grow, at 1024.
    growing = {e.name for s in rt.sites for e in s.entries if e.kind == "growing"}
    total = 1024 if growing else 4096
    _, state = rt.prefill(ids_of(1, total - 32, seed=3))
    for token in ids_of(32, seed=4):
        _, state = rt.decode(token.view(1, 1), state=state)
    assert int(state["seen"]) == total
    long = {n: tuple(t.shape) for n, t in state.items()}
    assert {n: s for n, s in long.items() if n not in growing} == {n: s for n, s in short.items() if n not in growing}
    # Only the KV caches of softmax layers grow, one slot per token.
    assert bool(growing) == (case in ("softmax", "hybrid"))
    for name in growing:
        assert long[name][2] == total and short[name][2] == 20


def test_state_after_16_and_4096_generated_tokens(runtimes):
    """Token by token through the lifted liger_attention operator (the model around it holds no state)."""
    rt = runtimes("liger_attention")
    site = rt.sites[0]
    step = rt.decode_program.get_submodule(f"lifted.{site.module}")
    state = [t for n, t in rt.init_state(1).items() if n.startswith(site.module + ".")]
    g = torch.Generator().manual_seed(0)
    shapes = {}
    for t in range(1, 4097):
        x = {name: torch.randn(1, 4 if name.startswith("q") else 2, 1, 16, generator=g) for name in step.op.inputs}
        _, *state = step(torch.tensor([[t - 1]]), torch.tensor([t - 1]), *state, **x)
        if t in (16, 4096):
            shapes[t] = [(tuple(s.shape), s.dtype) for s in state]
    assert shapes[16] == shapes[4096] and int(state[-1]) == 4096  # the ring buffer's position count


@pytest.fixture(scope="module")
def gpt2():
    """A tiny GPT-2: learned position embeddings for 512 positions."""
    return Runtime.from_model(tiny_model("gpt2"), spec_for("liger_attention"))


def test_learned_positions_follow_the_positions_input(gpt2):
    """GPT-2 adds a learned embedding per absolute position: left padding is only right if positions are
    per sequence (pads would otherwise shift every real token's position)."""
    rt = gpt2
    row = ids_of(1, 6, seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), row], 1), ids_of(1, 9, seed=6)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    out = rt.generate(batch, 5, attention_mask=mask)
    assert torch.equal(out[0, 9:], rt.generate(row, 5)[0, 6:])
    shifted, _ = rt.prefill(row, torch.arange(6)[None] + 3)  # same tokens at other positions: other logits
    assert (shifted - rt.prefill(row)[0]).abs().max() > 1e-3


def test_generation_stops_at_the_position_limit(gpt2, runtimes):
    """Learned position embeddings end at 512: generation stops there (each fed token needs a position < 512),
    a prompt past it is refused in one line. RoPE models have no such limit."""
    prompt = ids_of(2, 505)
    out = gpt2.generate(prompt, 600, eos_token_id=1000)  # an EOS it never produces
    assert out.shape == (2, 512 + 1)  # positions 0 … 511 fed, the last token predicted at 511
    assert torch.equal(out[:, :508], gpt2.generate(prompt, 3, eos_token_id=1000))
    assert gpt2.position_limit == 512 and runtimes("liger_attention").position_limit is None
    with pytest.raises(UsageError, match="past the model's limit of 512 positions"):
        gpt2.generate(ids_of(1, 513), 4)
    _, state = gpt2.prefill(ids_of(1, 512))
    with pytest.raises(UsageError, match="position 512 is past"):
        gpt2.decode(ids_of(1, 1), state=state)


def test_a_table_read_at_gathered_values_is_no_position_limit():
    """BERT as a decoder looks up its two-row token-type table with values gathered at the positions: its limit is
    the position table's 512 rows, not 2 (it was 2: every decode past the second token was refused)."""
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, is_decoder=True)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    rt = runtime_of(lincompile.convert(model, make_spec(spec_text("softmax"))))
    assert rt.position_limit == 512
    ids = ids_of(1, 12)
    _, state = rt.prefill(ids[:, :6])
    step, _ = rt.decode(ids[:, 6:7], state=state)
    with torch.no_grad():
        assert torch.allclose(step[:, 0], model(ids[:, :7]).logits[:, 6], atol=1e-4)


def test_positions_numbered_from_the_padding_index_are_aligned():
    """RoBERTa numbers its tokens from padding_idx + 1 when given no positions and takes position_ids as they are:
    the runtime's positions are shifted by 2 in its graph, so its logits are the converted model's (they were
    0.6 off), and the limit is the table's rows less the shift."""
    import transformers as tf

    # (vocabulary 32: the runtime's check probe draws the pad id 1, which it must leave out)
    cfg = tf.RobertaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, is_decoder=True, pad_token_id=1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    converted = lincompile.convert(model, make_spec(spec_text("liger_attention", extra="    params: {window: 4}\n")))
    rt = runtime_of(converted)  # checks its logits against the converted model's
    assert rt.position_limit == 38
    positions = next(n for n in rt.graph_module.graph.nodes if n.target == "position_ids")
    assert [short_op(u) for u in positions.users] == ["add"]
    ids = ids_of(2, 12) % 32
    ids[ids == 1] = 5
    _, state = rt.prefill(ids[:, :7])
    step, _ = rt.decode(ids[:, 7:8], state=state)
    with torch.no_grad():
        assert torch.allclose(step[:, 0], converted(ids[:, :8])[:, 7], atol=1e-4)
    with pytest.raises(UsageError, match="past the model's limit of 38 positions"):
        rt.prefill(ids_of(1, 39) % 32)


class _Numbered(nn.Module):
    """A causal LM whose position table is read at `numbering(t)` when given no positions."""

    def __init__(self, numbering):
        super().__init__()
        self.numbering = numbering
        self.config = types.SimpleNamespace(vocab_size=16, pad_token_id=None)
        self.tok, self.pos, self.head = nn.Embedding(16, 8), nn.Embedding(30, 8), nn.Linear(8, 16)

    def forward(self, input_ids, position_ids=None, use_cache=False, attention_mask=None):
        if position_ids is None:
            position_ids = self.numbering(torch.arange(input_ids.shape[1]))[None].expand_as(input_ids)
        return types.SimpleNamespace(logits=self.head(self.tok(input_ids) + self.pos(position_ids)))


@pytest.mark.parametrize("numbering, shift", [(lambda t: t, 0), (lambda t: t + 3, 3), (lambda t: 2 * t, None)])
def test_position_numbering_is_shifted_or_refused(numbering, shift):
    """A constant shift between the model's own numbering and 0, 1, 2 … is added to the positions input, and the
    limit loses it; any other numbering cannot be fed from a state and is refused in one line."""
    from lincompile.errors import LincompileError

    from lincompile.passes.capture import PositionsWrapper

    model = _Numbered(numbering)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    gm = torch.export.export(PositionsWrapper(model), example).module()
    if shift is None:
        with pytest.raises(LincompileError, match=r"numbers its positions itself .*shifts \[0, 1, 2"):
            runtime.align_positions(model, gm)
        return
    assert runtime.align_positions(model, gm) == shift
    gm.recompile()
    assert runtime.position_limit(gm, model.config) == 30 - shift
    ids = torch.tensor([[3, 1, 4, 1]])  # the length exported
    with torch.no_grad():
        assert torch.equal(gm(ids, torch.arange(4)[None]), model(ids).logits)


def test_kept_sliding_layers_decode_with_their_window():
    """Gemma 2's layer 0 slides (window 4), layer 1 is causal. Kept as softmax, the sliding layer decodes with
    the window read off its mask: every decode step gives the full forward's logits, past the window too."""
    spec = make_spec("rules:\n  - {mask: sliding, op: keep}\n  - {op: liger_attention, params: {window: 4, chunk: 8}}\n")
    rt = Runtime.from_model(tiny_model("gemma2"), spec)
    kept = rt.graph_module.get_submodule("ops.model.layers.0.self_attn")
    assert kept.name == "softmax" and kept.window == 4
    ids = ids_of(2, 20)
    want = full_logits(rt, ids)
    assert (decoded_logits(rt, ids, 3) - want).abs().max() < 1e-4
    # Without the window the kept layer would attend to all 20 tokens: a different model.
    kept.window = None
    assert (decoded_logits(rt, ids, 3)[:, -1] - want[:, -1]).abs().max() > 1e-3


def test_kept_chunked_layers_decode_with_their_chunks():
    """Llama 4's RoPE layers attend within chunks (8 tokens here): a query sees the keys of its own chunk up to
    itself. Kept as softmax, they decode with the chunk read off their mask, across chunk boundaries; the NoPE
    layer (causal) is converted."""
    import transformers as tf

    cfg = tf.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=2, num_experts_per_tok=1, no_rope_layers=[1, 0], attention_chunk_size=8)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ids = ids_of(2, 21)
    with torch.no_grad():
        want = model(ids).logits
    identity = Runtime.from_model(model, make_spec(spec_text("softmax")))
    assert identity.graph_module.get_submodule("ops.model.layers.0.self_attn").attention_chunk == 8
    for prompt in (3, 8, 12):
        assert (decoded_logits(identity, ids, prompt) - want).abs().max() < 1e-5, prompt
    spec = make_spec("rules:\n  - {mask: chunked, op: keep}\n"
                     "  - {op: liger_attention, params: {window: 4, chunk: 8}}\n")
    hybrid = Runtime.from_model(model, spec)
    kept = hybrid.graph_module.get_submodule("ops.model.layers.0.self_attn")
    assert kept.name == "softmax" and kept.attention_chunk == 8
    assert hybrid.graph_module.get_submodule("ops.model.layers.1.self_attn").name == "liger_attention"
    full = full_logits(hybrid, ids)
    assert (decoded_logits(hybrid, ids, 5) - full).abs().max() < 1e-4
    kept.attention_chunk = None  # without its chunks the kept layer attends to every earlier token
    assert (decoded_logits(hybrid, ids, 5)[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_two_attention_sites_in_one_module_get_an_operator_each():
    """Differential attention (DiffLlama) computes two softmaxes in each attention module: each site gets its own
    operator and decode state (they shared one operator and repeated state names: decode failed)."""
    from transformers import AutoModelForCausalLM, DiffLlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(DiffLlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()
    ids = ids_of(2, 12)
    with torch.no_grad():
        original = model(ids).logits
    for text in ("rules:\n  - op: keep\n", "rules:\n  - {op: liger_attention, params: {window: 4, chunk: 8}}\n"):
        rt = Runtime.from_model(copy.deepcopy(model), make_spec(text))
        ops = [n for n, m in rt.graph_module.named_modules() if isinstance(m, Operator)]
        assert len(ops) == 4 and "ops.model.layers.0.self_attn_1" in ops, ops
        assert len(set(rt.state_names)) == len(rt.state_names)
        want = full_logits(rt, ids)
        assert (decoded_logits(rt, ids, 5) - want).abs().max() < 1e-4
        if "keep" in text:
            assert (want - original).abs().max() < 1e-4
    # Learned operators: each site's own operator is scored by verify and trained against its own teacher site.
    spec = make_spec(spec_text("lizard", extra="    params: {window: 4, chunk: 8}\n"))
    converted = lincompile.convert(copy.deepcopy(model), spec)
    keys = ["model.layers.0.self_attn", "model.layers.0.self_attn_1", "model.layers.1.self_attn",
            "model.layers.1.self_attn_1"]
    assert sorted(converted.report["site_rel_error"]) == keys
    assert [s.get("key", s["module"]) for s in converted.report["sites"]] == keys
    from lincompile.heal.build import build
    from lincompile.heal.config import TransferConfig
    from lincompile.heal.transfer import transfer_stage

    graphs = build(copy.deepcopy(model), spec)
    stage = transfer_stage(graphs, TransferConfig(steps=1), torch.empty(0, 8, dtype=torch.long))
    assert stage.module.site_names == keys
    assert len({id(m) for m in stage.module.op_list}) == 4  # four operators, not the first of each module twice
    losses = graphs.teacher(ids)
    assert len(losses) == 4 and all(torch.isfinite(x) and x > 0 for x in losses)


def alibi_model(arch):
    from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig

    from test_architectures import _eager_only

    if arch == "bloom16":  # 16 heads: slopes 2^(-h/2), no powers of two
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(BloomConfig(vocab_size=128, hidden_size=64, n_layer=2,
                                                            n_head=16)).eval()
    if arch != "falcon":
        return _eager_only(arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True)).eval()


KEEP_CUSTOM = "capture: {max_seq_len: 256}\nrules:\n  - {mask: custom, op: keep}\n"


@pytest.mark.parametrize("arch", ["bloom", "bloom16", "mpt", "falcon"])
def test_kept_alibi_layers_decode_with_the_slopes_read_off_their_mask(arch):
    """BLOOM, MPT and Falcon fold ALiBi into their masks (`custom`); the slopes are read off the probed mask, and
    kept layers decode with that bias: the model's own logits at every step, and left padding changes nothing."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    model = alibi_model(arch)
    rt = Runtime.from_model(model, make_spec(KEEP_CUSTOM))
    kept = [m for m in rt.graph_module.modules() if isinstance(m, registry.get("softmax"))]
    # BLOOM's and MPT's slopes for 4 heads are 2^-2, 2^-4, …; Falcon adds them before its 1/sqrt(16) scaling
    H = 16 if arch == "bloom16" else 4
    want_slopes = build_alibi_tensor(torch.ones(1, 2), H, torch.float32).view(H, 2)[:, 1]
    if arch == "falcon":
        want_slopes = want_slopes / 4
    assert len(kept) == 2
    for m in kept:
        assert m.alibi_slopes == pytest.approx(want_slopes.tolist(), rel=1e-6, abs=0)
    ids = ids_of(2, 21)
    with torch.no_grad():
        want = model(ids).logits
    assert (decoded_logits(rt, ids, 5) - want).abs().max() < 1e-5
    row, mask = ids[:1, 4:], torch.ones(2, 21, dtype=torch.long)
    mask[0, :4] = 0
    both = rt.generate(torch.cat([torch.cat([torch.full((1, 4), 5), row], 1), ids[1:]]), 4, attention_mask=mask)
    assert torch.equal(both[0, 21:], rt.generate(row, 4)[0, 17:])
    for m in kept:  # without the bias, decoding gives another model
        m.alibi_slopes = [0.0] * H
    assert (decoded_logits(rt, ids, 5)[:, -1] - want[:, -1]).abs().max() > 1e-3


def test_simple_decay_takes_its_decays_from_alibi_slopes():
    """ALiBi weights softmax by exp(−s_h)^(i−j): simple_decay's recency weight with γ_h = exp(−s_h). So converting
    an ALiBi model with it drops nothing (no refusal), its decays are the model's slopes, and it decodes."""
    from lincompile.errors import SpecError

    model = alibi_model("bloom")
    spec = make_spec("capture: {max_seq_len: 256}\nrules:\n  - op: simple_decay\n")
    converted = lincompile.convert(model, spec)
    slopes = torch.tensor([2.0 ** -(2 * h + 2) for h in range(4)])
    for op in converted.operators.values():
        assert torch.equal(op.log_decay, -slopes)
    assert all("ALiBi slopes s_h are the decays" in " ".join(s.notes) for s in converted.sites)
    rt = Runtime.from_model(model, spec)
    ids = ids_of(2, 21)
    assert (decoded_logits(rt, ids, 5) - full_logits(rt, ids)).abs().max() < 1e-5
    # Asked not to (alibi: false: RetNet's decays), it would drop the bias: refused as for other operators.
    with pytest.raises(SpecError, match="simple_decay takes no attention mask.*custom mask"):
        lincompile.convert(model, make_spec("capture: {max_seq_len: 256}\nrules:\n"
                                            "  - {op: simple_decay, params: {alibi: false}}\n"))


def test_outputs_written_before_a_param_existed_load_as_they_were(tmp_path):
    """spec.yaml next to an output records every default of its time: `alibi` (simple_decay's, newer) missing
    means RetNet's decays were in effect, and so they stay; a newer output keeps the slopes."""
    import yaml

    model = alibi_model("bloom")
    slopes = torch.tensor([2.0 ** -(2 * h + 2) for h in range(4)])
    old = lincompile.convert(model, make_spec("capture: {max_seq_len: 256}\nrules:\n"
                                              "  - {op: simple_decay, mask: custom, params: {alibi: false}}\n"))
    old.save(tmp_path / "old")
    spec_file = tmp_path / "old" / "spec.yaml"
    data = yaml.safe_load(spec_file.read_text())
    del data["rules"][0]["params"]["alibi"]  # as written before the param existed
    spec_file.write_text(yaml.safe_dump(data))
    retnet = next(iter(old.operators.values())).log_decay
    assert not torch.allclose(retnet, -slopes)
    for op in lincompile.load(tmp_path / "old").operators.values():
        assert torch.equal(op.log_decay, retnet)
    lincompile.convert(model, make_spec("capture: {max_seq_len: 256}\nrules:\n  - op: simple_decay\n")).save(
        tmp_path / "new")
    for op in lincompile.load(tmp_path / "new").operators.values():
        assert torch.equal(op.log_decay, -slopes)


def test_a_kept_layer_with_a_bias_mask_is_refused_in_one_line(monkeypatch):
    """A kept layer whose mask carries a bias other than ALiBi converts exactly, but the decode step rebuilds only
    causal, sliding, chunked and ALiBi masks: generation says so instead of decoding without the bias."""
    from lincompile.passes import match

    monkeypatch.setattr(match, "alibi_slopes", lambda mask: None)  # as for any other bias
    with pytest.raises(UsageError, match="mask is custom .* cannot be generated from or exported yet"):
        Runtime.from_model(alibi_model("falcon"), make_spec(KEEP_CUSTOM))


# --------------------------------------------------------------------------------------------------
# The API around it


def test_hf_style_call_and_padding_mask(runtimes):
    rt = runtimes("liger_attention")
    ids = ids_of(2, 9)
    out = rt(ids, labels=ids)
    assert out.logits.shape == (2, 9, 128) and torch.isfinite(out.loss)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)], 1)
    assert (rt(padded, attention_mask=mask).logits[:, 3:] - out.logits).abs().max() < 1e-4


def test_sampling_is_seeded_and_respects_top_k(runtimes):
    rt = runtimes("liger_attention")
    prompt = ids_of(1, 4)
    a = rt.generate(prompt, 12, do_sample=True, top_k=3, top_p=0.9, temperature=0.7,
                    generator=torch.Generator().manual_seed(7))
    b = rt.generate(prompt, 12, do_sample=True, top_k=3, top_p=0.9, temperature=0.7,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # top_k=1 is greedy.
    assert torch.equal(rt.generate(prompt, 12, do_sample=True, top_k=1), rt.generate(prompt, 12))


def test_eos_stops_and_pads_and_streams(runtimes):
    rt = runtimes("liger_attention")
    prompt = ids_of(2, 4)
    greedy = rt.generate(prompt, 10)
    eos = int(greedy[0, 6])  # row 0's third new token
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append(None)

    out = rt.generate(prompt, 10, eos_token_id=eos, pad_token_id=0, streamer=Streamer())
    first = (out[0, 4:] == eos).nonzero()[0, 0]
    assert torch.equal(out[0, 4:5 + first], greedy[0, 4:5 + first]) and (out[0, 5 + first:] == 0).all()
    assert torch.equal(seen[0], prompt) and seen[-1] is None and len(seen) == out.shape[1] - 4 + 2


def test_bad_inputs_are_one_line_errors(runtimes):
    rt = runtimes("liger_attention")
    with pytest.raises(UsageError, match="the prompt is empty"):
        rt.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(UsageError, match="decode needs a state"):
        rt.decode(ids_of(1, 1))
    with pytest.raises(UsageError, match=r"shape \[batch, 1\]"):
        rt.decode(ids_of(1, 2), state=rt.init_state(1))
    with pytest.raises(UsageError, match="state does not fit"):
        rt.prefill(ids_of(1, 3), state={"seen": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(UsageError, match="only left padding"):
        positions_from_mask(torch.tensor([[1, 1, 0]]))


def test_converted_model_generate_shares_weights():
    converted = lincompile.convert(tiny_model("llama"), spec_for("lolcats"))
    prompt = ids_of(1, 6)
    first = converted.generate(prompt, 8)
    rt = runtime_of(converted)
    assert rt.graph_module.lm.model.embed_tokens.weight is converted.graph_module.lm.model.embed_tokens.weight
    with torch.no_grad():  # train the converted model a little: the runtime follows
        for p in converted.operators["model.layers.0.self_attn"].parameters():
            p.add_(1.0)
    assert (rt(prompt).logits - converted(prompt)).abs().max() < 1e-4
    assert first.shape == (1, 14)


class NoDecode(Operator):
    """An operator with only the forms conversion needs (no init_state, no step)."""

    name = "no_decode"

    def chunked(self, q, k, v, state=None):
        return v, None


def test_an_operator_without_decode_forms_is_named(captured, monkeypatch):
    op = NoDecode(num_heads=4, num_kv_heads=4, head_dim=16)
    with pytest.raises(NotImplementedError, match=r'NoDecode \(op "no_decode"\) does not implement step\(\): '
                                                  "generate and export"):
        op.step({}, q=None)
    # The user-reported case: the example operator, which has none of the decode forms.
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    spec = make_spec("name: custom\nrules:\n  - op: my_ops:TemperedSoftmax\n")
    with pytest.raises(UsageError, match=r"TemperedSoftmax .* does not implement init_state\(\): generate and "
                                         r"export decode token by token, with init_state\(\) and step\(\)"):
        Runtime.from_captured(copy.deepcopy(captured), spec, allow_code=True)


# --------------------------------------------------------------------------------------------------
# Command line and .pt2


def tiny_tokenizer():
    """A word-level tokenizer (w0 … w127, EOS w2) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w2")
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w3"
    return tok


def tiny_dir(path):
    """A tiny Llama with `tiny_tokenizer`, saved like a hub model."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.output


def test_cli_generate_export_and_reload_in_a_fresh_process(tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, _, output = run("apply", "liger-attention", tiny_dir(tmp_path / "model"), "-o", out)
    assert code == 0, output
    # Load OUT once (capture is the slow part); the commands below reuse it.
    rt = lincompile.runtime.load(out)
    monkeypatch.setattr(lincompile.runtime, "load", lambda *a, **k: rt)
    code, stdout, output = run("generate", out, "w5 w6 w7", "--max-new-tokens", 6, "--json")
    assert code == 0, output
    result = json.loads(stdout)
    assert result["prompt_tokens"] == 3 and 1 <= result["new_tokens"] <= 6 and result["text"].startswith("w")
    code, stdout, output = run("generate", out, "w5 w6 w7", "--chat", "--max-new-tokens", 6)
    assert code == 0, output
    assert stdout.strip().startswith("w") and "tok/s" in output  # streamed text on stdout, stats on stderr

    pt2 = tmp_path / "model.pt2"
    code, stdout, output = run("export", out, "-o", pt2)
    assert code == 0 and "logits identical" in stdout, output
    # Both programs' weights are stored once: the payloads hold about the converted model's tensors, not twice.
    with zipfile.ZipFile(pt2) as archive:
        payload = sum(i.file_size for i in archive.infolist() if "/data/weights/weight_" in i.filename)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in rt.graph_module.state_dict().values()}
    assert payload < 1.1 * sum(unique.values()), (payload, sum(unique.values()))
    code, _, output = run("export", out, "-o", pt2)
    assert code == 2 and "already exists" in output
    # The reloaded programs equal the runtime (checked by `export` above); a fresh process gets the same.
    ids = ids_of(2, 9)
    ex = load_exported(pt2)
    assert ex.position_limit is None  # RoPE: no position table
    with torch.no_grad():
        want, *state = ex.prefill(ids, torch.arange(9).expand(2, 9), *ex.init_state(2))
        want_step = ex.decode(ids[:, :1], state[0][:, None], *state)[0]
    torch.save({"ids": ids, "prefill": want, "decode": want_step}, tmp_path / "want.pt")
    script = (
        f"import torch, lincompile.runtime as r\ntorch.set_num_threads({torch.get_num_threads()})\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        f"prefill = torch.export.load({str(pt2)!r}).module()\n"  # plain torch.export.load: the prefill program
        f"ex = r.load_exported({str(pt2)!r})\n"
        "ids = want['ids']\n"
        "logits, *state = prefill(ids, torch.arange(9).expand(2, 9), *ex.init_state(2))\n"
        "step = ex.decode(ids[:, :1], state[0][:, None], *state)[0]\n"
        "assert torch.equal(logits, want['prefill']) and torch.equal(step, want['decode'])\n"
        "print('identical')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "identical" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("case", ["lizard", "lolcats"])
def test_export_operators_with_their_own_parameters(runtimes, tmp_path, case):
    """Operators with parameters of their own (feature maps, gates, sinks) export, and the reloaded programs,
    rebuilding the operators from the JSON the programs hold (not from this process's cache), give the
    runtime's logits."""
    rt = runtimes(case)
    pt2 = rt.export(tmp_path / "model.pt2")
    ex = load_exported(pt2)
    keys = [n.args[0] for n in ex.prefill_program.graph.nodes if "lifted_op" in str(n.target)]
    assert len(keys) == 2 and json.loads(keys[0])["op"] == case
    lift_state._SKELETONS.clear()  # as in a fresh process
    ids = ids_of(2, 9)
    with torch.no_grad():
        want, state = rt.prefill(ids)
        got, *flat = ex.prefill(ids, torch.arange(9).expand(2, 9), *ex.init_state(2))
        step_want, _ = rt.decode(ids[:, :1], state=state)
        step_got = ex.decode(ids[:, :1], flat[0][:, None], *flat)[0]
    assert torch.equal(want, got) and torch.equal(step_want, step_got)


def test_exported_user_operators_are_not_imported_by_the_program():
    key = json.dumps({"format": lift_state.KEY_FORMAT, "op": "not_imported_module:Op"})
    with pytest.raises(UsageError, match="import not_imported_module before running it"):
        lift_state.rebuild(key)
    with pytest.raises(lincompile.errors.LincompileError, match="another version of lincompile"):
        lift_state.rebuild("gASVAAAA")  # a format 1 key: a pickle, never loaded


def test_a_crafted_program_key_calls_nothing_but_operators(runtimes, capsys):
    """A .pt2's keys are data from the file: they may only name Operator classes, torch dtypes, and attributes the
    rebuilt operator holds as plain data."""
    rt = runtimes("lizard")
    op = rt.graph_module.get_submodule(f"ops.{rt.sites[0].module}")
    good = lift_state.describe(op, rt.sites[0].entries, "prefill", (4, 16, torch.float32), [])
    lift_state.rebuild(json.dumps(good))  # the genuine description rebuilds
    for change, needle in (({"op": "builtins:print", "args": ["CALLED"], "kwargs": {}}, "not a lincompile Operator"),
                           ({"op": "os:system", "args": ["true"], "kwargs": {}}, "not a lincompile Operator"),
                           ({"attrs": {"": {"forward": 1}}}, "does not hold as plain data"),
                           ({"out_spec": [4, 16, "nn"]}, "not a torch dtype")):
        with pytest.raises(lincompile.errors.LincompileError, match=needle):
            lift_state.rebuild(json.dumps({**good, **change}))
    assert "CALLED" not in capsys.readouterr().out


def test_cli_generate_refuses_empty_prompts_and_sampling_options_without_sample(runtimes, gpt2, monkeypatch):
    code, _, output = run("generate", "no-such-dir", "w5", "--top-k", 3, "--temperature", 0.5)
    assert code == 2 and "--temperature, --top-k only apply with --sample" in output
    code, _, output = run("generate", "no-such-dir", "w5", "--seed", 1)
    assert code == 2 and "--seed only applies with --sample" in output
    rt = runtimes("liger_attention")
    monkeypatch.setattr(rt, "tokenizer", tiny_tokenizer())
    monkeypatch.setattr(lincompile.runtime, "load", lambda *a, **k: rt)
    code, _, output = run("generate", "out", "", "--max-new-tokens", 3)
    assert code == 2 and "error: the prompt is empty" in output
    code, stdout, output = run("generate", "out", "w5", "--max-new-tokens", 3, "--sample", "--top-k", 3, "--json")
    assert code == 0 and json.loads(stdout)["position_limit"] is None, output
    # PROMPT "-" reads standard input: the same tokens as the prompt given as an argument
    result = CliRunner().invoke(main, ["generate", "out", "-", "--max-new-tokens", "3", "--json"], input="w5\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "w5"
    # Past GPT-2's 512 positions: a clean stop, with the reason.
    monkeypatch.setattr(gpt2, "tokenizer", tiny_tokenizer())
    monkeypatch.setattr(gpt2, "generation_config", types.SimpleNamespace(eos_token_id=1000))
    monkeypatch.setattr(lincompile.runtime, "load", lambda *a, **k: gpt2)
    prompt = " ".join(f"w{30 + i % 70}" for i in range(505))  # one token each (w20 … w29 are "w2" "0")
    code, stdout, output = run("generate", "out", prompt, "--max-new-tokens", 600, "--json")
    assert code == 0, output
    result = json.loads(stdout)
    assert result["finish_reason"] == "position_limit" and result["new_tokens"] == 8
    assert "limit of 512 positions" in output
    code, _, output = run("generate", "out", prompt + " w1" * 8, "--max-new-tokens", 4)
    assert code == 2 and "past the model's limit of 512 positions" in output


def test_share_weights_stores_each_parameter_once_and_keeps_aliasing(tmp_path):
    """Two programs over the same parameters: one payload each in the shared archive, tied weights still tied,
    equal-valued but distinct parameters still apart, and both programs compute what they did."""
    from torch.export.pt2_archive._package import load_pt2, package_pt2

    class Prefill(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
            self.head.weight = self.emb.weight  # tied, as in SmolLM2
            self.n1, self.n2 = nn.Parameter(torch.ones(32)), nn.Parameter(torch.ones(32))  # equal values

        def forward(self, x):
            return self.head(self.emb(x) * self.n1 * self.n2)

    class Decode(Prefill):
        def forward(self, x):
            return self.head(self.emb(x) * self.n1 + self.n2)

    prefill = Prefill()
    decode = Decode()
    decode.load_state_dict(prefill.state_dict())
    x = torch.tensor([[1, 2, 3]])
    programs = {"model": torch.export.export(prefill, (x,)), "decode": torch.export.export(decode, (x,))}
    separate, shared = tmp_path / "separate.pt2", tmp_path / "shared.pt2"
    package_pt2(str(separate), exported_programs=programs)
    dropped = runtime.share_weights(separate, shared)
    assert dropped["model"] == {} and len(dropped["decode"]) == 3  # emb/head (one storage), n1, n2
    table = 64 * 32 * 4
    assert separate.stat().st_size - shared.stat().st_size > 0.9 * table
    loaded = load_pt2(str(shared)).exported_programs
    for name, program in loaded.items():
        state = program.state_dict
        assert state["emb.weight"].data_ptr() == state["head.weight"].data_ptr()
        assert state["n1"].data_ptr() != state["n2"].data_ptr()
        assert torch.equal(program.module()(x), programs[name].module()(x))
    # Each program still loads its own tensors (nothing shared between the two at run time).
    assert loaded["model"].state_dict["n1"].data_ptr() != loaded["decode"].state_dict["n1"].data_ptr()


def test_load_exported_rejects_other_files(tmp_path):
    pt2 = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),)), pt2)
    with pytest.raises(UsageError, match="not written by `lincompile export`"):
        load_exported(pt2)
