"""lm-evaluation-harness model adapter: `lincompile` (importing this module registers it; needs lm-eval).

    import lm_eval, lincompile.heal.lm_eval_adapter   # registers model "lincompile"
    lm_eval.simple_evaluate(model="lincompile", model_args="path=out/", tasks=["hellaswag"])
    lincompile lm-eval out/ --tasks hellaswag --limit 100          # the same from the command line

model_args: `path` (an OUT directory), `adapter` (true: LoRA adapters unmerged), `max_length` (tokens of
context, default the model's max_position_embeddings), `max_gen_toks` (256), `device` (cpu). A converted
model object can be passed directly as `LincompileLM(model=..., tokenizer=...)`.

Requests are scored one at a time with the converted graph (it has no KV cache: generation recomputes the
prefix at every token, which is fine for the short answers of evaluation tasks). Tokenisation follows the
harness's HF model: the context's trailing whitespace moves to the continuation, and the continuation's
tokens are those of the joint encoding after the context's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import UsageError


@register_model("lincompile")
class LincompileLM(LM):
    def __init__(self, path: str | None = None, model=None, tokenizer=None, adapter: bool = False,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str = "cpu", batch_size=1, **_):
        super().__init__()
        if model is None:
            if path is None:
                raise UsageError("the lincompile lm-eval model needs model_args path=OUT")
            from .. import load
            from .lora import load_adapter

            model = load_adapter(path, device=device) if _truthy(adapter) else load(path, device=device)
        self.model = model.train(False)
        self.tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tok is None:
            raise UsageError("the converted model has no tokenizer: lm-eval needs one")
        config, spec = getattr(model, "config", None), getattr(model, "spec", None)
        if max_length is None and config is not None and spec is not None:
            from ..passes.capture import length_limit

            max_length = length_limit(config, spec.capture)  # what the converted graph takes
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self._device = device
        eos = self.tok.eos_token_id
        self.prefix_token = self.tok.bos_token_id if self.tok.bos_token_id is not None else eos

    # ----------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log-softmax over the vocabulary at every position of `ids` ([T, V])."""
        x = torch.tensor([ids], device=self._device)
        if x.shape[1] == 1:
            # The exported graph takes at least 2 positions; causal attention makes position 0 ignore the copy.
            return F.log_softmax(self.model(x.repeat(1, 2))[0, :1].float(), -1)
        return F.log_softmax(self.model(x)[0].float(), -1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1):]
        logp = self._logprobs(ids[:-1])[-len(continuation):]
        target = torch.tensor(continuation, device=logp.device)
        return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # ----------------------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                ctx, cont = [self.prefix_token], self._encode(continuation)
            else:
                ctx, cont = self._split(context, continuation)
            out.append(self._score(ctx, cont) if cont else (0.0, True))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self.prefix_token, max_seq_len=self.max_length,
                context_len=1))
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or [self.tok.decode([self.tok.eos_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self._encode(context) or [self.prefix_token]
            generated: list[int] = []
            text = ""
            for _ in range(limit):
                nxt = int(self._logprobs((ids + generated)[-self.max_length:])[-1].argmax())
                if nxt == self.tok.eos_token_id:
                    break
                generated.append(nxt)
                text = self.tok.decode(generated)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")
