"""LoRA through peft: the config, the dropout pass, adapters in peft format, merged weights, loading back.

Semantics are peft's LoraConfig: `r`, `alpha` (scaling alpha / r), `dropout` on the LoRA input, `targets` as
a list of module names (exact or `.name` suffix match) or one regex (full match). The default targets the
q/k/v/o projections of the converted layers only, as recorded in OUT/report.json (`site_details`).

Outputs of a heal:
- OUT/heal/adapter/{adapter_config.json, adapter_model.safetensors}: `PeftModel.from_pretrained` loads them on
  the HF model rebuilt from OUT (`load_adapter` below does that and converts it);
- OUT/model.safetensors: W + (alpha / r)·B·A merged into each targeted weight, so `lincompile.load(OUT)`
  gives the healed model with no peft at run time.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import fx, nn

from ..emit import publish_dir
from ..errors import UsageError
from ..graph import short_op
from ..walk import CASTS
from .outdir import LM, OutDir

ADAPTER_DIR = "adapter"


def lora_config(cfg, outdir: OutDir):
    """peft LoraConfig for a `heal.lora` section (targets resolved against the converted sites)."""
    from peft import LoraConfig

    targets = outdir.site_projections() if cfg.targets == "default" else cfg.targets
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")


def check_targets(lm: nn.Module, targets) -> None:
    """One clear error when the targets name no module (peft's own message is long and generic)."""
    names = [n for n, _ in lm.named_modules()]
    if isinstance(targets, str):
        hit = any(re.fullmatch(targets, n) for n in names)
    else:
        hit = any(n == t or n.endswith("." + t) for n in names for t in targets)
    if not hit:
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        raise UsageError(f"heal.lora.targets ({shown}) matches no module of the model")


# --------------------------------------------------------------------------------------------------
# Dropout: export fixes the graph in eval mode, where peft's LoRA dropout is `aten.dropout(x, p, train=False)`.
# Each such node is replaced by a real nn.Dropout module that follows train()/eval().


def insert_lora_dropout(gm: fx.GraphModule) -> list[nn.Dropout]:
    graph, modules = gm.graph, []
    for node in list(graph.nodes):
        if node.op != "call_function" or "dropout" not in str(node.target) or len(node.args) < 2:
            continue
        lora_a = _feeds_lora_a(node)
        if lora_a is None:
            continue
        name = "lora_dropout." + re.sub(r"\W", "_", lora_a.split(".lora_A.")[0])
        module = nn.Dropout(float(node.args[1]))
        gm.add_submodule(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        modules.append(module)
    graph.lint()
    gm.recompile()
    return modules


def _feeds_lora_a(node: fx.Node, depth: int = 4) -> str | None:
    """The lora_A weight name of the linear this node feeds directly or through casts, or None. (Not through
    other ops: GPT-NeoX's embedding dropout reaches layer 0's lora_A through a layer norm, and is not LoRA's.)"""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "call_function" and "linear" in str(user.target) and len(user.args) > 1:
                    w = user.args[1]
                    if user.args[0] is n and isinstance(w, fx.Node) and w.op == "get_attr" \
                            and ".lora_A." in str(w.target):
                        return str(w.target)
                elif user.op == "call_function" and short_op(user) in CASTS:
                    nxt.append(user)
        frontier = nxt
    return None


# --------------------------------------------------------------------------------------------------
# Outputs


def lora_layers(lm: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}


def merged_tensors(lm: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """`lm.<module>.weight` = W + ΔW for every LoRA layer, computed without touching the model."""
    out = {}
    with torch.no_grad():
        for name, layer in lora_layers(lm).items():
            base = layer.get_base_layer()
            out[f"{LM}{name}.weight"] = base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype)
    return out


def target_weight_names(lm: nn.Module) -> list[str]:
    return [f"{LM}{name}.weight" for name in lora_layers(lm)]


def save_adapter(peft_model, heal_dir: Path, base_ref: str) -> Path:
    """peft's save_pretrained into OUT/heal/adapter, written beside and renamed into place."""
    dest = Path(heal_dir) / ADAPTER_DIR
    tmp = Path(tempfile.mkdtemp(dir=heal_dir, prefix=f".{ADAPTER_DIR}.tmp-"))
    try:
        for cfg in peft_model.peft_config.values():
            cfg.base_model_name_or_path = base_ref
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_adapter(path, allow_code: bool = False, device: str = "cpu"):
    """A healed model with its LoRA adapters *unmerged*: OUT (uses OUT/heal/adapter) or the adapter dir itself.

    The base is the pre-heal `lm.*` weights and the healed operator parameters; peft applies the adapters.
    `lincompile.load(OUT)` gives the merged equivalent.
    """
    from peft import PeftModel

    from .build import build, quiet_peft

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        adapter, root = path, path.parent.parent
    else:
        adapter, root = path / "heal" / ADAPTER_DIR, path
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{path}: no LoRA adapter (adapter_config.json) here or in heal/{ADAPTER_DIR}/")
    outdir = OutDir(root)
    current = outdir.tensors()
    base = {**current, **{k: v for k, v in outdir.originals().items() if k.startswith(LM)}}
    lm = outdir.build_lm(base, device=device)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(lm, str(adapter))
    graphs = build(lm, outdir.spec, peft_model=peft_model, with_teacher=False, allow_code=allow_code,
                   op_state=current)
    graphs.converted.tokenizer = outdir.tokenizer()
    return graphs.converted
