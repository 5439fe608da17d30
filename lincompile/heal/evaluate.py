"""Perplexity and next-token accuracy, side by side with the original model.

Windows are non-overlapping: the token stream is cut into `context`-token windows (the tail that does not
fill one is dropped) and every window predicts its own tokens 1..context−1 from the ones before, so each
token is scored once and with at most `context` − 1 tokens of history. PPL = exp(mean NLL over all scored
tokens); accuracy = the fraction whose argmax prediction is the next token. The same windows are scored
for the converted model and for the original, so the two are directly comparable:

    recovery = converted accuracy / original accuracy,   ppl_ratio = converted PPL / original PPL
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import fx

from ..errors import UsageError
from .head import chunk_tokens, lm_head


@torch.no_grad()
def block_metrics(forward, blocks: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> dict:
    """NLL/accuracy over `blocks` [N, T] scored as independent windows; `forward(ids) -> logits`.

    Scored a chunk of tokens at a time, so that no fp32 copy or log-softmax of the whole logits is made; a
    converted model (`forward.graph_module`) runs its LM head by chunks too (heal/head.py) and never holds
    more than one chunk's logits: at 32k tokens and a 128k vocabulary, the whole would be 16 GB."""
    gm = getattr(forward, "graph_module", None)
    head = lm_head(gm) if isinstance(gm, fx.GraphModule) else None
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(device)
        targets = ids[:, 1:]
        if head is not None:
            with head.returning_hidden():
                states = forward(ids)[:, :-1]
            logits_of, vocab = head.body, head.vocab
        else:
            states = forward(ids)[:, :-1]
            logits_of, vocab = (lambda x: x), states.shape[-1]
        step = chunk_tokens(len(ids), vocab)
        for t0 in range(0, targets.shape[1], step):
            logits, part = logits_of(states[:, t0:t0 + step]).float(), targets[:, t0:t0 + step]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), part.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == part).sum())
        count += targets.numel()
    loss = nll / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "acc": correct / max(count, 1), "tokens": count}


def windows(stream: torch.Tensor, context: int, max_tokens: int | None = None) -> torch.Tensor:
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = stream.numel() // context
    if n == 0:
        raise UsageError(f"the evaluation text has {stream.numel()} tokens: shorter than one window of {context}")
    return stream[: n * context].view(n, context)


def hf_forward(model):
    """logits of a plain HF causal LM, no cache (the same function the converted graph was captured from)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def evaluate(models: dict, stream: torch.Tensor, contexts: list[int], max_tokens: int | None = None,
             batch_size: int = 1, device: str = "cpu", progress=None) -> dict:
    """{"context": {"512": {"ppl", "acc", "tokens", "seconds", "original": {...}, "recovery", "ppl_ratio"}}}.

    `models`: {"converted": forward, "original": forward} (either may be missing). A model under any other name
    (`lincompile eval` names a plain model "model") is scored like "converted", at the top of each row.
    """
    out: dict = {"context": {}}
    for ctx in contexts:
        blocks = windows(stream, ctx, max_tokens)
        row: dict = {}
        for name, fwd in models.items():
            if progress:
                progress(f"{name} @ {ctx}: {len(blocks)} window(s)")
            t0 = time.perf_counter()
            m = block_metrics(fwd, blocks, batch_size=batch_size, device=device)
            m["seconds"] = round(time.perf_counter() - t0, 2)
            m.pop("loss")
            if name == "original":
                row[name] = m
            else:
                row.update(m)
        if "acc" in row and "original" in row:
            row["recovery"] = row["acc"] / row["original"]["acc"] if row["original"]["acc"] else None
            row["ppl_ratio"] = row["ppl"] / row["original"]["ppl"]
        out["context"][str(ctx)] = row
    return out


def table_lines(result: dict) -> list[str]:
    """The text table `lincompile eval` prints (the original's columns only where it was scored)."""
    rows_in = result["context"].items()
    compared = any("original" in r and "ppl" in r for _, r in rows_in)
    header = ["context", "PPL", "acc"] + (["orig PPL", "orig acc", "PPL ratio", "recovery"] if compared else [])
    header.append("tokens")
    rows = []
    for ctx, r in rows_in:
        o = r.get("original", {})
        own = r if "ppl" in r else o  # only the original scored (benchmarks/heal.py's reference rows)
        row = [ctx, _f(own.get("ppl")), _f(own.get("acc"), 3)]
        if compared:
            row += [_f(o.get("ppl")), _f(o.get("acc"), 3), _f(r.get("ppl_ratio"), 3), _pct(r.get("recovery"))]
        rows.append(row + [str(own.get("tokens", ""))])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [header] + rows]


def _f(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
