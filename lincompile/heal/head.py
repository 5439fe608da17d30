"""The LM head and its loss, a chunk of tokens at a time (part of `heal.lora.gradient_checkpointing`).

With the layers checkpointed, what is left of a training step's memory is mostly the head: logits
[B, T, vocab] in fp32, the log-softmax cross-entropy keeps for backward, and their gradients, each
B·T·vocab·4 bytes (SmolLM2 at 2,048 tokens: 400 MB each; a 256k vocabulary at 4,096 tokens: 4 GB each).

The head is found in the captured graph, not by name: the ops from the vocabulary projection to the graph's
output (a final softcap, a logit scale, casts, a LoRA on the head), which must all be token-wise, so that
running them on a slice of the tokens gives that slice of the logits. They are outlined into one call,
`LossHead`; while the loss runs, the graph returns the hidden states instead, and the loss applies the head
to one chunk of tokens at a time, each chunk under `torch.utils.checkpoint`. Backward then holds only the
hidden states, and one chunk's logits at a time are ever in memory (distillation's teacher logits, computed
without gradients by the original model, are still whole). The loss is the same sum, regrouped.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..graph import short_op, val
from ..walk import CASTS

# Ops that act on each token alone, as long as whatever else they take is a constant scalar or a vector along
# the last axis (a bias, a scale): chunking along the tokens then commutes with them.
TOKENWISE = ("linear", "mul", "div", "add", "sub", "tanh", "neg", "sigmoid", "dropout") + CASTS
CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32), whatever the batch and vocabulary


class LossHead(nn.Module):
    """The graph's head (hidden states -> logits), outlined. `returning_hidden()` makes the graph stop before it."""

    def __init__(self, body: fx.GraphModule, ops: list[str]):
        super().__init__()
        # Not registered (as remat's layer bodies): the modules and weights it calls are the graph's own.
        self.__dict__["body"] = body
        self.ops = ops  # what the head does, for the log
        self.deferred = False

    def describe(self) -> str:
        return " → ".join(dict.fromkeys(self.ops))

    @property
    def vocab(self) -> int:
        return int(val(_outputs(self.body.graph)[0]).shape[-1])

    def forward(self, hidden):
        return hidden if self.deferred else self.body(hidden)

    @contextmanager
    def returning_hidden(self):
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False


def outline_head(gm: fx.GraphModule) -> tuple[LossHead | None, str]:
    """Outline the head of `gm` into a `LossHead` call, in place: (the head, what it does), or (None, why not;
    `gm` unchanged)."""
    found = find_head(gm.graph)
    if isinstance(found, str):
        return None, found
    hidden, members, out = found
    graph, env, constants = fx.Graph(), {}, _constant_inputs(members, _varying(gm.graph))
    env[hidden] = graph.placeholder("hidden")
    env[hidden].meta.update(hidden.meta)
    for n in constants:
        env[n] = graph.node_copy(n, lambda a: env[a])
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    ops = [short_op(n) if n.op == "call_function" else "dropout" for n in members
           if short_op(n) not in ("_assert_tensor_metadata",) + CASTS]
    head = LossHead(fx.GraphModule(gm, graph, class_name="HeadBody"), ops)
    name, k = "loss_head", 1
    while hasattr(gm, name):
        name, k = f"loss_head_{k}", k + 1
    gm.add_module(name, head)
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(name, (hidden,))
    call.meta.update(out.meta)
    out.replace_all_uses_with(call)
    for n in reversed(members):
        gm.graph.erase_node(n)
    for n in reversed(constants):  # weights and constants only the head used (a tied embedding stays)
        if not n.users:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return head, head.describe()


def lm_head(gm: fx.GraphModule) -> LossHead | None:
    """The graph's outlined head, outlined on first use; None when the graph has none that runs by chunks."""
    for m in gm.children():
        if isinstance(m, LossHead):
            return m
    if "no_loss_head" not in gm.meta:
        try:
            head, why = outline_head(gm)
        except Exception as e:  # a head form not foreseen: score the whole logits rather than fail (the body is
            head, why = None, f"its head could not be outlined ({type(e).__name__}: {e})"  # built before gm changes)
        if head is not None:
            return head
        gm.meta["no_loss_head"] = why  # the graph will not change: don't search again
    return None


def find_head(graph: fx.Graph) -> tuple[fx.Node, list[fx.Node], fx.Node] | str:
    """(hidden states, the head's nodes in graph order, the logits node), or why the graph has no head that can run
    a chunk of tokens at a time."""
    outputs = _outputs(graph)
    if len(outputs) != 1 or val(outputs[0]) is None or val(outputs[0]).dim() != 3:
        return "the graph's output is not one [batch, tokens, vocab] tensor"
    out = outputs[0]
    varying = _varying(graph)
    # Back from the logits through token-wise ops: the vocabulary projection is the largest linear among them.
    reached, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n in reached or not _tokenwise(n, varying):
            continue
        reached.add(n)
        todo.extend(a for a in n.all_input_nodes if a in varying)
    projections = [n for n in reached if short_op(n) == "linear" and val(n.args[1]) is not None
                   and val(n.args[1]).dim() == 2 and val(n.args[0]) is not None and val(n.args[0]).dim() == 3]
    vocab = val(out).shape[-1]
    projections = [n for n in projections if str(val(n).shape[-1]) == str(vocab)]
    if not projections:
        return "no vocabulary projection (a linear to the logits through token-wise ops only) ends the graph"
    hidden = max(projections, key=lambda n: val(n.args[1]).numel()).args[0]
    members = _between(hidden, out, reached)
    for n in members:
        for a in n.all_input_nodes:
            if a in varying and a is not hidden and a not in members:
                return f"the head's {n.name} ({short_op(n)}) also reads {a.name}, which is not token-wise"
    inside = set(members) | {u for n in members for u in n.users if short_op(u) == "_assert_tensor_metadata"}
    members = [n for n in graph.nodes if n in inside]
    for n in members:
        outside = [u for u in n.users if u not in inside and n is not out]
        if outside:
            return f"the head's {n.name} ({short_op(n)}) is also used by {outside[0].name}"
    h, o = val(hidden).shape, val(out).shape
    if len(h) != 3 or str(h[:2]) != str(o[:2]):
        return f"the head maps {list(h)} to {list(o)}, not [batch, tokens, ·] to [batch, tokens, vocab]"
    return hidden, members, out


def _outputs(graph: fx.Graph) -> list[fx.Node]:
    out = next(n for n in graph.nodes if n.op == "output")
    found = []
    fx.node.map_arg(out.args, found.append)
    return found


def _varying(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on an input (the rest are weights and constants)."""
    varying = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in varying for a in n.all_input_nodes):
            varying.add(n)
    return varying


def _tokenwise(n: fx.Node, varying: set[fx.Node]) -> bool:
    if n.op == "call_module":
        return isinstance(n.graph.owning_module.get_submodule(str(n.target)), nn.Dropout)
    if n.op != "call_function" or short_op(n) not in TOKENWISE:
        return False
    if short_op(n) == "linear":
        return n.args[0] in varying and all(a not in varying for a in n.all_input_nodes[1:])
    # Every constant operand broadcasts along the last axis only.
    return all(a in varying or val(a) is None or val(a).dim() <= 1 for a in n.all_input_nodes)


def _between(start: fx.Node, end: fx.Node, allowed: set[fx.Node]) -> list[fx.Node]:
    """Nodes of `allowed` on a path from `start` to `end`, in graph order."""
    after, todo = set(), [start]
    while todo:
        for u in todo.pop().users:
            if u in allowed and u not in after:
                after.add(u)
                todo.append(u)
    return [n for n in start.graph.nodes if n in after]


def _constant_inputs(members: list[fx.Node], varying: set[fx.Node]) -> list[fx.Node]:
    """What the head reads that depends on no input, in graph order: weights (get_attr) and whatever the graph
    computes from them alone (a lifted `torch.tensor(3.0)`, `scale.exp()`); copied into the head's body."""
    inside, need = set(members), set()
    todo = [a for n in members for a in n.all_input_nodes if a not in varying and a not in inside]
    while todo:
        a = todo.pop()
        if a not in need:
            need.add(a)
            todo.extend(a.all_input_nodes)
    return [n for n in members[0].graph.nodes if n in need]


def chunk_tokens(batch: int, vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, batch * vocab))


def chunked_lm_loss(head: LossHead, hidden: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None = None,
                    temperature: float = 1.0, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean next-token cross-entropy, batch-mean KL(teacher ‖ student) · T² or None) of the head applied to
    `hidden` [B, N, H], against `targets` [B, N] and `teacher` logits [B, N, vocab]: the values of
    `F.cross_entropy` / `F.kl_div(..., reduction="batchmean")` on the whole logits, a chunk of tokens at a time."""
    B, N = targets.shape
    if chunk is None:
        chunk = chunk_tokens(B, head.vocab)
    sums = []
    for t0 in range(0, max(N, 1), chunk):  # (no tokens: one empty chunk, and NaN as F.cross_entropy gives)
        args = (hidden[:, t0:t0 + chunk], targets[:, t0:t0 + chunk],
                None if teacher is None else teacher[:, t0:t0 + chunk])
        if torch.is_grad_enabled():
            sums.append(checkpoint(_chunk_sums, head.body, *args, temperature, use_reentrant=False,
                                   preserve_rng_state=True))
        else:
            sums.append(_chunk_sums(head.body, *args, temperature))
    total = torch.stack(sums).sum(0) / (B * N)
    return total[0], None if teacher is None else total[1] * temperature * temperature


def _chunk_sums(body, hidden, targets, teacher, temperature):
    logits = body(hidden).float()
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, targets.reshape(-1), reduction="sum")
    if teacher is None:
        return ce.reshape(1)
    T = temperature
    kl = F.kl_div(F.log_softmax(flat / T, -1), F.log_softmax(teacher.float().reshape(flat.shape) / T, -1),
                  log_target=True, reduction="sum")
    return torch.stack([ce, kl])

