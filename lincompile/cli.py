"""`lincompile` command line: apply, match, diff, validate, specs.

Errors are one line on stderr: `file:line:col: message` for specs; exit 2 for usage/spec errors, 1 for
runtime failures; `--debug` shows the traceback. Heavy imports (torch, transformers) happen inside commands.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import click

from .errors import LincompileError

_DEBUG = {"on": False}


class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP (timeout, Slurm, docker stop, a closed terminal) raised like Ctrl-C, so that the same
    clean-up runs: Python's default handling of them kills the process with temp files left behind."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _catch_termination() -> dict:
    """Install the handlers for the command's duration; returns the previous ones, for `_restore`."""
    import signal
    import threading

    previous = {}
    if threading.current_thread() is not threading.main_thread():  # signals can only be set there
        return previous
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, _raise_terminated)
    return previous


def _restore(previous: dict) -> None:
    """A process that runs commands in-process (tests, notebooks) gets its own handling back afterwards."""
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _say(message: str) -> None:
    try:
        click.echo(message, err=True)
    except OSError:  # stderr is gone (SIGHUP: the terminal closed): the exit code still tells
        pass


class _Group(click.Group):
    """Turns lincompile errors into one line and the right exit code."""

    def invoke(self, ctx):
        previous = _catch_termination()
        try:
            return self._invoke(ctx)
        finally:
            _restore(previous)

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LincompileError as err:
            if _DEBUG["on"]:
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except _Terminated as err:
            import signal

            _say(f"terminated ({signal.Signals(err.signum).name})")
            sys.exit(128 + err.signum)
        except KeyboardInterrupt:
            _say("interrupted")
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if _DEBUG["on"]:
                traceback.print_exc()
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"error: {type(err).__name__}: {first} (run with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="lincompile")
def main(debug):
    """Compile pretrained softmax-attention causal LMs into linear-attention models.

    SPEC is a YAML file or the name of a built-in spec (see `lincompile specs`); MODEL is a Hugging Face
    model directory, a .gguf file, a hub id, or the built-in alias `smollm2-135m`.
    """
    _DEBUG["on"] = debug


class Device(click.ParamType):
    """A torch device string that this machine has, checked before any model is loaded (a usage error, exit 2)."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)", param, ctx)
        if dev.type == "cpu":
            return "cpu"  # "cpu:0" is not a device safetensors takes
        backend = getattr(torch, dev.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            self.fail(f"{value!r}: this machine has no {dev.type} device", param, ctx)
        count = getattr(backend, "device_count", None)
        if dev.index is not None and callable(count) and dev.index >= count():
            self.fail(f"{value!r}: this machine has {count()} {dev.type} device(s)", param, ctx)
        return str(dev)


DEVICE = Device()


def _model_options(f):
    f = click.option("--allow-code", is_flag=True, help="Allow specs to load user Python operators/patterns.")(f)
    f = click.option("--device", type=DEVICE, default="cpu", show_default=True, help="torch device for the model.")(f)
    f = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                     show_default=True, help="Weights dtype.")(f)
    return f


class _Stages:
    """A tqdm bar over the pipeline stages (on stderr, so stdout stays clean for --json)."""

    def __init__(self, names, enabled=True):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), desc="lincompile", unit="pass", file=sys.stderr, disable=not enabled,
                        bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}")
        self.started = False

    def __call__(self, stage):
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(f"lincompile: {stage:<10}")

    def close(self):
        if self.started:
            self.bar.update(1)
        self.bar.close()


def _load(spec_ref, model_ref, dtype, device, timings, stages=None):
    from .models import load_model
    from .spec import Spec

    spec = Spec.resolve(spec_ref)
    if stages:
        stages("load")
    t0 = time.perf_counter()
    loaded = load_model(model_ref, dtype=dtype, device=device, attn_implementation=spec.capture.attn_implementation)
    timings["load"] = round(time.perf_counter() - t0, 4)
    return spec, loaded


@main.command()
@click.argument("spec")
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output directory (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@_model_options
def apply(spec, model, out, overwrite, as_json, dtype, device, allow_code):
    """Convert MODEL with SPEC and write the converted model to OUT."""
    from pathlib import Path

    from .emit import check_destination
    from .pipeline import convert
    from .report import summary_lines

    check_destination(out, overwrite)  # before the slow part
    timings: dict = {}
    stages = _Stages(["load", "capture", "match", "substitute", "fuse", "verify", "save"], enabled=not as_json)
    try:
        spec_obj, loaded = _load(spec, model, dtype, device, timings, stages)
        converted = convert(loaded.model, spec_obj, tokenizer=loaded.tokenizer, allow_code=allow_code, source=model,
                            timings=timings, progress=stages)
        converted.report.setdefault("notes", []).extend(loaded.notes)
        stages("save")
        t0 = time.perf_counter()
        timings["save"] = 0.0
        converted.generation_config = getattr(loaded.model, "generation_config", None)
        converted.save(out, overwrite=overwrite)
        timings["save"] = round(time.perf_counter() - t0, 4)
        # The report on disk gets the save time too.
        from .emit import write_text_atomic
        from .report import render_markdown

        write_text_atomic(Path(out) / "report.json", json.dumps(converted.report, indent=2, default=str))
        write_text_atomic(Path(out) / "report.md", render_markdown(converted.report))
    finally:
        stages.close()
    if as_json:
        click.echo(json.dumps(converted.report, indent=2, default=str))
    else:
        for line in summary_lines(converted.report):
            click.echo(line)
        click.echo(f"wrote {out}")


@main.command("match")
@click.argument("spec")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the sites as JSON.")
@_model_options
def match_cmd(spec, model, as_json, dtype, device, allow_code):
    """Dry run: list the attention sites SPEC would convert in MODEL, and near misses."""
    from .passes.capture import capture
    from .passes.match import match, select

    timings: dict = {}
    spec_obj, loaded = _load(spec, model, dtype, device, timings)
    captured = capture(loaded.model, spec_obj.capture)
    result = match(captured, spec_obj)
    try:
        chosen, refused = {id(s): r for s, r in select(result, spec_obj)}, None
    except LincompileError as err:  # a dry run still shows what was found, then why the spec would fail
        chosen, refused = {}, err
    rows = []
    for s in result.sites:
        rule = chosen.get(id(s))
        rows.append({**s.to_json(), "op": rule.op if rule else "(spec error)" if refused else "(not selected)"})
    if as_json:
        click.echo(json.dumps({"sites": rows, "near_misses": [m.__dict__ for m in result.near_misses],
                               "notes": captured.notes, **({"error": str(refused)} if refused else {})},
                              indent=2, default=str))
        if refused:
            raise refused
        return
    click.echo(f"{len(result.sites)} sites in {type(loaded.model).__name__} (patterns: {', '.join(result.patterns_tried)})")
    header = ["layer", "module", "pattern", "mask", "op", "heads", "q", "k_kv", "pre-rope", "hidden", "o_proj"]
    table = []
    for r in rows:
        b = r["bindings"]
        mask = r.get("mask_kind", "") + (f"({r['window']})" if r.get("window") else "")
        table.append([str(r["layer"]), r["module"], r["pattern"], mask, r["op"],
                      f"{r.get('num_heads')}/{r.get('num_kv_heads')}x{r.get('head_dim')}", b["q"], b["k_kv"],
                      "yes" if r.get("rope") else "absent", "yes" if b["hidden"] != "absent" else "absent",
                      r.get("o_proj", "absent")])
    _print_table(header, table)
    for note in sorted({n for r in rows for n in r["notes"]} | set(captured.notes)):
        click.echo(f"note: {note}")
    if result.near_misses:
        click.echo("near misses:")
        for m in result.near_misses:
            click.echo(f"  {m.node} in {m.module}: {m.reason}")
    if refused:
        raise refused


def _print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


@main.command()
@click.argument("spec")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["text", "html", "dot"]), default="text", show_default=True)
@click.option("--layer", type=int, default=None, help="Show this layer's site before and after.")
@click.option("-o", "--output", "out", type=click.Path(), default=None, help="Write to FILE instead of stdout.")
@_model_options
def diff(spec, model, fmt, layer, out, dtype, device, allow_code):
    """Show what each pass changed in MODEL's graph under SPEC."""
    from .pipeline import convert

    timings: dict = {}
    spec_obj, loaded = _load(spec, model, dtype, device, timings)
    converted = convert(loaded.model, spec_obj, allow_code=allow_code, source=model, timings=timings, verify=False)
    d = converted.diff()
    if layer is not None:
        from .errors import UsageError

        # The same list whatever the layer: the layers whose attention an operator replaced (not `op: keep`).
        have = d.converted_layers()
        kept = sorted({s.layer for s in converted.sites if s.op == "keep"})
        if layer in kept:
            raise UsageError(f"--layer {layer}: that layer is kept as softmax (op: keep), so no pass changed it "
                             f"(converted layers: {have})")
        if layer not in have:
            raise UsageError(f"--layer {layer}: no converted site in that layer (converted layers: {have})")
    text = {"text": d.to_text, "html": d.to_html, "dot": d.to_dot}[fmt](layer=layer)
    if out:
        from pathlib import Path

        from .emit import write_text_atomic

        write_text_atomic(Path(out), text)
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text)


@main.command()
@click.argument("spec")
def validate(spec):
    """Check SPEC (file or built-in name) without loading a model (heal data paths must exist)."""
    from pathlib import Path

    from .errors import UsageError
    from .spec import Spec

    s = Spec.resolve(spec)

    def scope(r):
        parts = [f"layers {r.layers.raw}"] + ([f"modules {r.modules}"] if r.modules else [])
        return ", ".join(parts + ([f"mask {'/'.join(r.mask)}"] if "any" not in r.mask else []))

    heal = getattr(s, "heal", None)
    missing = [p for p in (heal.data.train + heal.data.eval if heal else [])
               if not p.startswith("hf:") and not Path(p).exists()]
    if missing:
        raise UsageError(f"{s.source}: heal.data: not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                               if len(missing) > 1 else ""))
    ops = ", ".join(f"{r.op} ({scope(r)})" for r in s.rules)
    click.echo(f"ok: {s.source}: spec {s.name}, {len(s.rules)} rule(s): {ops}")


@main.group(invoke_without_command=True)
@click.pass_context
def specs(ctx):
    """List the built-in specs (`lincompile specs show NAME` prints one)."""
    if ctx.invoked_subcommand is None:
        from .spec import builtin_description, builtin_specs

        names = builtin_specs()
        width = max(len(n) for n in names)
        for name in names:
            click.echo(f"{name.ljust(width)}  {builtin_description(name)}")


@specs.command("show")
@click.argument("name")
def specs_show(name):
    """Print a built-in spec."""
    from importlib import resources

    from .errors import UsageError, did_you_mean
    from .spec import builtin_specs

    names = builtin_specs()
    if name not in names:
        raise UsageError(f'no built-in spec "{name}"{did_you_mean(name, names)}; built-ins: {", ".join(names)}')
    click.echo(resources.files("lincompile.specs").joinpath(f"{name}.yaml").read_text(encoding="utf-8"), nl=False)


# Commands defined in their own modules register themselves on `main`.
from . import cli_heal  # noqa: E402,F401
from . import cli_runtime  # noqa: E402,F401

if __name__ == "__main__":
    main()
