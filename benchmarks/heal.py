"""Fidelity benchmark (not a test): how much of SmolLM2-135M each conversion recovers after healing.

    python benchmarks/heal.py [--methods swa-sinks liger-attention lolcats lizard reference] [--tokens 1000000]
                              [--transfer-tokens 250000] [--seq-len 512] [--eval-tokens 32768]
                              [--data ../shared/data/austen] [--device cpu|cuda]
                              [--workdir bench-heal] [--json results.json] [--readme README.md]

A method name may carry variants: `lizard+kd` heals with KL distillation against the original model
(`--distill`, default weight 0.5, temperature `--distill-temperature`, default 2), `lizard+ops` also trains
the operator's own parameters (gates, sinks, feature maps) during the LoRA stage (methods whose operators
have parameters: lolcats, lizard). The reference takes no variants; it runs where `--methods` lists it, else
last; `--no-reference` stops it being added (it cannot be combined with listing it).

For each method: convert with its built-in spec, heal on the five Austen novels other than Persuasion
(attention transfer when the operator has parameters, then LoRA r=8 α=16 on q/k/v/o with the LoRA token
budget), and evaluate on persuasion.txt at 512 and 2048 context (non-overlapping windows), plus text from
another domain (the Python documentation shipped with the interpreter, pydoc_data.topics) at 512.
swa-sinks is evaluated without healing (the training-free baseline). The reference for recovery is the
*original* model given the same LoRA budget on the same data (spec `identity` healed with LoRA only), so
recovery measures what the conversion costs, not what fine-tuning on Austen adds.

Targets (the issue): the best method has PPL ≤ 1.15 × reference PPL and accuracy ≥ 95 % of the reference at
512 context, and lower PPL than swa-sinks at 2048. The table is printed, and written between
`<!-- heal-benchmark:start -->` / `<!-- heal-benchmark:end -->` in --readme when given.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"  # default --data: six Austen novels
HELD_OUT = "persuasion.txt"
METHODS = {  # name -> (built-in spec, heal stages)
    "swa-sinks": ("swa-sinks", ()),
    "liger-attention": ("liger-attention", ("lora",)),
    "lolcats": ("lolcats", ("transfer", "lora")),
    "lizard": ("lizard", ("transfer", "lora")),
    "reference": ("identity", ("lora",)),  # the original model + the same LoRA budget
}
VARIANTS = ("kd", "ops")
REFERENCE = "reference (original + LoRA)"
START, END = "<!-- heal-benchmark:start -->", "<!-- heal-benchmark:end -->"


def other_domain_text(path: Path) -> Path:
    """Technical English from another domain, available offline: the interpreter's own documentation."""
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def parse_method(name: str) -> tuple[str, tuple[str, ...]]:
    """"lizard+kd" -> ("lizard", ("kd",)); errors name what is allowed."""
    base, *variants = name.split("+")
    if base not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {base!r}; expected one of: {', '.join(METHODS)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant +{bad[0]} of {base}; expected: "
                                         + ", ".join("+" + v for v in VARIANTS))
    if variants and base == "reference":
        raise argparse.ArgumentTypeError("the reference takes no variants: it is the original model + plain LoRA")
    if variants and not METHODS[base][1]:
        raise argparse.ArgumentTypeError(f"{base} is not healed: it takes no variants")
    if "ops" in variants and "transfer" not in METHODS[base][1]:
        raise argparse.ArgumentTypeError(f"{base}+ops: its operator has no parameters of its own to train")
    if len(set(variants)) != len(variants):
        raise argparse.ArgumentTypeError(f"{name}: a variant is repeated")
    return base, tuple(variants)


def method_arg(name: str) -> str:
    parse_method(name)
    return name


def heal_config(args, stages, variants=()):
    from lincompile.heal.config import HealConfig

    cfg = HealConfig()
    cfg.data.train = [str(p) for p in sorted(args.data.glob("*.txt")) if p.name != HELD_OUT]
    cfg.data.seq_len, cfg.data.holdout, cfg.data.eval_blocks = args.seq_len, 0.01, 4
    cfg.transfer.enabled = "transfer" in stages
    cfg.transfer.tokens, cfg.transfer.steps, cfg.transfer.lr = args.transfer_tokens, None, args.transfer_lr
    cfg.lora.enabled = "lora" in stages
    cfg.lora.tokens, cfg.lora.steps, cfg.lora.lr = args.tokens, None, args.lr
    cfg.lora.r, cfg.lora.alpha, cfg.lora.batch_size = 8, 16.0, args.batch_size
    cfg.lora.distill.weight = (0.5 if args.distill is None else args.distill) if "kd" in variants else 0.0
    cfg.lora.distill.temperature = 2.0 if args.distill_temperature is None else args.distill_temperature
    cfg.lora.train_ops = "ops" in variants
    cfg.eval_every, cfg.checkpoint_every, cfg.log_every = args.eval_every, 10 ** 9, 10
    return cfg


def run_method(name, loaded, args, texts, original_scores) -> dict:
    import lincompile
    from lincompile.heal import heal
    from lincompile.heal.evaluate import evaluate

    base, variants = parse_method(name)
    spec_name, stages = METHODS[base]
    out = args.workdir / name
    name = REFERENCE if base == "reference" else name
    t0 = time.perf_counter()
    converted = lincompile.convert(loaded.model, lincompile.Spec.builtin(spec_name), tokenizer=loaded.tokenizer,
                                   source=args.model)
    converted.save(out, overwrite=True)
    del converted
    row = {"method": name, "spec": spec_name, "stages": list(stages), "variants": list(variants),
           "convert_s": round(time.perf_counter() - t0, 1)}
    if stages:
        t0 = time.perf_counter()
        report = heal(out, heal_config(args, stages, variants), device=args.device, progress=False,
                      log=lambda s: print(f"  [{name}] {s}", file=sys.stderr, flush=True))
        row["heal_s"] = round(time.perf_counter() - t0, 1)
        row["tokens"] = sum(s["tokens"] for s in report["stages"].values())
        row["heal"] = report["stages"]
        row["curve"] = heal_curve(out)
    model = lincompile.load(out, device=args.device)
    model.train(False)
    row["eval"] = {}
    for label, (stream, contexts) in texts.items():
        row["eval"][label] = evaluate({"converted": model}, stream, contexts, max_tokens=args.eval_tokens,
                                      device=args.device)["context"]
        for ctx, r in row["eval"][label].items():
            r["original"] = original_scores[label][ctx]
    print(f"{name}: " + json.dumps({k: {c: (round(v["ppl"], 2), round(v["acc"], 4)) for c, v in e.items()}
                                    for k, e in row["eval"].items()}), file=sys.stderr, flush=True)
    return row


def heal_curve(out: Path) -> list[dict]:
    """The held-out evaluations the heal logged (step, stage, loss/ppl/mse): where the run was going."""
    path = out / "heal" / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"stage": r["stage"], "step": r["step"], **r["eval"]} for r in rows if "eval" in r]


def table(rows: list[dict], reference: dict | None, original: dict, args) -> list[str]:
    ref = reference["eval"]["persuasion"] if reference else None
    head = ("| method | heal | tokens | wall (s) | PPL 512 | acc 512 | recovery 512 | PPL/ref 512 | PPL 2048 | "
            "acc 2048 | other-domain PPL 512 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in ([{"method": "original (no LoRA)", "stages": [], "eval": original}] + rows
              + ([reference] if reference else [])):
        p, o = r["eval"]["persuasion"], r["eval"].get("other", {})
        long = p.get("2048", {"ppl": float("nan"), "acc": float("nan")})
        rec = f"{100 * p['512']['acc'] / ref['512']['acc']:.1f} %" if ref else "-"
        ratio = f"{p['512']['ppl'] / ref['512']['ppl']:.3f}" if ref else "-"
        wall = f"{r.get('heal_s', 0):.0f}" if r.get("stages") else "-"
        lines.append(f"| {r['method']} | {'+'.join(r.get('stages', [])) or 'none'} | {r.get('tokens', 0):,} | {wall} "
                     f"| {p['512']['ppl']:.2f} | {p['512']['acc']:.3f} | {rec} | {ratio} | "
                     f"{long['ppl']:.2f} | {long['acc']:.3f} "
                     f"| {o.get('512', {}).get('ppl', float('nan')):.2f} |")
    return lines


def targets(rows, reference) -> list[str]:
    if reference is None or not rows:
        return ["targets: not checked (needs the reference and at least one method)"]
    ref = reference["eval"]["persuasion"]["512"]
    healed = [r for r in rows if r["stages"]]
    if not healed:
        return ["targets: no healed method"]
    best = min(healed, key=lambda r: r["eval"]["persuasion"]["512"]["ppl"])
    b = best["eval"]["persuasion"]
    out = [f"best method: {best['method']}",
           f"- PPL 512 ≤ 1.15 × reference: {b['512']['ppl']:.2f} vs {1.15 * ref['ppl']:.2f} -> "
           f"{'met' if b['512']['ppl'] <= 1.15 * ref['ppl'] else 'missed'}",
           f"- accuracy 512 ≥ 95 % of reference: {100 * b['512']['acc'] / ref['acc']:.1f} % -> "
           f"{'met' if b['512']['acc'] >= 0.95 * ref['acc'] else 'missed'}"]
    swa = next((r for r in rows if r["method"] == "swa-sinks"), None)
    if swa and "2048" in b:
        s = swa["eval"]["persuasion"]["2048"]["ppl"]
        out.append(f"- PPL 2048 below swa-sinks: {b['2048']['ppl']:.2f} vs {s:.2f} -> "
                   f"{'met' if b['2048']['ppl'] < s else 'missed'}")
    return out


def write_readme(path: Path, lines: list[str]) -> None:
    from lincompile.emit import write_text_atomic

    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = "\n".join([START, *lines, END])
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def merge(args) -> int:
    runs = [json.loads(p.read_text()) for p in args.from_json]
    rows = [r for run in runs for r in run["rows"]]
    reference = next((run["reference"] for run in runs if run.get("reference")), None)
    lines = table(rows, reference, runs[0]["original"], args)
    def describe(path, run):
        a = run["args"]
        healed = any(r.get("stages") for r in run["rows"]) or run.get("reference")
        what = (f"LoRA {a.get('tokens', '?')} tokens (batch {a.get('batch_size', '?')}, lr {a.get('lr', '?')}), "
                f"transfer {a.get('transfer_tokens', '?')}, " if healed else "no heal, ")
        return f"{path.name}: {what}seq_len {a.get('seq_len', '?')}, eval {a.get('eval_tokens', '?')} tokens, " \
               f"{a.get('device', 'device not recorded')}"

    lines += ["", "runs: " + "; ".join(describe(p, run) for p, run in zip(args.from_json, runs)), ""]
    lines += targets(rows, reference)
    print("\n".join(lines))
    if args.readme:
        write_readme(args.readme, lines)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="*", type=method_arg,
                        default=["swa-sinks", "liger-attention", "lolcats", "lizard"],
                        help=f"methods to run, in order ({', '.join(METHODS)}; variants +kd, +ops); the reference "
                             "runs last unless listed")
    parser.add_argument("--no-reference", action="store_true", help="skip the original model + LoRA reference")
    parser.add_argument("--data", type=Path, default=AUSTEN,
                        help=f"directory of .txt files: heal on all but {HELD_OUT}, evaluate on {HELD_OUT}")
    parser.add_argument("--device", default="cpu", help="torch device for healing and evaluation (cuda: one GPU)")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="LoRA token budget per method")
    parser.add_argument("--transfer-tokens", type=int, default=250_000, help="attention-transfer token budget")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--transfer-lr", type=float, default=1e-2)
    parser.add_argument("--distill", type=float, default=None, help="KL distillation weight of the +kd variants "
                        "(0 < w ≤ 1; default 0.5)")
    parser.add_argument("--distill-temperature", type=float, default=None, help="of the +kd variants (default 2)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--eval-tokens", type=int, default=32768, help="score the first N tokens of each text")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("bench-heal"))
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    parser.add_argument("--readme", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="no run: merge the results of earlier runs (--json files) into one table")
    args = parser.parse_args(argv)
    if args.from_json:
        return merge(args)

    import torch

    from lincompile.heal.data import read_documents, tokenize
    from lincompile.heal.evaluate import evaluate, hf_forward
    from lincompile.models import load_model

    kd = any("kd" in parse_method(m)[1] for m in args.methods)
    if (args.distill is not None or args.distill_temperature is not None) and not kd:
        parser.error("--distill/--distill-temperature apply to +kd methods only (e.g. --methods lizard+kd)")
    if args.distill is not None and not 0 < args.distill <= 1:
        parser.error(f"--distill must be in (0, 1], got {args.distill}")
    if args.distill_temperature is not None and not args.distill_temperature > 0:
        parser.error(f"--distill-temperature must be > 0, got {args.distill_temperature}")
    if len(set(args.methods)) != len(args.methods):
        parser.error("a method is listed twice (each writes its own directory under --workdir)")
    if args.no_reference and "reference" in args.methods:
        parser.error("--no-reference and --methods ... reference contradict each other")
    if not (args.data / HELD_OUT).is_file():
        parser.error(f"{args.data}: no {HELD_OUT} there (give --data DIR with the Austen novels as .txt files)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # every row alike: methods and reference
    methods = list(args.methods)
    if not args.no_reference and "reference" not in methods:
        methods.append("reference")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    loaded = load_model(args.model)  # converted on CPU; healed and evaluated on --device
    other = other_domain_text(args.workdir / "other-domain.txt")
    texts = {"persuasion": (tokenize(read_documents([str(args.data / HELD_OUT)]), loaded.tokenizer), args.contexts),
             "other": (tokenize(read_documents([str(other)]), loaded.tokenizer), [512])}
    original_lm = loaded.model if args.device == "cpu" else copy.deepcopy(loaded.model).to(args.device)
    original = {label: evaluate({"original": hf_forward(original_lm)}, s, c, max_tokens=args.eval_tokens,
                                device=args.device)["context"]
                for label, (s, c) in texts.items()}
    del original_lm
    original = {label: {ctx: r["original"] for ctx, r in v.items()} for label, v in original.items()}
    rows, reference, failed = [], None, []

    def save_partial():  # a run of hours keeps what it measured if it is stopped
        if args.json_path:
            args.json_path.write_text(json.dumps({"rows": rows, "reference": reference, "original": original,
                                                  "failed": failed,
                                                  "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))

    for m in methods:
        try:
            row = run_method(m, loaded, args, texts, original)
        except Exception as err:  # one method's failure must not lose the others' hours
            import traceback

            traceback.print_exc()
            failed.append(f"{m}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
            continue
        if row["method"] == REFERENCE:
            reference = row
        else:
            rows.append(row)
        save_partial()
    lines = table(rows, reference, original, args)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} CPU threads")
    lines += ["", f"LoRA budget {args.tokens:,} tokens (batch {args.batch_size} × {args.seq_len}, lr {args.lr:g}), "
              f"transfer {args.transfer_tokens:,} tokens, eval on the first {args.eval_tokens:,} tokens; total wall "
              f"time {time.perf_counter() - t_all:.0f} s on {where}", ""]
    lines += targets(rows, reference)
    lines += [f"failed: {f}" for f in failed]
    print("\n".join(lines))
    save_partial()
    if args.readme:
        write_readme(args.readme, lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
