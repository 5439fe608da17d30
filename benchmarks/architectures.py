"""Which transformers architectures lincompile converts (not a test): every causal LM the installed transformers
knows, as a tiny random model, through the whole pipeline.

    python benchmarks/architectures.py [--types llama gpt2 ...] [--specs liger-attention lizard]
                                       [--jobs 2] [--timeout 300] [--json results.json [--update]]

For each model type in transformers' causal-LM table (or those named by --types) a worker process
1. builds a tiny random model from the type's own config defaults, shrunk (64 wide, 2 layers, 4 heads, 128
   tokens of vocabulary; sub-configs too) — the sweep's own step: a type it cannot build says "not built";
2. converts it with the identity spec: the sites found per layer, and the logits' largest difference from the
   original's (a capture or match that fails stops here);
3. converts it with each further spec (default liger-attention), saves OUT, loads it back (`lincompile.load`)
   and runs the runtime: prefill of the first tokens, then one-token decodes, each compared with the full
   forward of the converted model, and a second prefill continuing the state.
Nothing is downloaded. One JSON object per type; the table sorts them by outcome:
- converts and decodes: every step above, logits within 1e-3 of the reference;
- converts; runtime refuses: the runtime says, in one line, that it cannot run the model from a state (a layer
  that is not attention mixes tokens: Mamba, convolutions; positions the model makes itself);
- identity only: spec refuses the masks: the spec's operator cannot take the sites' masks (bidirectional,
  ALiBi, chunked) and says so; keeping those layers converts;
- fails / identity differs / identity failed: a bug;
- capture refused: torch.export cannot give a graph for every length (the model's code loops over or fixes the
  length), said in one line; no site matched: no softmax attention the patterns know (the error names the near
  misses), or none at all;
- crashed / timed out / not built: the worker died, ran out of time, or the sweep could not build the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The shrunken sizes. Names are transformers' standard ones; a config maps them to its own (n_embd, d_model …)
# through its attribute_map, so one table serves every type.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
# Config fields that scale a model but have no standard name: shrunk wherever a config has them.
EXPERTS = {"num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4, "n_experts": 4,
           "num_experts_per_tok": 2, "moe_topk": 2, "num_experts_per_token": 2, "n_shared_experts": 1,
           "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
# Other sizes some types have (state-space and hybrid layers, sparse-attention indexers), set where present.
SIZES = {"mamba_n_heads": 8, "n_mamba_heads": 8, "mamba_d_head": 16, "mamba_headdim": 16, "mamba_d_state": 16,
         "mamba_n_groups": 1, "mamba_ngroups": 1, "mamba_chunk_size": 16, "moe_k": 2, "moe_num_shared_experts": 1,
         "zero_expert_num": 2, "expert_ffn_hidden_size": 32, "index_head_dim": 16, "index_n_heads": 2,
         "linear_head_dim": 16, "linear_num_heads": 4, "attention_head_dim": 16, "num_expert_group": 1,
         "moe_layer_end_index": 1, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16}
WINDOWS = ("sliding_window", "window_size", "attention_window", "attention_chunk_size")
# Types whose defaults the generic shrinking cannot make consistent (latent attention's ranks, a fixed head
# size); these are the sweep's settings, the tool itself reads nothing of them.
EXTRA = {
    "mla": dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16,
                v_head_dim=16, num_key_value_heads=4, head_dim=8),
    "codegen": dict(rotary_dim=8),
    "gptj": dict(rotary_dim=8),
    "xlm": dict(causal=True),  # XLM's causal-LM checkpoints (CLM); its default is the masked-LM one
    # Gemma 3n's last layers reuse the keys and values of the last earlier layer of their kind: two of each kind
    # (sliding, full, then the two sharing theirs), so that the sharing itself is swept.
    "gemma3n_text": dict(keep_layers=[0, 4, 5, 9], num_hidden_layers=4, num_kv_shared_layers=2),
}
MLA = {"bailing_hybrid", "hy_v4", "deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "axk1", "axk2",
       "sarvam_mla", "glm_moe_dsa", "glm4_moe_lite", "longcat_flash", "kimi_linear", "youtu"}
T_FULL, T_PREFILL = 40, 17  # tokens: the full forward, and the first prefill before one-token decodes
TOL = 1e-3  # on logits of ~1 (fp32): a difference above this is a wrong result, not rounding


def _shrink(cfg, extra: dict) -> None:
    """Shrink `cfg` and its sub-configs in place."""
    from transformers import PretrainedConfig

    layers = getattr(cfg, "num_hidden_layers", None)
    keep = extra.get("keep_layers") or _kept_layers(cfg, layers)
    # Gemma 4's per-layer settings are an object keyed by layer that does not shrink: keep its layers (narrow)
    fixed_layers = bool(cfg.to_dict().get("per_layer_config"))
    for key, value in {**TINY, **extra}.items():
        if not (fixed_layers and key == "num_hidden_layers"):
            _set(cfg, key, value)
    if fixed_layers:
        keep = None
    for key, value in list(vars(cfg).items()):
        low = key.lower()
        if isinstance(value, PretrainedConfig):
            _shrink(value, extra)
        elif isinstance(value, (list, tuple)) and keep and len(value) == layers:  # one entry per layer
            _set(cfg, key, type(value)(value[i] for i in keep))
        elif isinstance(value, dict) and keep and value and all(isinstance(k, int) or str(k).isdigit() for k in value):
            kept = {j: value.get(i, value.get(str(i))) for j, i in enumerate(keep)}  # keyed by layer
            _set(cfg, key, {j: v for j, v in kept.items() if v is not None})
        elif key in EXPERTS and (value is None or type(value) is int):
            _set(cfg, key, EXPERTS[key])
        elif key in SIZES and key not in extra and (value is None or type(value) is int):
            _set(cfg, key, SIZES[key])
        elif key == "is_decoder" and value is False:
            _set(cfg, key, True)  # encoder types' causal-LM classes (BertLMHeadModel …) ask for it
        elif isinstance(value, bool) or not isinstance(value, int):
            continue
        elif key in ("pad_token_id", "bos_token_id", "eos_token_id") and value >= TINY["vocab_size"]:
            _set(cfg, key, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key])  # a sub-config's own ids
        elif key in TINY or key in extra:
            continue
        elif low.endswith("attention_heads"):  # encoder_/decoder_ (encoder-decoder families), swa_ (Inkling) …
            _set(cfg, key, TINY["num_attention_heads"])
        elif low.endswith("key_value_heads"):  # … and their kv heads, which must divide them
            _set(cfg, key, TINY["num_key_value_heads"])
        elif "intermediate" in low or low.endswith("ffn_dim") or low in ("n_inner", "ffn_hidden_size"):
            _set(cfg, key, 32 if ("moe" in low or "expert" in low) else 128)
        elif key in ("decoder_layers", "encoder_layers") and value > TINY["num_hidden_layers"]:
            _set(cfg, key, TINY["num_hidden_layers"])  # encoder-decoder families (BART's decoder as a causal LM)
        elif low in WINDOWS and value > 8:
            _set(cfg, key, 8)


def _kept_layers(cfg, layers) -> list[int] | None:
    """Which of the full model's layers the 2-layer one stands for: the first of each kind in `layer_types`
    (sliding and full attention, say), else the first two; every per-layer list and dict keeps those."""
    if not isinstance(layers, int) or layers <= TINY["num_hidden_layers"]:
        return None
    kinds = getattr(cfg, "layer_types", None)
    first = list({k: i for i, k in reversed(list(enumerate(kinds)))}.values())[::-1] if isinstance(kinds, list) else []
    first = sorted(first)[:TINY["num_hidden_layers"]]
    rest = [i for i in range(layers) if i not in first]
    return sorted(first + rest[:TINY["num_hidden_layers"] - len(first)])


def _set(cfg, key, value) -> None:
    if key in vars(cfg) or key in getattr(cfg, "attribute_map", {}):
        try:
            setattr(cfg, key, value)
        except (AttributeError, TypeError, ValueError):  # a derived property (Falcon's head_dim): leave it
            pass


def tiny_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {**(EXTRA["mla"] if model_type in MLA else {}), **EXTRA.get(model_type, {})}
    cfg = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    _shrink(cfg, extra)
    cfg = type(cfg).from_dict(cfg.to_dict())  # the config's own checks, as loading a saved model runs them
    torch.manual_seed(0)
    for attn in ("sdpa", "eager"):
        try:
            return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval(), attn
        except ValueError as err:  # "does not support an attention implementation": try eager
            if attn == "eager" or "attention implementation" not in str(err):
                raise
    raise AssertionError("unreachable")


def _err(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:240]}"


def _max_diff(a, b) -> float:
    d = (a.float() - b.float()).abs().max()
    return float(d) if d.isfinite() else math.inf


def worker(model_type: str, specs: list[str]) -> dict:
    import torch

    import lincompile
    import lincompile.runtime as lr
    from lincompile.pipeline import convert
    from lincompile.spec import Spec

    res: dict = {"type": model_type}
    t0 = time.perf_counter()
    try:
        model, attn = tiny_model(model_type)
        res.update(model_class=type(model).__name__, attn_implementation=attn,
                   params=sum(p.numel() for p in model.parameters()))
        layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        res["layers"] = layers
        ids = torch.randint(3, 128, (2, T_FULL), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
    except BaseException as e:  # noqa: BLE001 - the sweep reports every failure as data
        res.update(outcome="not built", error=_err(e), seconds=round(time.perf_counter() - t0, 1))
        return res
    try:
        cm = convert(model, Spec.resolve("identity"))
        res["sites"] = len(cm.sites)
        with torch.no_grad():
            res["identity_max_diff"] = _max_diff(cm(ids), ref)
    except BaseException as e:  # noqa: BLE001
        msg = _err(e)
        refused = ("CaptureError: torch.export failed", "CaptureError: torch.export narrowed",
                   "CaptureError: torch.export fixed", "CaptureError: the captured graph does not take")
        outcome = ("no site matched" if msg.startswith("MatchError: 0 sites") else
                   "capture refused" if msg.startswith(refused) else "identity failed")
        res.update(outcome=outcome, error=msg, seconds=round(time.perf_counter() - t0, 1))
        return res
    res["specs"] = {}
    for name in specs:
        res["specs"][name] = _run_spec(model, name, ids, lincompile, lr, convert, Spec)
    res["outcome"] = _outcome(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _run_spec(model, name, ids, lincompile, lr, convert, Spec) -> dict:
    import torch

    out: dict = {}
    stage = "convert"
    try:
        cm = convert(model, Spec.resolve(name))
        out["sites"] = len(cm.sites)
        out["notes"] = sorted({n.split(":")[0] for s in cm.sites for n in s.notes})
        stage = "save/load"
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            cm.save(Path(tmp) / "out")
            loaded = lincompile.load(Path(tmp) / "out")
            full = cm(ids)
            out["finite"] = bool(full.isfinite().all())
            out["load_max_diff"] = _max_diff(loaded(ids), full)
            stage = "runtime"
            rt = lr.load(Path(tmp) / "out")
            logits, state = rt.prefill(ids[:, :T_PREFILL])
            out["prefill_max_diff"] = _max_diff(logits, full[:, :T_PREFILL])
            worst = 0.0
            for t in range(T_PREFILL, ids.shape[1]):
                step, state = rt.decode(ids[:, t:t + 1], state=state)
                worst = max(worst, _max_diff(step[:, 0], full[:, t]))
            out["decode_max_diff"] = worst
            half = ids.shape[1] // 2
            _, s1 = rt.prefill(ids[:, :half])
            rest, _ = rt.prefill(ids[:, half:], state=s1)
            out["continue_max_diff"] = _max_diff(rest, full[:, half:])
        out["ok"] = out["finite"] and max(out["load_max_diff"], out["prefill_max_diff"], out["decode_max_diff"],
                                          out["continue_max_diff"]) <= TOL
    except BaseException as e:  # noqa: BLE001
        out.update(ok=False, failed=stage, error=_err(e))
    return out


def _outcome(res: dict) -> str:
    """converts and decodes; a clear refusal (a spec's op that cannot take the site's masks, a runtime that cannot
    carry the model's token mixing in a state); or a failure, which is a bug."""
    specs = list(res["specs"].values())
    if res["identity_max_diff"] > TOL:
        return "identity differs"
    if all(r.get("ok") for r in specs):
        return "converts and decodes"
    errors = [r.get("error", "") for r in specs if not r.get("ok")]
    if all(e.startswith("SpecError") for e in errors):
        return "identity only: spec refuses the masks"
    if all(e.startswith(("SpecError", "LincompileError: this model cannot be run from a state")) for e in errors):
        return "converts; runtime refuses"
    return "fails"


def run_one(model_type: str, specs: list[str], timeout: float) -> dict:
    """One type in its own process: a crash, a hang or a memory blow-up is that type's result alone."""
    cmd = [sys.executable, __file__, "--worker", model_type, "--specs", *specs]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"type": model_type, "outcome": "timed out", "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"type": model_type, "outcome": "crashed", "error": f"worker exited {done.returncode}: {tail[:240]}",
                "seconds": round(time.perf_counter() - t0, 1)}
    return json.loads(lines[-1])


ORDER = ["converts and decodes", "converts; runtime refuses", "identity only: spec refuses the masks", "fails",
         "identity differs", "identity failed", "capture refused", "no site matched", "crashed", "timed out",
         "not built"]


def table(results: list[dict], specs: list[str]) -> str:
    head = ["type", "class", "outcome", "sites/layers", "identity Δ"] + [f"{s}" for s in specs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (ORDER.index(r["outcome"]), r["type"])):
        cells = [r["type"], r.get("model_class", ""), r["outcome"],
                 f"{r['sites']}/{r.get('layers')}" if "sites" in r else "",
                 f"{r['identity_max_diff']:.1e}" if "identity_max_diff" in r else r.get("error", "")[:80]]
        for s in specs:
            o = r.get("specs", {}).get(s)
            if o is None:
                cells.append("")
            elif o.get("ok"):
                cells.append(f"decode Δ {o['decode_max_diff']:.1e}")
            else:
                cells.append(f"{o.get('failed', 'differs')}: {o.get('error', _worst(o))[:80]}")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _worst(o: dict) -> str:
    keys = [k for k in o if k.endswith("_max_diff")]
    worst = ", ".join(f"{k[:-9]} {o[k]:.1e}" for k in keys if o[k] > TOL)
    return worst or ("not finite" if not o.get("finite") else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", help="model types (default: every causal LM transformers knows)")
    p.add_argument("--specs", nargs="+", default=["liger-attention"], help="specs to run after the identity")
    p.add_argument("--jobs", type=int, default=2, help="worker processes at once")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per type")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--update", action="store_true",
                   help="with --json and --types: rerun those types and replace them in the saved results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)  # one per worker: --jobs sets how many run at once
        print(json.dumps(worker(args.worker, args.specs)), flush=True)
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        p.error(f"not causal-LM model types in transformers {transformers.__version__}: {', '.join(unknown)}")
    if args.update and not (args.json and args.json.exists() and args.types):
        p.error("--update needs --types and an existing --json file")
    if args.update:  # one run's results: the same transformers and specs throughout
        saved = json.loads(args.json.read_text())
        if (saved.get("transformers"), saved.get("specs")) != (transformers.__version__, args.specs):
            p.error(f"{args.json} was run with transformers {saved.get('transformers')} and specs "
                    f"{saved.get('specs')}, not {transformers.__version__} and {args.specs}: rerun it whole")
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for i, r in enumerate(pool.map(lambda t: run_one(t, args.specs, args.timeout), types), 1):
            results.append(r)
            print(f"[{i}/{len(types)}] {r['type']}: {r['outcome']}" + (f" ({r['error']})" if "error" in r else ""),
                  file=sys.stderr, flush=True)
    if args.update:
        fresh = {r["type"]: r for r in results}
        results = [fresh.pop(r["type"], r) for r in saved["results"]] + list(fresh.values())
    counts = {o: sum(r["outcome"] == o for r in results) for o in ORDER}
    print(table(results, args.specs))
    print("\n" + ", ".join(f"{n} {o}" for o, n in counts.items() if n))
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"transformers": transformers.__version__, "specs": args.specs, "counts": counts,
                                   "results": results}, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
