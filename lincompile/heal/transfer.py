"""Stage 1, attention transfer (LoLCATs / Lizard): train only the operators' new parameters so that each
converted site reproduces its softmax attention output.

The teacher graph (passes/teacher.py) runs the *original* model and returns one MSE per site between the
operator's output and softmax attention on the same inputs, so every layer learns from the inputs the
original model gives it, independently of the other layers' errors (LoLCATs' layer-wise transfer). The loss
is the sum of the per-site MSEs; since each operator's parameters only reach its own term and AdamW and the
per-operator clipping are per parameter group, this is the same as training the layers one by one, in one
pass over the model.

Operators without parameters (liger_gla, liger_attention, swa_sinks) have nothing to transfer: the stage is
skipped with a note.
"""

from __future__ import annotations

import torch
from torch import nn

from ..passes.substitute import site_key
from .build import HealGraphs
from .trainer import StageRun


class TransferLoss(nn.Module):
    def __init__(self, teacher: nn.Module, site_names: list[str], ops: list[nn.Module]):
        super().__init__()
        self.teacher = teacher
        self.site_names = site_names
        self.op_list = nn.ModuleList(ops)  # registered so DDP sees (only) the operators' parameters
        self.last: dict[str, float] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        losses = self.teacher(input_ids)
        total = torch.stack(list(losses)).sum()
        self.last = {"mse_mean": float(total.detach()) / len(losses)}
        return total

    def train(self, mode: bool = True):
        # The teacher graph is an exported graph (no train()); the operators are what changes mode.
        self.training = mode
        self.op_list.train(mode)
        return self

    @torch.no_grad()
    def per_site(self, blocks: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> dict[str, float]:
        """Mean MSE of each site over `blocks`."""
        sums = torch.zeros(len(self.site_names), dtype=torch.float64)
        n = 0
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size].to(device)
            sums += torch.tensor([float(x) for x in self.teacher(ids)], dtype=torch.float64) * len(ids)
            n += len(ids)
        return {name: float(v) / max(n, 1) for name, v in zip(self.site_names, sums)}


def transfer_stage(graphs: HealGraphs, cfg, eval_blocks: torch.Tensor, device: str = "cpu") -> StageRun | None:
    """The stage, or None when the operators have no parameters (the caller logs the skip)."""
    if graphs.teacher is None:
        return None
    ops = graphs.ops
    names = [site_key(s) for s in graphs.teacher_sites]  # ops.<name>: a module's later sites are numbered
    per_op = [ops[f"ops.{n}"] for n in names]
    params = {f"ops.{n}.{pn}": p for n, m in zip(names, per_op) for pn, p in m.named_parameters()}
    if not params:
        return None
    module = TransferLoss(graphs.teacher, names, per_op)
    groups = [list(m.parameters()) for m in per_op if list(m.parameters())]

    def evaluate() -> dict:
        per_site = module.per_site(eval_blocks, device=device)
        return {"mse": sum(per_site.values()), "layers": per_site}

    return StageRun(name="transfer", module=module, params=params, cfg=cfg, clip_groups=groups,
                    evaluate=evaluate if len(eval_blocks) else None, index=0)
