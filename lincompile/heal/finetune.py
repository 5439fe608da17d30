"""Stage 2, LoRA fine-tuning of the converted graph: next-token cross-entropy, optionally distilled.

    loss = (1 − w)·CE(converted, next token) + w·T²·KL(softmax(original/T) ‖ softmax(converted/T))

The original model's logits come from the same HF model the graph was captured from, run eagerly with the
adapters disabled (peft's `disable_adapter`), so distillation needs no second copy of the weights. T² keeps
the KL gradient on the CE scale as T changes (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import HealGraphs
from .evaluate import block_metrics
from .head import chunked_lm_loss
from .trainer import StageRun


class LMLoss(nn.Module):
    def __init__(self, graphs: HealGraphs, distill_weight: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.converted = graphs.converted
        self.dropouts = nn.ModuleList(graphs.lora_dropouts)
        self.weight, self.temperature = distill_weight, temperature
        self.head = graphs.loss_head  # set by gradient checkpointing (heal/head.py)
        # Not registered as a submodule: its parameters are the graph's, and DDP must not see them twice.
        self.__dict__["_peft"] = graphs.peft_model
        self.__dict__["_lm"] = graphs.lm
        self.last: dict[str, float] = {}

    def original_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._peft.disable_adapter():
            return self._lm(input_ids=input_ids, use_cache=False).logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        targets = input_ids[:, 1:]
        teacher = self.original_logits(input_ids)[:, :-1] if self.weight > 0 else None
        if self.head is not None:  # gradient checkpointing: the head and the loss a chunk of tokens at a time
            with self.head.returning_hidden():
                hidden = self.converted(input_ids)[:, :-1]
            ce, kl = chunked_lm_loss(self.head, hidden, targets, teacher, self.temperature)
        else:
            ce, kl = self._loss(self.converted(input_ids)[:, :-1].float(), targets, teacher)
        self.last = {"ce": float(ce.detach())}
        if kl is None:
            return ce
        self.last["kl"] = float(kl.detach())
        return (1 - self.weight) * ce + self.weight * kl

    def _loss(self, logits, targets, teacher):
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        if teacher is None:
            return ce, None
        T = self.temperature
        kl = F.kl_div(F.log_softmax(logits / T, -1).reshape(-1, logits.shape[-1]),
                      F.log_softmax(teacher.float() / T, -1).reshape(-1, logits.shape[-1]),
                      log_target=True, reduction="batchmean") * T * T
        return ce, kl

    def train(self, mode: bool = True):
        # The exported graph refuses train(); LoRA dropout modules and operators are what follow the mode.
        self.training = mode
        self.converted.train(mode)
        self.dropouts.train(mode)
        return self


def lora_stage(graphs: HealGraphs, cfg, eval_blocks: torch.Tensor, device: str = "cpu") -> StageRun:
    params = dict(graphs.lora_parameters())
    if cfg.train_ops:
        params.update(graphs.op_parameters())
    module = LMLoss(graphs, cfg.distill.weight, cfg.distill.temperature)

    def evaluate() -> dict:
        m = block_metrics(graphs.converted, eval_blocks, device=device)
        return {"loss": m["loss"], "ppl": m["ppl"], "acc": m["acc"]}

    return StageRun(name="lora", module=module, params=params, cfg=cfg, clip_groups=[list(params.values())],
                    evaluate=evaluate if len(eval_blocks) else None, index=1)
