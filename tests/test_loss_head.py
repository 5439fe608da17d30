"""The LM head and its loss a chunk of tokens at a time (lincompile/heal/head.py), part of gradient checkpointing:
the same loss and gradients as on the whole logits, without keeping logits for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lincompile.heal.head as head_mod
from lincompile.heal.build import build
from lincompile.heal.finetune import LMLoss
from lincompile.heal.head import chunked_lm_loss, find_head, lm_head, outline_head
from lincompile.heal.remat import checkpoint_layers

from conftest import make_spec, spec_text, tiny_model

SPEC = spec_text("liger_gla")
VOCAB = 128


def lora(targets, conv1d=False):
    from peft import LoraConfig

    # dropout 0: a LoRA on the head draws its dropout masks chunk by chunk (same distribution, other draws)
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none", fan_in_fan_out=conv1d)


def healing_graphs(arch, on_head):
    model = tiny_model(arch)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in ("q_proj", "v_proj", "query_key_value", "c_attn") if t in names]
    lora_config = lora(targets + ["lm_head"] * on_head, conv1d=arch == "gpt2")  # GPT-2's c_attn is a Conv1D
    graphs = build(model, make_spec(SPEC), lora_config=lora_config, with_teacher=False)
    with torch.no_grad():  # LoRA B starts at zero: give every LoRA weight a gradient path of its own
        for name, p in graphs.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    params = graphs.lora_parameters()
    for p in params.values():
        p.requires_grad_(True)
    return graphs, params


def loss_and_grads(graphs, params, ids, distill):
    loss = LMLoss(graphs, distill_weight=distill, temperature=2.0).train()(ids)
    return loss.detach(), torch.autograd.grad(loss, list(params.values()))


def kept_storages(graphs, ids):
    """Shapes of the storages autograd keeps for backward after the loss's forward (weights not counted)."""
    gm = graphs.converted.graph_module
    weights = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LMLoss(graphs).train()(ids)
    return kept


@pytest.mark.parametrize("arch,on_head", [("llama", True), ("gemma2", False), ("gpt2", False), ("qwen3", True)])
def test_the_chunked_loss_equals_the_loss_on_the_whole_logits(arch, on_head, monkeypatch):
    graphs, params = healing_graphs(arch, on_head)
    gm = graphs.converted.graph_module
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    expected = {w: loss_and_grads(graphs, params, ids, w) for w in (0.0, 0.5)}
    with torch.no_grad():
        logits = gm(ids)
    state = gm.state_dict()

    checkpoint_layers(gm)
    head, what = outline_head(gm)
    assert head is not None, what
    # The head's ops (Gemma 2's final softcap; the head's own LoRA) and nothing else of the model.
    ops = what.split(" → ")
    assert ops[0] == "linear" and ("tanh" in ops) == (arch == "gemma2") and ("add" in ops) == on_head
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and "loss_head" in n.target] == ["loss_head"]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
                and n.meta["val"].shape[-1] == VOCAB]  # the vocabulary projection is in the head only
    after = gm.state_dict()  # the same tensors, none twice
    assert list(after) == list(state) and all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    with torch.no_grad():  # outside the loss, the graph still returns the logits
        assert torch.equal(gm(ids), logits)

    graphs.loss_head = head
    # 36 targets in chunks of 5 tokens: 8 chunks, the last one short
    monkeypatch.setattr(head_mod, "CHUNK_ELEMENTS", 2 * VOCAB * 5)
    for w, (loss, grads) in expected.items():
        got, got_grads = loss_and_grads(graphs, params, ids, w)
        assert torch.allclose(got, loss, rtol=1e-6, atol=0), (w, float(got), float(loss))
        for g, e in zip(got_grads, grads):
            assert float((g - e).norm() / e.norm()) < 1e-5


def test_no_logits_are_kept_for_backward():
    graphs, _ = healing_graphs("llama", on_head=False)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    logits_bytes = 2 * 39 * VOCAB * 4
    plain = kept_storages(graphs, ids)
    assert any(b >= logits_bytes for b in plain.values())  # the log-probabilities cross-entropy keeps

    checkpoint_layers(graphs.converted.graph_module)
    graphs.loss_head, _ = outline_head(graphs.converted.graph_module)
    chunked = kept_storages(graphs, ids)
    assert max(chunked.values()) <= 2 * 40 * 64 * 4  # the hidden states ([2, 40, 64] fp32), as a layer's inputs
    assert sum(chunked.values()) < sum(plain.values()) - logits_bytes


def test_chunks_cover_every_token_once():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 7)

    head = Head()
    hidden, targets = torch.randn(3, 11, 4, requires_grad=True), torch.randint(0, 7, (3, 11))
    teacher = torch.randn(3, 11, 7)
    logits = head.body(hidden)
    ce = nn.functional.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
    kl = nn.functional.kl_div(torch.log_softmax(logits / 3, -1).reshape(-1, 7),
                              torch.log_softmax(teacher / 3, -1).reshape(-1, 7), log_target=True,
                              reduction="batchmean") * 9
    for chunk in (1, 4, 11, 50):
        got_ce, got_kl = chunked_lm_loss(head, hidden, targets, teacher, temperature=3.0, chunk=chunk)
        assert torch.allclose(got_ce, ce, rtol=1e-6) and torch.allclose(got_kl, kl, rtol=1e-5), chunk
        assert chunked_lm_loss(head, hidden, targets, chunk=chunk)[1] is None


class Positional(nn.Module):
    """A toy LM whose logits mix tokens after the vocabulary projection."""

    def __init__(self, tail):
        super().__init__()
        self.emb, self.proj, self.tail = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB), tail

    def forward(self, ids):
        return self.tail(self.proj(self.emb(ids)))


def exported(tail):
    ids = torch.randint(0, VOCAB, (2, 6))
    return torch.export.export(Positional(tail), (ids,), strict=False).module()


@pytest.mark.parametrize("tail,why", [
    (lambda x: x + x.cumsum(1), "also reads cumsum"),  # a running sum over the tokens
    (lambda x: x.softmax(1), "no vocabulary projection"),  # normalised over the tokens
    (lambda x: (x, x), "not one [batch, tokens, vocab] tensor"),
])
def test_a_head_that_mixes_tokens_is_not_chunked(tail, why):
    gm = exported(tail)
    before = [n.format_node() for n in gm.graph.nodes]
    head, reason = outline_head(gm)
    assert head is None and why in reason, reason
    assert [n.format_node() for n in gm.graph.nodes] == before
    assert lm_head(gm) is None and gm.meta["no_loss_head"] == reason  # evaluation scores the logits by chunks


def test_a_token_wise_tail_is_part_of_the_head():
    gm = exported(lambda x: torch.tanh(x / 3.0) * 3.0)
    hidden, members, out = find_head(gm.graph)
    assert [m.target.__name__.split(".")[0] for m in members if "assert" not in str(m.target)] == \
        ["linear", "div", "tanh", "mul"]
    ids = torch.randint(0, VOCAB, (2, 6))
    expected = gm(ids)
    head, _ = outline_head(gm)
    assert torch.equal(gm(ids), expected)
    with head.returning_hidden():
        assert gm(ids).shape == (2, 6, 8)


class Scaled(Positional):
    def __init__(self):
        super().__init__(lambda x: x)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, ids):
        return self.proj(self.emb(ids)) * self.scale.exp() / torch.tensor(3.0)  # constants the graph computes


def test_constants_the_head_computes_go_with_it():
    ids = torch.randint(0, VOCAB, (2, 6))
    gm = torch.export.export(Scaled(), (ids,), strict=False).module()
    expected = gm(ids)
    head, what = outline_head(gm)
    assert head is not None and what == "linear → mul → div", what
    assert torch.equal(gm(ids), expected)
    with head.returning_hidden():
        hidden = gm(ids)
    assert torch.equal(head.body(hidden), expected)
    # nothing of the head is left in the graph, the constants it computed included
    assert [str(n.target).split(".")[-2] for n in gm.graph.nodes if n.op == "call_function"
            and "assert" not in str(n.target)] == ["embedding"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_evaluation_scores_a_chunk_of_tokens_at_a_time(arch, monkeypatch):
    from lincompile.heal.evaluate import block_metrics
    from lincompile.heal.head import LossHead
    from lincompile.pipeline import convert

    model = convert(tiny_model(arch), make_spec(SPEC), verify=False)
    blocks = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(blocks)[:, :-1].float()
    targets = blocks[:, 1:]
    nll = float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))
    acc = int((logits.argmax(-1) == targets).sum()) / targets.numel()

    monkeypatch.setattr(head_mod, "CHUNK_ELEMENTS", 2 * VOCAB * 5)  # windows of 23 targets: 5 chunks each
    for forward in (model, lambda ids: model(ids)):  # the head by chunks; the logits by chunks
        got = block_metrics(forward, blocks, batch_size=2)
        assert got["tokens"] == 3 * 23 and got["acc"] == pytest.approx(acc, abs=1e-12)
        assert got["loss"] == pytest.approx(nll, rel=1e-6)
    assert sum(isinstance(m, LossHead) for m in model.graph_module.children()) == 1  # outlined once
    with torch.no_grad():
        assert torch.equal(model(blocks)[:, :-1].float(), logits)  # and the model still returns logits
