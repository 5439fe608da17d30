"""`lincompile generate` and `lincompile export`: the runtime (lincompile/runtime.py) from the command line.

Registered on the main group by the import at the end of cli.py. Same conventions: one-line errors,
heavy imports inside the commands, machine-readable output with --json on stdout, notes on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import DEVICE, main
from .errors import LincompileError, UsageError
from .models import text_config


@main.command()
@click.argument("out", type=click.Path())
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT in the tokenizer's chat template (when it has one).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--sample", "do_sample", is_flag=True,
              help="Sample (default: greedy). --temperature, --top-k, --top-p and --seed need it.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Sampling temperature (with --sample).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Sample among the K most likely tokens (with --sample).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Nucleus sampling (with --sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token counts, timings).")
@click.option("--allow-code", is_flag=True, help="Allow the spec's user Python operators to load.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch device.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (CPU).")
def generate(out, prompt, chat, max_new_tokens, do_sample, temperature, top_k, top_p, seed, as_json, allow_code,
             device, threads):
    """Generate from the converted model in OUT, streaming tokens to stdout (constant-size state).

    PROMPT `-` reads the prompt from standard input (a file: `< prompt.txt`).

    Generation stops at an EOS token, after --max-new-tokens, or where the model runs out of positions (learned
    position embeddings, as GPT-2's): finish_reason eos, length or position_limit.
    """
    import torch

    from .runtime import load

    # Greedy decoding reads none of the sampling options: refused rather than silently ignored (as --steps with
    # --tokens in heal), and not taken to mean --sample, which would make greedy runs random by accident.
    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p", "seed")
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given and not do_sample:
        raise UsageError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} with --sample "
                         "(generation is greedy without it)")
    if prompt == "-":
        if sys.stdin.isatty():
            click.echo("reading the prompt from standard input (end it with Ctrl-D)", err=True)
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # `echo text |` adds one: not part of the prompt
    if threads:
        torch.set_num_threads(threads)

    from .emit import has_tokenizer

    # Said before minutes of loading (anything that is not an output directory, `load` says so).
    if Path(out, "lincompile.json").is_file() and not has_tokenizer(out):
        raise UsageError(f"{out} has no tokenizer files: generate needs one (copy the original model's tokenizer "
                         "files into it, or from Python pass token ids to lincompile.runtime.load(OUT).generate)")
    t0 = time.perf_counter()
    rt = load(out, allow_code=allow_code, device=device)
    tok = rt.tokenizer
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        ids = enc["input_ids"]
    else:
        if chat:
            click.echo("note: the tokenizer has no chat template: using the prompt as it is", err=True)
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(device)
    loaded = time.perf_counter()
    streamer = None
    if not as_json:
        from transformers import TextStreamer

        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = rt.generate(ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         streamer=streamer, generator=torch.Generator(device).manual_seed(seed))
    done = time.perf_counter()
    new = result[0, ids.shape[1]:].tolist()
    eos = set(rt.eos_token_ids())
    finish = "eos" if new and new[-1] in eos else "length"
    if finish == "length" and len(new) < max_new_tokens:  # stopped short of --max-new-tokens, not at an EOS
        finish = "position_limit"
        click.echo(f"note: stopped after {len(new)} tokens: the model's limit of {rt.position_limit} positions "
                   "(learned position embeddings) was reached", err=True)
    state = rt.init_state(1)
    stats = {"prompt_tokens": ids.shape[1], "new_tokens": len(new), "finish_reason": finish,
             "position_limit": rt.position_limit,
             "seconds": {"load": round(loaded - t0, 3), "generate": round(done - loaded, 3)},
             "tokens_per_s": round(len(new) / max(done - loaded, 1e-9), 2),
             "state_bytes": rt.state_bytes(state, growing=False)}
    if as_json:
        text = tok.decode(new, skip_special_tokens=True)
        click.echo(json.dumps({"prompt": prompt, "text": text, "tokens": new, **stats}, indent=2))
    else:
        click.echo(f"[{len(new)} tokens, {stats['tokens_per_s']} tok/s, finish: {finish}, state "
                   f"{stats['state_bytes'] / 2**20:.2f} MiB per sequence]", err=True)


@main.command("export")
@click.argument("out", type=click.Path())
@click.option("-o", "--output", "path", required=True, type=click.Path(), help="The .pt2 archive to write.")
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
@click.option("--allow-code", is_flag=True, help="Allow the spec's user Python operators to load.")
def export_cmd(out, path, overwrite, allow_code):
    """Export OUT's prefill and decode programs (torch.export) to one .pt2 archive and check them.

    `torch.export.load(PATH)` returns the prefill program (named "model" in the archive); both programs
    and the state layout come back with `lincompile.runtime.load_exported(PATH)`. Importing
    lincompile.runtime registers the custom op the programs call for attention.
    """
    import torch

    from .runtime import load, load_exported

    if not str(path).endswith(".pt2"):
        raise UsageError(f"{path}: the exported file must end in .pt2")
    if Path(path).is_dir():
        raise UsageError(f"{path} is a directory: give the path of the .pt2 file to write")
    if Path(path).exists() and not overwrite:
        raise UsageError(f"{path} already exists: pass --overwrite to replace it")
    click.echo(f"loading {out} …", err=True)  # each step below takes seconds to minutes on a real model
    rt = load(out, allow_code=allow_code)
    click.echo("exporting the prefill and decode programs (torch.export) …", err=True)
    t0 = time.perf_counter()
    rt.export(path)
    seconds = time.perf_counter() - t0
    click.echo("checking the written file against the runtime …", err=True)
    # Round trip: the reloaded programs must give the runtime's logits exactly.
    ex = load_exported(path)
    ids = torch.randint(0, text_config(rt.config).vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, state = rt.prefill(ids)
        got, *flat = ex.prefill(ids, torch.arange(7).expand(2, 7), *ex.init_state(2))
        step_want, _ = rt.decode(ids[:, :1], state=state)
        step_got = ex.decode(ids[:, :1], flat[0][:, None], *flat)[0]
    if not (torch.equal(want, got) and torch.equal(step_want, step_got)):
        diff = max(float((want - got).abs().max()), float((step_want - step_got).abs().max()))
        raise LincompileError(f"{path}: the reloaded programs differ from the runtime (max abs logit diff {diff:.3g})")
    size = Path(path).stat().st_size
    click.echo(f"wrote {path} ({size / 2**20:.1f} MiB: prefill + decode programs, exported in {seconds:.1f} s); "
               "reloaded, logits identical")
