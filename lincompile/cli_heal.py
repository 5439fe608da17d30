"""`lincompile heal` and `lincompile eval`, and healing after `lincompile apply` when the spec has a heal: section.

    lincompile heal OUT --data ../shared/data/austen --steps 150 --lr 1e-3
    lincompile heal OUT --resume                      # after an interruption: continues the saved run
    torchrun --nproc-per-node 2 -m lincompile heal OUT --data text/ --batch-size 1
    lincompile eval OUT --data persuasion.txt --context 512 2048 --json

Settings come from (later wins): the defaults, the heal: section of OUT/spec.yaml (or of --config FILE), the
flags. Errors are one line (exit 2 for usage, 1 at run time), as for every lincompile command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import DEVICE, main
from .errors import UsageError
from .models import text_config

# flag -> (section, field) of HealConfig; None values are "not given"
_FLAGS = {
    "steps": ("lora", "steps"), "tokens": ("lora", "tokens"), "lr": ("lora", "lr"),
    "transfer_steps": ("transfer", "steps"), "transfer_tokens": ("transfer", "tokens"),
    "transfer_lr": ("transfer", "lr"), "r": ("lora", "r"), "alpha": ("lora", "alpha"),
    "dropout": ("lora", "dropout"), "distill": ("lora", "distill.weight"),
    "temperature": ("lora", "distill.temperature"), "seq_len": ("data", "seq_len"),
    "holdout": ("data", "holdout"), "tokenizer": ("data", "tokenizer"), "eval_every": (None, "eval_every"),
    "checkpoint_every": (None, "checkpoint_every"), "seed": (None, "seed"),
}
_BOTH_STAGES = ("batch_size", "grad_accum", "warmup", "clip", "gradient_checkpointing")


def _d(flag: str) -> dict:
    """The default of `flag`'s option, HealConfig's, for `lincompile heal --help` to show. A value left at its
    default counts as not given (`_given`): the heal: section of the spec replaces it."""
    from .heal.config import HealConfig

    section, name = _FLAGS.get(flag, ("lora", flag))
    target = HealConfig() if section is None else getattr(HealConfig(), section)
    for part in name.split("."):
        target = getattr(target, part)
    return {"default": target, "show_default": True}


def _given(ctx: click.Context, flags: dict) -> dict:
    """The flags the user gave; the others None, as when no default is shown."""
    from click.core import ParameterSource

    return {k: (None if ctx.get_parameter_source(k) in (ParameterSource.DEFAULT, None) else v)
            for k, v in flags.items()}


def load_heal_section(path: Path, required: bool = False):
    """The heal: section of a spec (or any YAML with one) as a HealConfig; defaults when it has none, unless
    `required` (a --config file without one is a mistake, not a request for the defaults)."""
    from .heal.config import HealConfig, parse_heal
    from .spec import load_yaml

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    data, loc = load_yaml(path.read_text(encoding="utf-8"), str(path))
    if required and not (isinstance(data, dict) and "heal" in data):
        keys = f" (its top-level keys: {', '.join(map(str, data))})" if isinstance(data, dict) and data else ""
        raise UsageError(f"{path}: no top-level heal: key{keys}; --config takes a YAML file whose settings are "
                         "under heal:, as in a spec (heal: {data: ..., lora: ...})")
    if not isinstance(data, dict) or data.get("heal") is None:
        return HealConfig()
    return parse_heal(data["heal"], loc)


def _one_budget(flags: dict) -> None:
    """A stage's budget is steps or tokens, not both (a spec may set either; a flag replaces it)."""
    for steps, tokens in (("steps", "tokens"), ("transfer_steps", "transfer_tokens")):
        if flags.get(steps) is not None and flags.get(tokens) is not None:
            raise UsageError(f"--{steps.replace('_', '-')} and --{tokens.replace('_', '-')} are two ways to set "
                             "one budget: give one")


def _apply_flags(cfg, flags: dict, data, eval_data, stage: str):
    if data:
        cfg.data.train = [str(Path(p).resolve()) if not p.startswith("hf:") else p for p in data]
    if eval_data:
        cfg.data.eval = [str(Path(p).resolve()) if not p.startswith("hf:") else p for p in eval_data]
    for flag, (section, name) in _FLAGS.items():
        value = flags.get(flag)
        if value is None:
            continue
        target = cfg if section is None else getattr(cfg, section)
        if name.startswith("distill."):
            target, name = target.distill, name.split(".", 1)[1]
        setattr(target, name, value)
        if name in ("steps", "tokens"):  # a budget given one way replaces the other
            setattr(target, "tokens" if name == "steps" else "steps", None)
    for flag in _BOTH_STAGES:
        if flags.get(flag) is not None:
            setattr(cfg.transfer, flag, flags[flag])
            setattr(cfg.lora, flag, flags[flag])
    if stage != "all":
        cfg.transfer.enabled, cfg.lora.enabled = stage == "transfer", stage == "lora"
    return cfg


@main.command()
@click.argument("out", type=click.Path())
@click.option("--data", multiple=True, help="Training text: file, directory, .jsonl or hf:NAME (repeatable).")
@click.option("--eval-data", multiple=True, help="Held-out text (default: the end of --data is held out).")
@click.option("--config", "config_file", type=click.Path(),
              help="YAML file with a top-level heal: section; it replaces OUT/spec.yaml's.")
@click.option("--stage", type=click.Choice(["all", "transfer", "lora"]), default="all", show_default=True,
              help="Run one stage only; the other keeps its result (LoRA builds on the last attention transfer; "
                   "rerunning attention transfer drops an earlier LoRA).")
@click.option("--steps", type=click.IntRange(min=1), **_d("steps"), help="LoRA optimizer steps.")
@click.option("--tokens", type=click.IntRange(min=1), help="LoRA token budget (instead of --steps).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), **_d("lr"), help="LoRA learning rate.")
@click.option("--transfer-steps", type=click.IntRange(min=1), **_d("transfer_steps"),
              help="Attention-transfer steps.")
@click.option("--transfer-tokens", type=click.IntRange(min=1), help="Attention-transfer token budget.")
@click.option("--transfer-lr", type=click.FloatRange(min=0, min_open=True), **_d("transfer_lr"),
              help="Attention-transfer learning rate.")
@click.option("--r", type=click.IntRange(min=1), **_d("r"), help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), **_d("alpha"),
              help="LoRA alpha (scaling alpha / r).")
@click.option("--dropout", type=click.FloatRange(0, 0.99), **_d("dropout"), help="LoRA dropout.")
@click.option("--distill", type=click.FloatRange(0, 1), **_d("distill"),
              help="Weight of KL distillation from the original model.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), **_d("temperature"),
              help="Distillation temperature.")
@click.option("--seq-len", type=click.IntRange(min=2), **_d("seq_len"), help="Tokens per training block.")
@click.option("--holdout", type=click.FloatRange(0, 0.5), **_d("holdout"),
              help="Fraction of --data held out for evaluation.")
@click.option("--batch-size", type=click.IntRange(min=1), **_d("batch_size"),
              help="Sequences per micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(min=1), **_d("grad_accum"),
              help="Micro-batches per optimizer step.")
@click.option("--warmup", type=click.IntRange(min=0), show_default="10, at most a tenth of the stage",
              help="Warm-up steps (both stages; fewer than the stage's steps).")
@click.option("--clip", type=click.FloatRange(min=0, min_open=True), **_d("clip"),
              help="Max gradient norm (both stages).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True,
              help="Recompute each layer's activations in backward (both stages), and run the LM head and its "
                   "loss a chunk of tokens at a time (LoRA): less memory, one more forward per step; may be "
                   "switched on resume.")
@click.option("--eval-every", type=click.IntRange(min=1), **_d("eval_every"),
              help="Evaluate on held-out blocks every N steps.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), **_d("checkpoint_every"),
              help="Checkpoint every N steps.")
@click.option("--seed", type=click.IntRange(min=0), **_d("seed"),
              help="Seed of LoRA initialisation and dropout.")
@click.option("--tokenizer", type=click.Choice(["auto", "bytes"]), **_d("tokenizer"),
              help="bytes: UTF-8 bytes as token ids.")
@click.option("--resume", is_flag=True, help="Continue the interrupted heal in OUT with its saved settings.")
@click.option("--restart", is_flag=True, help="Discard an unfinished heal in OUT and start over.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="torch device (cuda: one GPU per process).")
@click.option("--allow-code", is_flag=True, help="Allow specs with user Python operators.")
@click.option("--no-progress", is_flag=True, help="No progress bar or log lines.")
@click.pass_context
def heal(ctx, out, data, eval_data, config_file, stage, resume, restart, device, allow_code, no_progress, **flags):
    """Heal the converted model in OUT: attention transfer, then LoRA; OUT becomes the healed model.

    The defaults shown are those of a spec without a heal: section; OUT/spec.yaml's heal: section (or
    --config's) replaces them, and the options replace both.
    """
    from .heal.outdir import OutDir
    from .heal.run import heal as run_heal

    flags = _given(ctx, flags)
    _one_budget(flags)
    outdir = OutDir(out)
    given = [k for k, v in flags.items() if v is not None] + (["data"] if data else []) + \
        (["eval_data"] if eval_data else []) + (["config"] if config_file else []) + \
        (["stage"] if stage != "all" else [])
    if resume:
        if restart:
            raise UsageError("--resume and --restart contradict each other")
        given = [g for g in given if g != "gradient_checkpointing"]  # memory, not results: may change on resume
        if given:
            names = ", ".join("--" + g.replace("_", "-") for g in given)
            raise UsageError(f"--resume continues the saved run with its settings; remove {names}")
        run_heal(out, None, resume=True, device=device, allow_code=allow_code, progress=not no_progress, log=_log,
                 gradient_checkpointing=flags["gradient_checkpointing"])
        return
    if config_file:
        cfg = load_heal_section(Path(config_file), required=True)
    else:
        cfg = load_heal_section(outdir.root / "spec.yaml")
    cfg = _apply_flags(cfg, flags, data, eval_data, stage)
    if not cfg.data.train:
        raise UsageError("no healing data: pass --data PATH (or set heal.data.train in the spec)")
    run_heal(out, cfg, restart=restart, device=device, allow_code=allow_code, progress=not no_progress, log=_log)


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # stays clear of a running progress bar


# --------------------------------------------------------------------------------------------------


class _SpacedContexts(click.Command):
    """Accept `--context 512 2048` (as the docs write it) by rewriting it to repeated options first."""

    def parse_args(self, ctx, args):
        fixed, i = [], 0
        while i < len(args):
            fixed.append(args[i])
            if args[i] == "--context":
                i += 1
                values = []
                while i < len(args) and args[i].isdigit():
                    values.append(args[i])
                    i += 1
                if values:
                    fixed[-1:] = [x for v in values for x in ("--context", v)]
                continue
            i += 1
        return super().parse_args(ctx, fixed)


@main.command("eval", cls=_SpacedContexts)
@click.argument("model")
@click.option("--data", multiple=True, required=True, help="Held-out text: file, directory, .jsonl or hf:NAME.")
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=2), help="Window length(s) [512].")
@click.option("--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the text.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--adapter", is_flag=True, help="OUT: load the LoRA adapters unmerged (heal/adapter).")
@click.option("--no-original", is_flag=True, help="OUT: skip the original model.")
@click.option("--tokenizer", type=click.Choice(["auto", "bytes"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--allow-code", is_flag=True, help="Allow specs with user Python operators.")
def eval_cmd(model, data, contexts, max_tokens, batch_size, adapter, no_original, tokenizer, as_json, device,
             allow_code):
    """Perplexity and next-token accuracy of MODEL (a converted OUT dir, or any model) on held-out text.

    For an OUT directory the original model is scored on the same windows, with recovery (accuracy ratio)
    and the PPL ratio.
    """
    from .heal.data import get_tokenizer, read_documents, tokenize
    from .heal.evaluate import evaluate, hf_forward, table_lines

    contexts = list(dict.fromkeys(contexts)) or [512]  # a repeated --context is scored once
    docs = read_documents(list(data))
    if (Path(model) / "lincompile.json").is_file():
        from .heal.outdir import OutDir
        from .passes.capture import check_length

        # The converted graph guards its input length: refuse up front rather than fail inside it.
        outdir = OutDir(model)
        check_length("--context", max(contexts), model, outdir.config, outdir.spec.capture)
    models, tok, vocab = _eval_models(model, adapter, no_original, device, allow_code)
    stream = tokenize(docs, get_tokenizer(tok, tokenizer, vocab))
    fwd = {k: (m.train(False) if k == "converted" else hf_forward(m)) for k, m in models.items()}
    result = evaluate(fwd, stream, contexts, max_tokens=max_tokens, batch_size=batch_size, device=device,
                      progress=None if as_json else (lambda s: click.echo(f"scoring {s}", err=True)))
    result["model"] = model
    result["data"] = list(data)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for line in table_lines(result):
        click.echo(line)


def _eval_models(ref: str, adapter: bool, no_original: bool, device: str, allow_code: bool):
    """{"converted": ..., "original": ...} for an OUT dir; {"model": model} for any other model."""
    if (Path(ref) / "lincompile.json").is_file():
        from . import load
        from .heal.lora import load_adapter
        from .heal.outdir import OutDir

        outdir = OutDir(ref)
        if adapter:
            converted = load_adapter(ref, allow_code, device)
        else:
            converted = load(ref, allow_code=allow_code, device=device)
        models = {"converted": converted}
        if not no_original:
            models["original"] = outdir.build_lm(device=device)
        return models, outdir.tokenizer(), text_config(outdir.config).vocab_size
    if adapter:
        raise UsageError(f"--adapter needs a lincompile output directory; {ref} is not one")
    from .models import load_model

    loaded = load_model(ref, device=device)
    return {"model": loaded.model}, loaded.tokenizer, text_config(loaded.model.config).vocab_size


@main.command("lm-eval")
@click.argument("out", type=click.Path())
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names.")
@click.option("--include-path", type=click.Path(), help="Directory of extra task YAML files.")
@click.option("--limit", type=click.IntRange(min=1), help="Documents per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Examples in each prompt [each task's own default].")
@click.option("--adapter", is_flag=True, help="Load the LoRA adapters unmerged (heal/adapter).")
@click.option("--max-length", type=click.IntRange(min=2),
              help="Context length in tokens [what the converted graph takes: capture.max_seq_len, or the "
                   "model's position limit if smaller].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
def lm_eval_cmd(out, tasks, include_path, limit, num_fewshot, adapter, max_length, as_json, device):
    """Run lm-evaluation-harness tasks on a converted model (needs: pip install lm-eval)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("lincompile lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    from .heal.lm_eval_adapter import LincompileLM

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = None
    if include_path:  # indexing the ~15 000 built-in tasks takes a while: only when the local ones don't do
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in names):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f'unknown lm-eval task "{unknown[0]}" (see `lm_eval --tasks list`; local YAML tasks need '
                         "--include-path)")
    model = LincompileLM(path=out, adapter=adapter, max_length=max_length, device=device)
    result = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                     num_fewshot=num_fewshot, log_samples=False)
    scores = {task: {k: v for k, v in r.items() if isinstance(v, (int, float))}
              for task, r in result["results"].items()}
    if as_json:
        click.echo(json.dumps({"results": scores}, indent=2))
        return
    for task, metrics in scores.items():
        click.echo(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


# --------------------------------------------------------------------------------------------------
# `lincompile apply` heals afterwards when its spec has a heal: section with data. The command itself lives
# in cli.py; its callback is wrapped here so that healing stays out of the compiler's CLI module.

_apply = main.commands["apply"]
_apply_callback = _apply.callback
_apply.params.append(click.Option(["--no-heal"], is_flag=True, help="Skip the spec's heal: section."))


def _apply_then_heal(no_heal=False, **kwargs):
    from .spec import Spec

    spec = Spec.resolve(kwargs["spec"])
    cfg = None if no_heal else getattr(spec, "heal", None)
    if cfg is not None and cfg.data.train:
        _check_heal_data(cfg)  # before the conversion: a typo in a data path should not cost a conversion
    result = _apply_callback(**kwargs)
    if cfg is None:
        return result
    out = kwargs["out"]
    if not cfg.data.train:
        click.echo(f"note: the spec has a heal: section without heal.data.train: run `lincompile heal "
                   f"{out} --data PATH`", err=True)
        return result
    from .errors import LincompileError
    from .heal.run import heal as run_heal

    # heal logs its own "healed OUT: …" line, as `lincompile heal` does.
    try:
        run_heal(out, cfg, restart=True, device=kwargs.get("device", "cpu"),
                 allow_code=kwargs.get("allow_code", False), progress=not kwargs.get("as_json"), log=_log)
    except LincompileError as err:
        again = LincompileError(f"{err} ({out} was written, converted but not healed: fix this and run "
                                f"`lincompile heal {out}` to heal it, with --resume or --restart if it left "
                                "checkpoints)")
        again.exit_code = err.exit_code
        raise again from err
    return result


def _check_heal_data(cfg) -> None:
    """What healing checks first, done before `apply` converts: the data can be read, LoRA's warm-up fits its
    stage. (Tokenising and packing need the converted model's tokenizer: heal does them.)"""
    from .heal.data import read_documents
    from .heal.run import check_warmup

    read_documents(cfg.data.train)
    if cfg.data.eval:
        read_documents(cfg.data.eval)
    check_warmup(cfg, stages=("lora",))  # transfer's once heal knows it runs (operators with parameters)


_apply.callback = _apply_then_heal
