"""Build what healing trains: one capture gives the converted graph, its LoRA adapters and the teacher graph.

peft cannot wrap an exported graph ("Target module Module() is not supported"), but a model wrapped by peft
*before* export exports fine: the LoRA matmuls become graph ops whose parameters are the peft model's own
(aliased, not copied). So healing wraps the rebuilt HF model with `get_peft_model` first and captures
`peft_model.base_model.model` (the HF model with LoRA layers injected). LoRA B starts at zero, so that graph
computes exactly the converted model, and peft's `save_pretrained` / merge see the trained values.

The capture is the slow part (seconds even for a tiny model), so it is done once per heal: before
`substitute` the captured graph is copied for the attention-transfer teacher (passes/teacher.py), and both
graphs share the parameters and the operator modules.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import UsageError
from ..pipeline import ConvertedModel, PassRecord, snapshot
from .outdir import OPS


@dataclass
class HealGraphs:
    converted: ConvertedModel  # the converted graph (LoRA ops inside when peft-wrapped)
    lm: nn.Module  # the HF model the graph was captured from (LoRA layers injected)
    peft_model: object | None  # the PeftModel around `lm`, or None
    teacher: fx.GraphModule | None  # input_ids -> per-site MSE tuple (passes/teacher.py)
    teacher_sites: list = field(default_factory=list)
    lora_dropouts: list = field(default_factory=list)  # nn.Dropout modules to switch with train()
    loss_head: nn.Module | None = None  # the outlined LM head (heal/head.py), when the loss runs it in chunks
    seconds: float = 0.0

    @property
    def ops(self) -> dict[str, nn.Module]:
        """Operator modules by their state-dict prefix (`ops.model.layers.0.self_attn`)."""
        return {f"{OPS}{name}": m for name, m in self.converted.operators.items()}

    def op_parameters(self) -> dict[str, nn.Parameter]:
        """Every operator parameter by its name in model.safetensors."""
        return {f"{prefix}.{n}": p for prefix, m in self.ops.items() for n, p in m.named_parameters()}

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        if self.peft_model is None:
            return {}
        return {n: p for n, p in self.lm.named_parameters() if "lora_" in n}


def build(lm: nn.Module, spec, *, lora_config=None, peft_model=None, with_teacher: bool = True,
          allow_code: bool = False, op_state: dict[str, torch.Tensor] | None = None) -> HealGraphs:
    """Capture `lm` (wrapped with peft when `lora_config` is given, or the given `peft_model` around it), convert
    it with `spec`, and keep a teacher copy of the captured graph."""
    from ..passes import teacher as teacher_pass
    from ..passes.capture import capture
    from ..passes.fuse import fuse, resolve_backend
    from ..passes.match import match, select
    from ..passes.substitute import substitute
    from .lora import insert_lora_dropout

    t0 = time.perf_counter()
    for rule in spec.rules:
        if ":" in rule.op and not allow_code:
            raise UsageError(f'op "{rule.op}" of the spec is user Python code: pass --allow-code to heal with it')
    if lora_config is not None:
        from peft import get_peft_model

        from .lora import check_targets

        check_targets(lm, lora_config.target_modules)
        with quiet_peft():
            peft_model = get_peft_model(lm, lora_config)
    if peft_model is not None:
        lm = peft_model.base_model.model
    for p in lm.parameters():
        p.requires_grad_(False)  # stages switch on exactly what they train
    captured = capture(lm, spec.capture)  # on the device the model lives on
    result = match(captured, spec)
    assignments = select(result, spec)
    plan = teacher_pass.prepare(captured.gm, assignments) if with_teacher else None
    added = substitute(captured.gm, assignments, allow_code=allow_code)
    teacher = plan.finish(captured.gm, added) if plan is not None and added else None
    fuse(captured.gm, resolve_backend(spec.fuse_backend)[0])  # healing on CUDA trains through the Triton kernels
    sites = [s for s, _ in assignments]
    history = [PassRecord("heal-build", time.perf_counter() - t0, snapshot(captured.gm))]
    converted = ConvertedModel(captured.gm, spec, sites, lm.config, history=history, allow_code=allow_code,
                               report={"spec": spec.name})
    graphs = HealGraphs(converted=converted, lm=lm, peft_model=peft_model, teacher=teacher,
                        teacher_sites=plan.sites if plan is not None else [])
    if op_state is not None:
        load_op_state(graphs, op_state)
    if peft_model is not None:
        graphs.lora_dropouts = insert_lora_dropout(captured.gm)
    graphs.seconds = time.perf_counter() - t0
    return graphs


@contextmanager
def quiet_peft():
    """peft 0.21 calls a transformers API that transformers 5 deprecates: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_op_state(graphs: HealGraphs, state: dict[str, torch.Tensor]) -> None:
    """Copy `ops.*` tensors into the operators (every operator parameter/buffer must be there)."""
    targets = {f"{prefix}.{n}": t for prefix, m in graphs.ops.items() for n, t in m.state_dict(keep_vars=True).items()}
    missing = [k for k in targets if k not in state]
    if missing:
        raise UsageError(f"the saved model has no {missing[0]}: it was converted with another spec or version")
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(state[name])
