#!/usr/bin/env bash
# One device session for the Triton kernels (issue #6), sized for a lent GPU machine: under 10 minutes (one
# device call), each step under its own timeout so that a hang still leaves the later steps their time.
#
#   Here, once (the device has no network; fla-core is optional and only compared against):
#       pip download --no-deps -d .whl fla-core==0.6.0      # .whl/ is git-ignored: pass carry [".whl"]
#   (lincompile imports pyyaml: where the device's Python lacks it, step 0 says so and which wheel to carry.)
#   On the device, from the repository root (its Python must have torch and triton already):
#       bash benchmarks/gpu_session.sh                       # or STEPS="0 4" ... for some steps only
#
#   0. set-up: the wheels in .whl/ (if any) installed with --no-deps; the GPU and the versions printed.
#      (Every step has lincompile on PYTHONPATH as a copied package tree: no pip install, no build.)
#   1. Triton's cache warmed: one `kernels_gpu.py --tune --warm` process per variant, in parallel, so that
#      step 2 times kernels rather than compiles.
#   2. `kernels_gpu.py --tune` over $VARIANTS: errors at 2k with GQA, forward and forward+backward at 2k and
#      16k, SDPA in the same process, profiles of the first, "rows" if listed, and the fastest.
#   3. `kernels_gpu.py --no-fla` at $LENGTHS with the fastest variant of step 2 (the default if none): the
#      README's correctness and speed tables.
#   4. `kernels_gpu.py --skip-check` at 16k with fla (its autotuning takes minutes): ours, fla and SDPA in
#      one process, the ratios the targets are stated in.
# Everything is printed (the device tool returns the output's tail) and kept under $OUT: session.log (all of
# it), warm.log (step 1's processes), tune.json, table.json, fla16k.json.
#
# Environment: STEPS ("0 1 2 3 4"), BEST (the variant of steps 3 and 4 when step 2 does not run), VARIANTS (names from kernels_gpu.VARIANTS, space-separated, with '|' for
# a space inside a name), LENGTHS, WARM_S / TUNE_S / TABLE_S / FLA_S (step timeouts, s), OUT (the output
# folder: the device tool's $OUT when set), PYTHON, ARGS (added to every kernels_gpu.py call: `ARGS=--smoke
# TRITON_INTERPRET=1` walks the script on a CPU at tiny sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
STEPS=${STEPS:-"0 1 2 3 4"}
VARIANTS=${VARIANTS:-"default scan scan|bv128 scan|bv32 raw|gates low|carry split|dqk keep|b"}
LENGTHS=${LENGTHS:-"2048 16384 65536"}
WARM_S=${WARM_S:-120}
TUNE_S=${TUNE_S:-180}
TABLE_S=${TABLE_S:-120}
FLA_S=${FLA_S:-130}
PY=${PYTHON:-python}
read -r -a extra <<< "${ARGS:-}"
KG=("$PY" benchmarks/kernels_gpu.py ${extra[@]+"${extra[@]}"})
start=$(date +%s)
echo "== gpu_session.sh $(date -u '+%F %T') UTC, steps $STEPS, $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }
step() { [[ " $STEPS " == *" $1 "* ]]; }

# lincompile as installed (package-dir mapping: kernels/ is lincompile.kernels), without pip: every step needs it
site=$(mktemp -d)
cp -r lincompile "$site/lincompile"
for sub in kernels passes specs; do cp -r "$sub" "$site/lincompile/$sub"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

if step 0; then
    stamp "0. set-up"
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-deps --no-index .whl/*.whl || echo "(the wheels in .whl/ did not install)"
    fi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
    $PY -c "import torch, triton; print('torch', torch.__version__, '· triton', triton.__version__)" || exit 1
    $PY -c "import yaml" 2>/dev/null || { $PY -c "import sys; v = '%d%d' % sys.version_info[:2]; print(
        'pyyaml is missing: carry its wheel, pip download --no-deps --only-binary=:all: --python-version', v,
        '--platform manylinux2014_x86_64 -d .whl pyyaml')"; exit 1; }
    $PY -c "import lincompile.kernels.fused, lincompile.kernels.triton_gla" || exit 1
    $PY -c "import fla; print('fla-core', getattr(fla, '__version__', '?'))" 2>/dev/null || echo "fla-core: not importable"
fi

read -r -a names <<< "$VARIANTS"
names=("${names[@]//|/ }")

if step 1; then
    stamp "1. warm Triton's cache (${#names[@]} variants in parallel)"
    rm -f "$OUT/warm.log"
    pids=()
    for name in "${names[@]}"; do
        timeout "$WARM_S" "${KG[@]}" --tune --warm --variants "$name" \
            > "$site/warm-${name// /_}.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        log="$site/warm-${names[$i]// /_}.log"
        wait "${pids[$i]}" || { echo "(warm-up of ${names[$i]} exited with $?)"; tail -3 "$log"; }
        grep -h '"error"' "$log" || true
        { echo "== ${names[$i]}"; cat "$log"; } >> "$OUT/warm.log"
    done
fi

if step 2; then
    stamp "2. --tune"
    rm -f "$OUT/tune.json"
    timeout "$TUNE_S" "${KG[@]}" --tune --variants "${names[@]}" --json "$OUT/tune.json" \
        || echo "(--tune exited with $?)"
fi

best=${BEST:-}
if step 2; then  # this run's tune only: an earlier session's tune.json may still be in $OUT
    best=$($PY -c "import json, sys; print(json.load(open(sys.argv[1])).get('best') or '')" "$OUT/tune.json" \
           2>/dev/null || true)
fi
variant=(); [[ -n "$best" ]] && variant=(--variant "$best")

if step 3; then
    stamp "3. the table (${best:-default})"
    read -r -a lengths <<< "$LENGTHS"
    timeout "$TABLE_S" "${KG[@]}" --no-fla --lengths "${lengths[@]}" ${variant[@]+"${variant[@]}"} \
        --json "$OUT/table.json" || echo "(the table exited with $?)"
fi

if step 4; then
    stamp "4. fla at 16k (${best:-default})"
    timeout "$FLA_S" "${KG[@]}" --skip-check --lengths 16384 ${variant[@]+"${variant[@]}"} \
        --json "$OUT/fla16k.json" || echo "(the fla step exited with $?)"
fi
stamp "done"
