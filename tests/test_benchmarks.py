"""benchmarks/heal.py without a model: method names and variants, and the table, targets and README block
that `--from-json` builds from saved runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heal_bench():
    spec = importlib.util.spec_from_file_location("heal_bench", ROOT / "benchmarks" / "heal.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_method_names_and_variants(heal_bench):
    assert heal_bench.parse_method("lizard") == ("lizard", ())
    assert heal_bench.parse_method("lizard+ops+kd") == ("lizard", ("ops", "kd"))
    assert heal_bench.parse_method("liger-attention+kd") == ("liger-attention", ("kd",))
    for bad, needle in [("foo", "unknown method"), ("lizard+fast", "unknown variant"),
                        ("reference+kd", "no variants"), ("swa-sinks+kd", "not healed"),
                        ("liger-attention+ops", "no parameters"), ("lizard+kd+kd", "repeated")]:
        with pytest.raises(argparse.ArgumentTypeError, match=needle):
            heal_bench.parse_method(bad)


def scores(ppl512, acc512, ppl2048):
    return {"persuasion": {"512": {"ppl": ppl512, "acc": acc512}, "2048": {"ppl": ppl2048, "acc": acc512}},
            "other": {"512": {"ppl": 20.0, "acc": 0.4}}}


def run_json(path: Path, rows, reference, tokens=1000):
    original = {"persuasion": {"512": {"ppl": 35.0, "acc": 0.33}, "2048": {"ppl": 30.0, "acc": 0.34}},
                "other": {"512": {"ppl": 14.0, "acc": 0.47}}}
    args = {"tokens": tokens, "batch_size": 8, "lr": 0.002, "transfer_tokens": 250, "seq_len": 512,
            "eval_tokens": 4096, "device": "cuda"}
    path.write_text(json.dumps({"rows": rows, "reference": reference, "original": original, "failed": [],
                                "args": {k: str(v) for k, v in args.items()}}))
    return path


def row(method, stages, ev):
    return {"method": method, "stages": stages, "tokens": 1250 if stages else 0, "heal_s": 12.0, "eval": ev}


def test_merge_table_targets_and_readme(heal_bench, tmp_path, capsys):
    ref = row(heal_bench.REFERENCE, ["lora"], scores(28.0, 0.36, 25.0))
    a = run_json(tmp_path / "a.json", [row("lizard", ["transfer", "lora"], scores(32.0, 0.34, 30.0)),
                                       row("swa-sinks", [], scores(42.0, 0.31, 40.0))], ref)
    b = run_json(tmp_path / "b.json", [row("lolcats", ["transfer", "lora"], scores(31.0, 0.345, 50.0))], None)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{heal_bench.START}\nold table\n{heal_bench.END}\noutro\n")
    assert heal_bench.main(["--from-json", str(a), str(b), "--readme", str(readme)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(lines) == {"method", "original (no LoRA)", "lizard", "swa-sinks", "lolcats", heal_bench.REFERENCE}
    assert "| 94.4 % | 1.143 |" in lines["lizard"]  # 0.34 / 0.36 and 32 / 28
    assert "| 95.8 % | 1.107 |" in lines["lolcats"]
    assert "| 100.0 % | 1.000 |" in lines[heal_bench.REFERENCE]
    # the best healed method by PPL at 512 is lolcats: PPL and accuracy met, but worse than swa-sinks at 2048
    assert "best method: lolcats" in out
    assert "31.00 vs 32.20 -> met" in out and "95.8 % -> met" in out and "50.00 vs 40.00 -> missed" in out
    assert "a.json: LoRA 1000 tokens (batch 8, lr 0.002)" in out and "cuda" in out
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert text.count(heal_bench.START) == 1 and "best method: lolcats" in text


def test_targets_need_a_reference(heal_bench, tmp_path, capsys):
    a = run_json(tmp_path / "a.json", [row("lizard", ["transfer", "lora"], scores(32.0, 0.34, 30.0))], None)
    assert heal_bench.main(["--from-json", str(a)]) == 0
    out = capsys.readouterr().out
    assert "targets: not checked" in out and "| lizard |" in out and "| - | - |" in out


def test_kernel_resources_compiles_for_a_gpu_without_one(tmp_path):
    """benchmarks/kernel_resources.py: the intra-chunk kernels compile for sm_90 here (no CUDA device) and
    the cubin's resource usage is read back."""
    pytest.importorskip("triton")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled cuobjdump")
    import subprocess
    import sys

    out = tmp_path / "res.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--warps", "4",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    labels = ["_attn_intra", "_attn_intra_split", "_attn_intra_mm", "_attn_intra_mm raw gates", "_o_fwd",
              "_o_fwd raw gates", "_o_fwd_mm", "_h_fwd", "_h_fwd raw gates", "_dqk_bwd rows", "_dqk_bwd matmul",
              "_dqk_bwd matmul carry", "_dqk_bwd matmul intra", "_dqk_inter", "_dqk_inter carry", "_dv_bwd",
              "_dv_bwd fused", "_fwd_scan"]
    assert [r["kernel"] for r in rows] == labels
    for r in rows:
        assert r["registers"] > 0 and r["shared_bytes"] > 0 and r["programs_per_sm"] >= 1
        assert f"| {r['kernel']} | 4 | 64 | {r['registers']} |" in run.stdout
    by = {r["kernel"]: r for r in rows}
    intra, split, mm = by["_attn_intra"], by["_attn_intra_split"], by["_attn_intra_mm"]
    # what the split kernel is for (README): fewer registers, more programs per SM, no spills
    assert split["registers"] < intra["registers"] and split["programs_per_sm"] > intra["programs_per_sm"]
    assert split["stack_bytes"] == split["local_bytes"] == 0
    # the default's kernels fit without spilling (README); the matmul form needs fewer registers than the rows
    assert mm["stack_bytes"] == mm["local_bytes"] == 0 and mm["registers"] < intra["registers"]
    for name in ("_o_fwd_mm", "_h_fwd raw gates", "_attn_intra_mm raw gates", "_o_fwd raw gates",
                 "_dqk_bwd matmul", "_dv_bwd fused"):
        assert by[name]["stack_bytes"] == by[name]["local_bytes"] == 0, name
    # tensor-core instructions (README): the 64-row products are wgmma, the 16-row-block kernels mma.sync only
    for name in ("_o_fwd", "_h_fwd", "_dv_bwd", "_dqk_inter"):
        assert by[name]["tensor_core"]["wgmma"] > 0 and by[name]["tensor_core"]["mma.sync"] == 0, name
    # dqk "split": without the inter-chunk products, _dqk_bwd needs fewer registers and half the mma.sync
    intra_only = by["_dqk_bwd matmul intra"]
    assert intra_only["registers"] < by["_dqk_bwd matmul"]["registers"]
    assert intra_only["tensor_core"]["mma.sync"] < by["_dqk_bwd matmul"]["tensor_core"]["mma.sync"]
    for name in ("_attn_intra_mm", "_dqk_bwd matmul", "_dqk_bwd matmul intra"):
        assert by[name]["tensor_core"]["wgmma"] == 0 and by[name]["tensor_core"]["mma.sync"] > 0, name
    # scan_forward: the state update is a 64-row product (wgmma), the output's 16-row blocks are mma.sync
    assert by["_fwd_scan"]["tensor_core"]["wgmma"] > 0 and by["_fwd_scan"]["tensor_core"]["mma.sync"] > 0


def test_kernel_compile_records_and_compiles_every_launch(tmp_path):
    """benchmarks/kernel_compile.py: the launches of liger_attention's forward and backward (both forward forms,
    so chunk_gla's, swa_attention's and the prologue's kernels too), recorded in the interpreter, all compile
    for sm_90 here, and each names its kernel, launch options and resources."""
    pytest.importorskip("triton")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no bundled cuobjdump")
    import subprocess
    import sys

    out = tmp_path / "compile.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--head-dim", "32",
                          "--ops", "liger", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"].split()[0] for r in rows}
    assert {"_h_fwd", "_attn_intra_mm", "_o_fwd", "_dh_bwd", "_dqk_bwd", "_dv_bwd", "_swa_fwd_kernel",
            "_swa_bwd_dq_kernel", "_swa_bwd_dkdv_kernel", "_prologue_kernel", "_prologue_bwd_kernel",
            "_liger_fwd_kernel"} <= kernels
    for r in rows:
        assert "error" not in r and r["registers"] > 0 and r["programs_per_sm"] >= 1, r
        assert f"| {r['kernel']} | {r['module']} |" in run.stdout
    swa = [r for r in rows if r["module"] == "triton_swa"]
    # the GPU's launch choices, not the interpreter's
    assert all("DT=bf16" in r["kernel"] and r["num_warps"] == 4 for r in swa)
    assert f"{len(rows)} compiled, 0 failed" in run.stdout


def test_kernel_compile_rejects_bad_input(tmp_path):
    """An unknown variant, and a launches file that is not what --save-launches writes: one line, exit 1."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = str(ROOT / "benchmarks" / "kernel_compile.py")
    run = subprocess.run([sys.executable, script, "--variants", "fastest"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "unknown variant(s) fastest; known: default," in run.stderr
    bad = tmp_path / "compile.json"
    bad.write_text('{"rows": []}')
    run = subprocess.run([sys.executable, script, "--launches", str(bad)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"kernel_compile: {bad} is not a list of recorded launches (from --save-launches)")


def _kernels_gpu(tmp_path, *args):
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    out = tmp_path / "k.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--smoke", *args, "--json",
                          str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text()), run.stdout


def test_kernels_gpu_tune_smoke(tmp_path):
    """benchmarks/kernels_gpu.py --tune on the CPU (interpreter, tiny sizes): every variant asked for is checked
    and timed, the best one is named, and the finished JSON is not marked partial."""
    res, stdout = _kernels_gpu(tmp_path, "--tune", "--variants", "default", "low carry keep b")
    assert [r["variant"] for r in res["rows"]] == ["default", "low carry keep b"]
    for r in res["rows"]:
        assert "error" not in r, r
        assert set(r["errors"]) == {"o", "final_state", "dq", "dk", "dv", "dg", "dS0"}
        assert r["max_rel_err"] <= 1e-2 and r["fwd_ms_128"] > 0 and r["fwd_bwd_ms_128"] > 0
    assert res["best"] in ("default", "low carry keep b") and "partial" not in res
    assert set(res["sdpa"]) == {"fwd_ms_64", "fwd_bwd_ms_64", "fwd_ms_128", "fwd_bwd_ms_128"}
    assert f"best: {res['best']}" in stdout


def test_kernels_gpu_warm_smoke(tmp_path):
    """--tune --warm (what benchmarks/gpu_session.sh runs per variant, in parallel, to fill Triton's cache): each
    case runs once, errors are still checked, and nothing is compared (no SDPA, no best); --warm alone is refused."""
    import subprocess
    import sys

    res, _ = _kernels_gpu(tmp_path, "--tune", "--warm", "--variants", "scan")
    (row,) = res["rows"]
    assert row["variant"] == "scan" and row["scan_forward"] is True and "error" not in row, row
    assert row["max_rel_err"] <= 1e-2 and row["fwd_ms_128"] > 0
    assert res["sdpa"] == {} and res["best"] is None and res["profile"] == {}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--smoke", "--warm"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--warm goes with --tune" in run.stderr


def test_gpu_session_script_parses():
    """benchmarks/gpu_session.sh (run on a lent GPU machine only) is valid bash and names only variants that
    kernels_gpu.py has."""
    import re
    import shutil
    import subprocess
    import sys

    script = ROOT / "benchmarks" / "gpu_session.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    default = re.search(r'VARIANTS=\$\{VARIANTS:-"([^"]+)"\}', script.read_text()).group(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernels_gpu
    finally:
        sys.path.pop(0)
    names = [n.replace("|", " ") for n in default.split()]
    assert names and set(names) <= set(kernels_gpu.VARIANTS), names


def test_kernels_gpu_correctness_smoke(tmp_path):
    """The benchmark's correctness part on the CPU: every kernel within the bf16 target."""
    res, _ = _kernels_gpu(tmp_path, "--skip-speed")
    assert [r["kernel"] for r in res["correctness"]] == [
        "chunk_gla per-channel gates", "chunk_gla scalar gates", "recurrent_gla_step",
        "swa_attention w=64, 4 sinks, ring", "liger_attention fwd, chunked", "liger_attention fwd, one launch"]
    assert all(r["ok"] for r in res["correctness"]), res["correctness"]


def test_remat_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/remat.py end to end on a tiny model: both workers, the table and the JSON (not its numbers)."""
    import subprocess
    import sys

    from healkit import tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "remat.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "remat.py"), "--model", str(model), "--specs",
                          "liger-attention", "--seq-lens", "32", "--steps", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| liger-attention | 32 |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["remat"], r["layers"]) for r in rows] == [(False, 0), (True, 2)]
    assert rows[0]["loss"] == rows[1]["loss"] and rows[1]["kept_bytes"] < rows[0]["kept_bytes"]


def test_eval_memory_benchmark_runs_on_a_tiny_model(tmp_path):
    """benchmarks/eval_memory.py end to end on a tiny model: the three workers agree on the NLL."""
    import subprocess
    import sys

    from healkit import tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_memory.py"), "--model", str(model),
                          "--contexts", "40", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| 40 | head-chunks |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["whole", "logit-chunks", "head-chunks"]
    assert all(abs(r["nll"] - rows[0]["nll"]) < 1e-5 for r in rows) and all(r["peak_bytes"] > 0 for r in rows)


def test_architecture_sweep_table_and_json(tmp_path):
    """benchmarks/architectures.py end to end on two types, each in its own worker: the table, the counts, the
    JSON; an unknown type is refused in one line."""
    import subprocess
    import sys

    script = str(ROOT / "benchmarks" / "architectures.py")
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, script, "--types", "gpt2", "bloom", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| gpt2 | GPT2LMHeadModel | converts and decodes | 2/2 |" in run.stdout
    assert "1 converts and decodes, 1 identity only: spec refuses the masks" in run.stdout  # BLOOM's ALiBi
    saved = json.loads(out.read_text())
    assert saved["counts"]["converts and decodes"] == 1 and len(saved["results"]) == 2
    bad = subprocess.run([sys.executable, script, "--types", "llama", "no_such_type"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "not causal-LM model types" in bad.stderr and "no_such_type" in bad.stderr
