"""Gradient checkpointing of captured graphs (lincompile/heal/remat.py), and the LoRA dropout pass it relies on:
the same loss and gradients with fewer tensors kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from lincompile.graph import module_path
from lincompile.heal.build import build
from lincompile.heal.remat import checkpoint_layers, layer_regions

from conftest import make_spec, spec_text, tiny_model

SPEC = spec_text("lizard", extra="    params: {window: 4, chunk: 8}\n")


def lora(targets, dropout=0.1):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, bias="none")


def linear_names(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and "lm_head" not in n})


def step(gm, params, ids, seed=1):
    """Loss, gradients and the bytes autograd keeps for backward (what checkpointing is for): saved tensors, the
    inputs a checkpointed layer keeps among them, each storage once, and not the weights, which are there anyway.
    (Operators keep their inputs as saved tensors too: kernels/opaque.py.)"""
    for p in params.values():
        p.grad = None
    weights = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers(), *params.values()]}
    kept, seen = [0], set()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights | seen:
            seen.add(storage.data_ptr())
            kept[0] += storage.nbytes()
        return t

    torch.manual_seed(seed)  # LoRA dropout draws its masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gm(ids)
        # the teacher graph returns one MSE per site; the converted graph, logits
        loss = torch.stack(list(out)).sum() if isinstance(out, tuple) else out.float().logsumexp(-1).mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}, kept[0]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_checkpointed_layers_give_the_same_loss_and_gradients(arch):
    model = tiny_model(arch)
    graphs = build(copy.deepcopy(model), make_spec(SPEC), lora_config=lora(linear_names(model)), with_teacher=False)
    gm = graphs.converted.graph_module
    for m in graphs.lora_dropouts:
        m.train()
    params = {**graphs.lora_parameters(), **graphs.op_parameters()}
    with torch.no_grad():  # LoRA B starts at zero: give every LoRA weight a gradient path of its own
        for name, p in graphs.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    for p in params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads, kept = step(gm, params, ids)
    state = {k: v for k, v in gm.state_dict().items()}

    assert checkpoint_layers(gm) == [0, 1]
    after = gm.state_dict()  # the same tensors under the same names, none twice
    assert list(after) == list(state) and all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls if n.target.startswith("remat_layer_")] == ["remat_layer_0", "remat_layer_1"]
    # Everything of a layer is inside its call: its operator and its LoRA dropout modules.
    assert not [n for n in calls if n.target.startswith(("ops.", "lora_dropout."))]
    for layer in (0, 1):
        body = getattr(gm, f"remat_layer_{layer}").body
        inner = [n.target for n in body.graph.nodes if n.op == "call_module"]
        assert f"ops.{'gpt_neox' if arch == 'gpt_neox' else 'model'}.layers.{layer}." in " ".join(inner) + " "
        assert sum(t.startswith("lora_dropout.") for t in inner) == (4 if arch == "gpt_neox" else 7)
        assert all(body.get_submodule(t) is gm.get_submodule(t) for t in inner)  # shared, not copied

    loss2, grads2, kept2 = step(gm, params, ids)
    assert loss2 == loss
    for k in grads:
        assert torch.allclose(grads2[k], grads[k], rtol=1e-5, atol=1e-7), k
    assert kept2 < 0.25 * kept, (kept2, kept)  # about 7 %: each layer keeps only its inputs
    with torch.no_grad():  # evaluation runs the layers plainly
        assert torch.isfinite(gm(ids)).all()


def test_the_attention_transfer_graph_is_checkpointed_too():
    graphs = build(tiny_model("llama"), make_spec(SPEC), with_teacher=True)
    params = graphs.op_parameters()
    for p in params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads, kept = step(graphs.teacher, params, ids)
    assert checkpoint_layers(graphs.teacher) == [0, 1]
    loss2, grads2, kept2 = step(graphs.teacher, params, ids)
    assert loss2 == pytest.approx(loss, rel=1e-6) and kept2 < 0.25 * kept
    assert all(torch.allclose(grads2[k], grads[k], rtol=1e-5, atol=1e-8) for k in grads)


def test_a_graph_without_layers_is_left_alone():
    class Flat(nn.Module):  # module paths without a number
        def __init__(self):
            super().__init__()
            self.proj, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.proj(x))

    gm = fx.symbolic_trace(Flat())
    before = gm.code
    assert layer_regions(gm.graph) == {} and checkpoint_layers(gm) == [] and gm.code == before


def test_a_layer_a_value_leaves_and_reenters_is_not_outlined():
    # layer 0 -> a node of layer 1 -> layer 0 again: layer 0 cannot be one call, layer 1 can.
    graph = fx.Graph()
    x = graph.placeholder("x")
    a, b, c = (graph.call_function(torch.relu, (v,)) for v in (x, x, x))
    b.args = (a,)
    c.args = (b,)
    graph.output(graph.call_function(torch.neg, (c,)))
    for node, path in ((a, "layers.0.x"), (b, "layers.1.y"), (c, "layers.0.z")):
        node.meta["nn_module_stack"] = {"k": ("lm." + path, "M")}
    assert [module_path(n) for n in (a, b, c)] == ["layers.0.x", "layers.1.y", "layers.0.z"]
    assert list(layer_regions(graph)) == [1]


def test_two_layers_that_feed_each_other_leave_one_inline():
    # Each layer alone could be one call, but a0 -> b1 and b0 -> a1 make the two calls a cycle.
    graph = fx.Graph()
    x = graph.placeholder("x")
    a0 = graph.call_function(torch.sin, (x,))
    b0 = graph.call_function(torch.cos, (x,))
    a1 = graph.call_function(torch.add, (a0, b0))
    b1 = graph.call_function(torch.mul, (b0, a0))
    graph.output(graph.call_function(torch.sub, (a1, b1)))
    for node, path in ((a0, "layers.0.a"), (b0, "layers.1.b"), (a1, "layers.0.c"), (b1, "layers.1.d")):
        node.meta["nn_module_stack"] = {"k": ("lm." + path, "M")}
    gm = fx.GraphModule(nn.Module(), graph)
    v = torch.randn(5)
    want = gm(v)
    assert sorted(layer_regions(gm.graph)) == [0, 1]
    assert checkpoint_layers(gm) == [0]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["remat_layer_0"]
    assert torch.equal(gm(v), want)


def test_lora_dropout_replaces_only_the_dropout_before_lora_a():
    """GPT-NeoX's embedding dropout reaches layer 0's lora_A through a layer norm: it once got that dropout's
    name, and the module registered second under it replaced the first (LoRA's p on the embeddings)."""
    model = tiny_model("gpt_neox")
    graphs = build(model, make_spec(SPEC), lora_config=lora(["query_key_value", "dense"]), with_teacher=False)
    gm = graphs.converted.graph_module
    inserted = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("lora_dropout.")]
    assert len(inserted) == len(graphs.lora_dropouts) == 4 and len({n.target for n in inserted}) == 4
    assert all(".lora_dropout." in module_path(n) for n in inserted)
    kept = [module_path(n) for n in gm.graph.nodes if n.op == "call_function" and "dropout" in str(n.target)]
    assert "gpt_neox.emb_dropout" in kept


def test_opaque_operators_hold_their_inputs_only_as_saved_tensors():
    """Checkpointing frees what autograd saves; a tensor an op kept on its ctx would outlive it (and hooks)."""
    import weakref

    from lincompile.kernels.opaque import gla_chunked

    leaves = [torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3)]
    g = -torch.rand(1, 2, 8, 4)
    copies = []

    def pack(t):  # keep a copy, not the tensor: the original is free unless something else holds it
        copies.append(t.detach().clone())
        return len(copies) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: copies[i]):
        q, k, v = (x * 1.0 for x in leaves)
        refs = [weakref.ref(t) for t in (q, k, v)]
        o, _ = gla_chunked(q, k, v, g, scale=0.5, chunk=4)
        del q, k, v
    assert all(r() is None for r in refs)
    o.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
