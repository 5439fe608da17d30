"""Chunked gated linear attention (GLA) in Triton: forward, backward and a fused decode step.

Semantics (key-gated form of `kernels/gla.py`, whose `gla_naive` is the oracle):
    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ      S: [K, V] fp32 per kv head
    o_t = scale · S_tᵀ q_t
q `[B, H, T, K]`, k `[B, Hk, T, K]`, v `[B, Hk, T, V]`, g `[B, Hk, T, K]` (per-channel log gates), `[B, Hk, T, 1]`
(one gate per head and step) or None (no decay); H a multiple of Hk (GQA: query head h reads kv head h // G,
G = H / Hk, indexed inside the kernels, never repeated). g is clamped at LOG_GATE_MIN = −5 inside the kernels
(wherever it is cumulated: `_chunk_cumsum`, or the fused forward's `_h_fwd` / `_o_fwd_mm`; the decode step
too), as in every form of kernels/gla.py, and dg is 0 where g was below it (`_rev_cumsum`, `_chunk_suffix`); a
NaN gate stays NaN.

Structure (chunks of C = 64 positions, sub-chunks of c = 16; the tail chunk is masked, so any T ≥ 1 works):
  forward   1. `_chunk_cumsum`: b = cumulative sum of g restarted at every chunk, fp32 `[B, Hk, N·C, KG]`
               (one program per (chunk, K block, batch·kv head) loads a [C, BK] tile of g, rows ≥ T as zero
               gates, and stores its tl.cumsum down the rows; so b stays flat past T and b at the chunk's last
               row is its total decay). Skipped with `TUNING.fuse_intra` (2. and 4. then cumulate g
               themselves: RAW) and with `TUNING.raw_gates` (2., 3. and 4. do).
            2. `_h_fwd`: sequential scan over chunks per (batch, kv head, K block, V block); stores the state
               each chunk starts from, h[n] `[B, Hk, N, K, V]`, in the input dtype (fp32 under precision
               "full" unless `TUNING.half_states`), and the final state (fp32).
            3. The intra-chunk matrix A[t, s] = scale Σ_k q_tk k_sk exp(b_tk − b_sk), s ≤ t, per (query head,
               chunk) `[B, H, N·C, C]`, input dtype (fp32 under "full"), by `_attn_intra_mm` (one program per
               16-row block; `TUNING.intra` "rows": `_attn_intra`, one program per chunk; "split":
               `_attn_intra_split`).
            4. `_o_fwd`: o = scale (q ⊙ exp(b)) h[n] + A v per (query head, chunk, V block). With
               `TUNING.fuse_intra`, `_o_fwd_mm` does 3. and 4. in one kernel per 16-row block, and the
               backward's `_dv_bwd` forms A itself too: A never leaves the registers.
            With `TUNING.scan_forward`, `_fwd_scan` does 1.–4. in one launch: one program per (V block,
            batch·kv head) walks the chunks with the state in registers and forms each chunk's output as
            `_o_fwd_mm` does, for the G query heads of the group; no h, A or b buffer.
  backward  h is recomputed (2.; fp32 unless precision "low"). A (and b with `Tuning.reuse_gates`) are the
            forward's where the custom op's wrapper had it keep them (`Tuning.reuse_forward`; fla keeps A
            alike), else recomputed (1., 3.; A not with fuse_intra); then
            5. `_dh_bwd`: reverse scan, dh[n] = gradient of the state after chunk n (fp32; input dtype under
               "low"),
               dS_{n} = Diag(exp(b_last)) dS_{n+1} + scale Σ_{heads of the group} (q ⊙ exp(b))ᵀ do,
               starting from dfinal_state; what is left at the start is dinitial_state.
            6. `_dA_bwd`: dA[t, s] = scale do_t · v_s (s ≤ t), per query head.
            7. `_dqk_bwd`: dq (per query head) and dk (summed over the G query heads of the group inside the
               program: one program owns a kv head, no atomics), plus dB = Σ_heads q ⊙ dq − k ⊙ dk.
               `TUNING.dqk` "split": `_dqk_bwd` forms the intra-chunk terms only, into fp32 scratch, and
               `_dqk_inter` adds the inter-chunk ones (do h[n]ᵀ, v dh[n]ᵀ) over the whole chunk in 64-row tiles.
            8. `_dv_bwd`: dv = Σ_heads Aᵀ do + (k ⊙ exp(b_last − b)) dh[n] (A formed in-kernel with fuse_intra).
            9. dg. With B the cumulative log gate from the sequence start, every term of the loss that
               holds q_t holds it as q_t ⊙ exp(B_t), every term holding k_s as k_s ⊙ exp(−B_s), and the final
               state is exp(B_T) ⊙ (…), so per channel ∂L/∂B_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ Σ_v dS_T ⊙ S_T at
               t = T−1), and dg_t = Σ_{u ≥ t} ∂L/∂B_u (a reverse cumulative sum). The initial state enters
               only through q ⊙ dq and S_T, so it needs no term of its own. Scalar gates: summed over K (torch,
               before the scan). The scan is `_rev_cumsum`, in place on dB: one program per (K block of 32,
               batch·kv head) walks the chunks from the last to the first, loads each [C, BK] tile with its
               rows reversed so that tl.cumsum down the tile is the suffix sum within the chunk, adds the
               carried total of the later chunks (which starts at the Σ_v dS_T ⊙ S_T term) and stores; a plain
               sum in another order, no total − prefix cancellation. `TUNING.dg_form` "carry" instead: all
               that the positions after chunk n contribute, Σ_{u > chunk n} ∂L/∂B_u, is Σ_v S_n ⊙ dS_n (S_n
               the state after chunk n, dS_n its gradient dh[n]: raising the later gates scales exactly the
               part of the future that flows through S_n). `_dqk_bwd` forms it (CARRY) from the tiles of
               dk's inter-chunk term and one more read of h[n], and `_chunk_suffix` adds it to the suffix
               sum within each chunk, one program per (chunk, K block, batch·kv head). The scan sums the
               rounding errors of the large, cancelling terms q ⊙ dq − k ⊙ dk over the whole sequence, the
               carry form over ≤ 64 positions (under precision "low", in the interpreter's bf16 emulation at
               T = 2048, head_dim 64: dg 1.2e-2 with the scan, 2.0e-3 with the carry; tests/test_triton_gla.py
               checks it at T = 512). The cumsum kernels take Triton's default launch options, not
               `TUNING`'s.

Numerical scheme. b is non-increasing inside a chunk and b ≥ −5·64 = −320, so exp(b_t) ≤ 1 and
exp(b_last − b_s) ≤ 1 always (they may underflow to 0, which is the right limit). The intra-chunk decay
exp(b_t − b_s), t ≥ s, is factorised per 16-row block i through a reference r inside the chunk:
  * "matmul" (the default): r = b at the block's middle row m = 16i + 7. The query block's factors
    exp(b_t − r) are then ≤ exp(7·5) = e^35 and the key factors exp(r − b_s) of every key up to the block's
    end ≤ exp(8·5) = e^40 (the gates are clamped; keys of earlier blocks and queries after m get factors ≤ 1),
    and for s ≤ t their product is ≤ 1. So the whole [16, C] row of A — off-diagonal and diagonal blocks —
    is one matmul per K block, and entries s > t (where the product can be large) are dropped with tl.where,
    never multiplied; keys after the block get exponent 0 (they are not loaded, or meet dA = 0). The backward
    uses the same r for dq (dA's row block times the gated keys) and for dk (dA's column block, transposed,
    times the gated queries from 16i on). The dropped entries s > t may overflow to inf (from |q|, |k| ~ 1e3);
    tl.where selects them away. Kept entries stay finite unless |q|, |k| or |dA·k| approach fp32 max / e^40
    ≈ 1e21, and every term is rounded relative to its own size (factors under e^−87 flush to zero: terms too
    small to matter). (gla.py's chunked form does the same with r just before the block: factors ≤ e^80.)
  * "rows" and "split": no exp of a positive number at all. j < i (key sub-chunk before the query's):
    through the reference r = b at the last row of sub-chunk i−1 (between the two sub-chunks), so
    exp(b_t − r) ≤ 1 on the query side and exp(r − b_s) ≤ 1 on the key side, then a matmul. (Backward dk
    uses the last row of the key sub-chunk j as reference: again both factors ≤ 1.) j = i: one row at a
    time, so no [16, 16, BK] tensor is formed: column s of the block is Σ_k q_tk k_sk exp(b_tk − b_sk) for
    the 16 query rows t, a [16, BK] computation with the difference masked to 0 for t < s BEFORE the exp
    (every exp argument ≤ 0; those entries are dropped), put into the block with tl.where(column == s, …).
    `_dqk_bwd` does the same per key row s for dq (dq_t += dA_ts k_s exp(b_t − b_s), t ≥ s) and per query
    row t for dk (dk_s += dA_ts q_t exp(b_t − b_s), s ≤ t); dA is 0 above the diagonal. The loops stop at
    the last row < T (rows past it would add 0). Exact for any gates, but 16 dependent steps per block.
Accumulation is fp32 throughout; fp32 inputs use IEEE fp32 matmuls (no TF32). bf16/fp16 inputs: see
`Tuning.precision` below (TF32 matmuls on fp32 operands wherever a product is not in the input dtype: TF32
keeps more mantissa than the inputs had).

Block sizes are powers of two ≥ 16 with masks, so K and V need not be powers of two (V = 65 is fine);
K and V are each ≤ 256 (`supported`). No autotuning: one configuration per call, also under
TRITON_INTERPRET=1, taken from the module global `TUNING` (a `Tuning`) when chunk_gla_fwd / chunk_gla_bwd
is called, so a benchmark can A/B configurations in one process by assigning `triton_gla.TUNING = Tuning(...)`
between calls. The defaults are the configuration above: BK, BV = next power of two of K, V clamped to
[16, 64] (`block_k`, `block_v` move the upper bound: powers of two in [16, 256], else ValueError), Triton's
default num_warps / num_stages (`num_warps`, `num_stages`: launch options of every chunk kernel; `_dqk_inter`
takes 8 warps by default), precision
"mixed". A kernel launched with LOWP (bf16/fp16 q, k, v only) takes every tl.dot's operands in the input
dtype with fp32 accumulation (gate factors are applied in fp32 first, then the product is rounded), and
its scratch buffers (A, h, dh: read only as matmul operands) are stored in the input dtype; the products
that form the diagonal 16×16 blocks (all of A's, and dq's and dk's intra-chunk products, in the matmul
scheme; the row loops otherwise), the recurrent state carried in registers, the final state, dA, dB and the
initial-state gradient stay fp32, and the exponent scheme and masks are the same. (With bf16 operands for
the diagonal blocks, dg's error doubled in the interpreter's bf16 emulation: 2e-2 against 1e-2 in
tests/test_triton_gla.py's low-precision test.) Which kernels get LOWP is `Tuning.precision`: "low" all of
them; "full" none; "mixed" (the default; bf16 only, fp16 runs it as "full" for range) every forward
kernel, and in the backward A and dv (whose rounding reaches dv only) and dA (do · v, exact in the input
dtype). The backward recomputes its own h, so the forward's precision never reaches a gradient. The
backward's h, dh and dq / dk products stay fp32 under "mixed" because their rounding does reach dg:
∂L/∂B = q ⊙ dq − k ⊙ dk cancels, and in the interpreter's emulation (T = 512, D = 128) each of the three
roughly alone took dg's error from 1e-6 to 4e-3 (6e-3 together; 1.3e-2 at T = 2048 on the H100, scan form).
fp32 (or mixed-dtype) inputs always run "full". `half_states=True` stores the forward's h in the input
dtype under "full" too.
Under the interpreter a LOWP dot is emulated (operands rounded to the input dtype, fp32 product), since
the interpreter's tl.dot mishandles bf16. The decode step `fused_recurrent_gla_step` ignores `TUNING`.
`POISON = True` (or LINCOMPILE_TRITON_POISON=1) fills every output and scratch buffer with NaN before launch,
so that an element a kernel fails to write shows up in tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

from lincompile.errors import UsageError, did_you_mean

from .gla import LOG_GATE_MIN

POISON = os.environ.get("LINCOMPILE_TRITON_POISON", "") not in ("", "0")

CHUNK = 64
SUB = 16
MAX_HEAD_DIM = 256

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTRA = ("matmul", "rows", "split")
PRECISION = ("mixed", "full", "low")
DG_FORM = ("scan", "carry")
DQK = ("fused", "split")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass
class Tuning:
    """Knobs of the chunk kernels (not of the decode step), read from `TUNING` at every call of
    chunk_gla_fwd / chunk_gla_bwd; reuse_forward and reuse_gates (and the precision, when A is kept) by the
    custom op's wrapper (`fused.chunk_gla`), which passes them on (direct callers pass keep_a / keep_b and
    A / b themselves). The defaults: the matmul scheme, unfused, mixed precision, Triton's launch
    options, blocks of at most 64, the backward reusing the forward's A (not b); LINCOMPILE_GLA_TUNING
    ("name=value,...", `parse_tuning`) changes them for a whole process."""

    precision: str = "mixed"  # bf16/fp16 inputs (PRECISION; fp32 or mixed-dtype inputs always run "full"):
    #   "full":  fp32 matmul operands (TF32 matmuls), fp32 scratch buffers A, h, dh
    #   "mixed": the forward's matmul operands and its A and h in the input dtype (fp32 accumulation); in the
    #            backward so are A and dv's products, whose rounding reaches dv only, and dA's (do · v: exact
    #            when do is in the input dtype too). The backward's h, dh and the dq / dk products stay
    #            fp32: their rounding would reach dg (q ⊙ dq − k ⊙ dk cancels), so dq, dk, dg are "full"'s.
    #            bf16 only: fp16 inputs run "mixed" as "full" (fp16's range: without decay the states can
    #            pass 65504 over a long sequence)
    #   "low":   every product and scratch buffer in the input dtype, the backward's too (fla's chunk_gla
    #            likewise rounds h and dh to bf16 for its dq / dk products)
    num_warps: int | None = None  # launch option of every chunk kernel (None: Triton's default; 8 for
    #                               `_dqk_inter`, which spills at 4)
    num_stages: int | None = None  # likewise
    block_v: int = 64  # upper bound of the V block (BV = power of two in [16, block_v])
    block_k: int = 64  # upper bound of the K block (BK)
    intra: str = "matmul"  # how the diagonal 16×16 blocks of the intra-chunk terms are formed (INTRA):
    #   "matmul": one matmul per 16-row block through a reference at the block's middle row, forward
    #             (`_attn_intra_mm`, one program per 16-row block) and backward (`_dqk_bwd`, DIAG_MM)
    #   "rows":   one key (query) row at a time, per (chunk, head) (`_attn_intra`; `_dqk_bwd` row loops)
    #   "split":  "rows" with one program per 16-row block for A (`_attn_intra_split`)
    half_states: bool = False  # forward only: the chunk states h in the input dtype (bf16/fp16 inputs), half
    #                            their bytes (so they are under "mixed" and "low"); the backward recomputes
    #                            its own h (fp32 unless "low"), so
    #                            gradients are unchanged
    fuse_intra: bool = False  # A is never stored: formed inside the kernels that use it, the forward's output
    #                           (`_o_fwd_mm`) and the backward's dv (`_dv_bwd`, FUSED); needs intra "matmul"
    dg_form: str = "scan"  # how dg sums ∂L/∂B = q ⊙ dq − k ⊙ dk over later positions (DG_FORM):
    #   "scan":  one reverse cumulative sum over the whole sequence (`_rev_cumsum`)
    #   "carry": within each chunk only, plus the chunk's carry Σ_v S_n ⊙ dS_n (the state after chunk n times
    #            its gradient: all that later positions contribute), formed in `_dqk_bwd` (`_chunk_suffix`).
    #            The rounding of the cancelling terms then adds up over ≤ 64 positions, not over T
    dqk: str = "fused"  # how the backward forms dq and dk (DQK):
    #   "fused": one kernel, `_dqk_bwd`, 16-row sub-chunk by sub-chunk, inter-chunk terms included
    #   "split": `_dqk_bwd` forms the intra-chunk terms only (into fp32 scratch), then `_dqk_inter` adds the
    #            inter-chunk ones (do h[n]ᵀ, v dh[n]ᵀ) in 64-row tiles, which Hopper runs as wgmma: fla's split.
    #            Costs a write and a read of two fp32 buffers the size of dq and dk
    reuse_forward: bool = True  # the custom op `lincompile::chunk_gla` keeps the forward's A for the backward
    #   (`chunk_gla_fwd(keep_a=True)`), as fla's chunk_gla does, instead of forming it again (3.): the two form
    #   it alike, so the gradients are bit-identical. Costs holding A, [B, H, N·C, 64] in A's dtype (the input
    #   dtype under "mixed" (bf16) and "low", else fp32), from the forward to the backward. Read when the
    #   forward runs (or is traced: torch.compile guards on it). Nothing is kept with fuse_intra (no A)
    raw_gates: bool = False  # forward only: no `_chunk_cumsum` launch and no b buffer; `_h_fwd`,
    #   `_attn_intra_mm` and `_o_fwd` take each chunk's cumulative gates from g in their own tiles (as
    #   fuse_intra's kernels do), the sums `_chunk_cumsum` stores. Saves that kernel's read of g and write
    #   of b (~1.1 GB at 16k with fp32 gates: an estimated 0.3 ms), at the price of registers (not yet
    #   timed). Needs intra "matmul"; a forward asked to keep b (reuse_gates) forms it as usual
    reuse_gates: bool = False  # likewise the cumulative gates b (1.), [B, Hk, N·C, KG] fp32: as large as an
    #   fp32 g, which is held as well (the backward's dg reads g for the clamp mask), for an estimated 0.35 ms
    #   at 16k (half of `_chunk_cumsum`'s time in the H100 profile)
    scan_forward: bool = False  # the forward as one kernel, `_fwd_scan`: a sequential pass per (kv head, V
    #   block) with the state in registers, the output formed as `_o_fwd_mm` forms it. No h, A or b buffer
    #   (the forward's scratch memory no longer grows with T: h alone is 0.5 GB at 64k for 16 heads of
    #   128), one launch instead of four, and GQA groups share the state update and the key tiles; but
    #   B·Hk·NV programs only, the whole K in one block (8 warps unless num_warps says otherwise; at head_dim
    #   256 it spills), and the backward forms A and b again. half_states does not apply (there is no h: the
    #   state is rounded to the input dtype for its products under "mixed" and "low", as h is). Needs intra
    #   "matmul". Not yet timed

    @property
    def keeps_nothing(self) -> bool:
        """The forward forms no A or b that a backward could reuse (fuse_intra, scan_forward)."""
        return self.fuse_intra or self.scan_forward

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError unless the block bounds are powers of two in [16, 256] and the launch options are
        positive (num_warps a power of two)."""
        if self.dg_form not in DG_FORM:
            raise ValueError(f"Tuning.dg_form must be one of {', '.join(DG_FORM)}, got {self.dg_form!r}")
        if self.dqk not in DQK:
            raise ValueError(f"Tuning.dqk must be one of {', '.join(DQK)}, got {self.dqk!r}")
        if self.precision not in PRECISION:
            raise ValueError(f"Tuning.precision must be one of {', '.join(PRECISION)}, got {self.precision!r}")
        if self.intra not in INTRA:
            raise ValueError(f"Tuning.intra must be one of {', '.join(INTRA)}, got {self.intra!r}")
        for name in ("reuse_forward", "reuse_gates", "raw_gates", "fuse_intra", "scan_forward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Tuning.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("fuse_intra", "raw_gates", "scan_forward"):
            if getattr(self, name) and self.intra != "matmul":
                raise ValueError(f"Tuning.{name} needs intra='matmul', got intra={self.intra!r}")
        for name in ("block_k", "block_v"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or not 16 <= x <= MAX_HEAD_DIM or x & (x - 1):
                raise ValueError(f"Tuning.{name} must be a power of two in [16, {MAX_HEAD_DIM}], got {x!r}")
        for name in ("num_warps", "num_stages"):
            x = getattr(self, name)
            if x is None:
                continue
            if isinstance(x, bool) or not isinstance(x, int) or x < 1 or (name == "num_warps" and x & (x - 1)):
                what = "a positive power of two" if name == "num_warps" else "a positive int"
                raise ValueError(f"Tuning.{name} must be None or {what}, got {x!r}")


TUNING_ENV = "LINCOMPILE_GLA_TUNING"


class TuningEnvError(UsageError, ValueError):
    """A bad LINCOMPILE_GLA_TUNING: the CLI's one line and exit code 2."""


def parse_tuning(text: str) -> Tuning:
    """A Tuning from "name=value,name=value" (the form of LINCOMPILE_GLA_TUNING): booleans as 1/0/true/false/
    yes/no, num_warps / num_stages as an int or none, the rest as written. ValueError naming the bad item."""
    types = {f.name: str(f.type) for f in fields(Tuning)}  # "bool", "int", "int | None", "str" (the annotations)
    kw = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, value = (x.strip() for x in item.partition("="))
        if not eq or name not in types:
            what = f"unknown knob {name!r}{did_you_mean(name, types)}" if eq else f"{item!r} is not name=value"
            raise ValueError(f"{what}; knobs: {', '.join(types)}")
        if name in kw:
            raise ValueError(f"{name} is given twice")
        kind, low = types[name], value.lower()
        if kind == "bool":
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{name} must be 1/0/true/false/yes/no, got {value!r}")
            kw[name] = low in ("1", "true", "yes")
        elif kind.startswith("int"):
            if kind.endswith("None") and low == "none":
                kw[name] = None
            elif not re.fullmatch(r"-?[0-9]+", value):
                raise ValueError(f"{name} must be an int{' or none' if kind.endswith('None') else ''}, got {value!r}")
            else:
                kw[name] = int(value)
        else:
            kw[name] = value
    return Tuning(**kw)


def _tuning_from_env() -> Tuning:
    """The starting configuration: the defaults, or what LINCOMPILE_GLA_TUNING says (e.g. "precision=low,
    dg_form=carry"), for runs whose code does not set `TUNING` itself (lincompile generate, heal, benchmarks)."""
    text = os.environ.get(TUNING_ENV, "")
    try:
        return parse_tuning(text)
    except ValueError as err:
        raise TuningEnvError(f"{TUNING_ENV}={text!r}: {err}") from None


TUNING = _tuning_from_env()

# The Triton interpreter (3.x) mishandles bf16: tl.dot multiplies the raw 16-bit patterns as integers, and
# fp32 -> bf16 casts truncate where the GPU rounds to nearest even. Under TRITON_INTERPRET=1 `_lowp` rounds
# to nearest even itself and `_dot` emulates a low-precision dot (operands rounded, fp32 product).
_INTERPRETED = tl.constexpr(_interpret())


def _empty(*shape, device, dtype=torch.float32):
    x = torch.empty(*shape, device=device, dtype=dtype)
    if POISON:
        x.fill_(float("nan"))
    return x


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@triton.jit
def _lowp(x, ET: tl.constexpr):
    """x (fp32, or already ET) rounded to nearest even in ET, as a cast does on the GPU."""
    if _INTERPRETED:
        if ET == tl.bfloat16:
            if x.dtype == tl.float32:  # round the fp32 bits to their top 16 (ties to even): the cast is then exact
                u = x.to(tl.uint32, bitcast=True)
                u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
                x = u.to(tl.float32, bitcast=True)
    return x.to(ET)


@triton.jit
def _dot(a, b, acc, ET: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; operands in ET (the input dtype) when LOWP, else fp32 matmuls of
    precision PREC. Gate factors are applied to a and b in fp32 before they get here."""
    if LOWP:
        if _INTERPRETED:
            return tl.dot(_lowp(a, ET).to(tl.float32), _lowp(b, ET).to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a.to(ET), b.to(ET), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)


# --------------------------------------------------------------------------------------------------
# Kernels. Layouts: q/do/o [B, H, T, ·]; k/v/dk/dv [B, Hk, T, ·]; b [B, Hk, Tp, KG] with KG = K (stride SBK = 1)
# or 1 (SBK = 0: one gate broadcast over the K channels); Tp = N·C. Program ids are widened to int64 before
# they scale base offsets.


@triton.jit
def _h_fwd(k, v, b, h0, h, ht, T, Tp, N,
           K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           USE_G: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
           RAW: tl.constexpr, GMIN: tl.constexpr):
    """h[n] = the state chunk n starts from, and the final state. RAW: b is the gates g `[B, Hk, T, KG]`, and
    each chunk's cumulative gates are taken here (as `_chunk_cumsum` does)."""
    ik, iv, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = k.dtype.element_ty
    ok = ik * BK + tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    okv = ok[:, None] * V + ov[None, :]
    ck = oc[:, None] * K + ok[None, :]
    cv = oc[:, None] * V + ov[None, :]
    cb = oc[:, None] * KG + ok[None, :] * SBK
    if HAS_H0:
        S = tl.load(h0 + ibk * K * V + okv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        tl.store(h + (ibk * N + n) * K * V + okv, _lowp(S, h.dtype.element_ty), mask=mkv)
        t0 = n * C
        mt = (oc < T - t0)[:, None]
        kk = tl.load(k + (ibk * T + t0) * K + ck, mask=mt & mk[None, :], other=0.0).to(tl.float32)
        vv = tl.load(v + (ibk * T + t0) * V + cv, mask=mt & mv[None, :], other=0.0).to(tl.float32)
        if USE_G:
            if RAW:
                gg = tl.load(b + (ibk * T + t0) * KG + cb, mask=mt & mk[None, :], other=0.0).to(tl.float32)
                bb = tl.cumsum(tl.maximum(gg, GMIN, propagate_nan=tl.PropagateNan.ALL), axis=0)
                bl = tl.sum(tl.where(oc[:, None] == C - 1, bb, 0.0), axis=0)  # the last row, as it is in bb
            else:
                bb = tl.load(b + (ibk * Tp + t0) * KG + cb, mask=mk[None, :], other=0.0)
                bl = tl.load(b + (ibk * Tp + t0 + C - 1) * KG + ok * SBK, mask=mk, other=0.0)
            kk = kk * tl.exp(bl[None, :] - bb)
            S = S * tl.exp(bl)[:, None]
        S = _dot(tl.trans(kk), vv, S, ET, LOWP, PREC)
    tl.store(ht + ibk * K * V + okv, S, mask=mkv)


@triton.jit
def _diag_gated(dia, qi, bi, k_rows, b_rows, n_rows, mk1,
                K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """dia + the diagonal BC×BC block of Σ_k q_tk k_sk exp(b_tk − b_sk) over one K block, one key row
    (column) s at a time: qi, bi the block's [BC, BK] query rows and their cumulative gates, k_rows / b_rows
    pointers to its first key row's K block, n_rows the key rows < T (later ones would add 0). The exponent
    is masked to 0 before the exp where t < s, so it is ≤ 0 wherever it is kept; those entries stay
    unmasked in dia (callers zero the upper triangle)."""
    oc = tl.arange(0, BC)
    okk = tl.arange(0, BK)
    for s in range(n_rows):
        ks = tl.load(k_rows + s * K + okk, mask=mk1, other=0.0).to(tl.float32)
        bs = tl.load(b_rows + s * KG + okk * SBK, mask=mk1, other=0.0)
        e = tl.exp(tl.where(oc[:, None] >= s, bi - bs[None, :], 0.0))
        col = tl.sum(qi * ks[None, :] * e, axis=1)
        dia = tl.where(oc[None, :] == s, dia + col[:, None], dia)
    return dia


@triton.jit
def _attn_intra(q, k, b, A, scale, T, Tp, H, Hk, G,
                K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
                C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """A[t, s] = scale Σ_k q_tk k_sk exp(b_tk − b_sk) for s ≤ t in the chunk (0 above the diagonal).

    Row block i (16 query rows): keys of earlier sub-chunks in one [16, C] matmul through the reference
    r = b at row i·16 − 1 (both factors ≤ 1; the exponents of keys at or after r are masked to 0 and those
    keys discarded); the diagonal 16×16 block one key row (column) at a time, [16, BK] each, exponents masked
    to ≤ 0 before the exp.
    """
    n, ibh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    ibk = (ibh // H) * Hk + (ibh % H) // G
    t0 = n * C
    oc = tl.arange(0, BC)
    oC = tl.arange(0, C)
    tri = oc[:, None] >= oc[None, :]
    okk = tl.arange(0, BK)
    ck = oC[:, None] * K + okk[None, :]  # chunk rows x K block (offsets)
    ik_ = oc[:, None] * K + okk[None, :]  # sub-chunk rows x K block
    cb = oC[:, None] * KG + okk[None, :] * SBK
    ib = oc[:, None] * KG + okk[None, :] * SBK
    q_base = q + (ibh * T + t0) * K
    k_base = k + (ibk * T + t0) * K
    b_base = b + (ibk * Tp + t0) * KG
    A_base = A + (ibh * Tp + t0) * C
    rowsC = oc[:, None] * C
    mC = (oC < T - t0)[:, None]
    NC: tl.constexpr = C // BC
    for i in tl.static_range(NC):
        mi = (oc < T - t0 - i * BC)[:, None]
        off = tl.zeros([BC, C], dtype=tl.float32)
        dia = tl.zeros([BC, BC], dtype=tl.float32)
        for k0 in range(0, K, BK):
            mk1 = okk < K - k0
            mk = mk1[None, :]
            qi = tl.load(q_base + i * BC * K + k0 + ik_, mask=mi & mk, other=0.0).to(tl.float32)
            if USE_G:
                bi_ = tl.load(b_base + i * BC * KG + k0 * SBK + ib, mask=mk, other=0.0)
                dia = _diag_gated(dia, qi, bi_, k_base + i * BC * K + k0, b_base + i * BC * KG + k0 * SBK,
                                  tl.minimum(BC, T - t0 - i * BC), mk1, K, KG, SBK, BC, BK)
            else:
                ki = tl.load(k_base + i * BC * K + k0 + ik_, mask=mi & mk, other=0.0).to(tl.float32)
                dia = _dot(qi, tl.trans(ki), dia, ET, LOWP, PREC)
            if i > 0:
                kc = tl.load(k_base + k0 + ck, mask=mC & mk, other=0.0).to(tl.float32)
                if USE_G:
                    r = tl.load(b_base + (i * BC - 1) * KG + k0 * SBK + okk[None, :] * SBK, mask=mk, other=0.0)
                    bc = tl.load(b_base + k0 * SBK + cb, mask=mk, other=0.0)
                    kc = kc * tl.exp(tl.where(oC[:, None] < i * BC, r - bc, 0.0))
                    qi = qi * tl.exp(bi_ - r)
                off = _dot(qi, tl.trans(kc), off, ET, LOWP, PREC)
        # off-diagonal part (columns < i·BC) and zeros after the diagonal block; the diagonal block itself
        off = tl.where(oC[None, :] < i * BC, off, 0.0) * scale
        keep = (oC[None, :] < i * BC) | (oC[None, :] >= i * BC + BC)
        tl.store(A_base + i * BC * C + rowsC + oC[None, :], _lowp(off, A.dtype.element_ty),
                 mask=keep & (oc[:, None] < BC))
        dia = tl.where(tri, dia, 0.0) * scale
        tl.store(A_base + i * BC * C + i * BC + rowsC + oc[None, :], _lowp(dia, A.dtype.element_ty))


@triton.jit
def _row_block(pid, ibh, H, Hk, G, C: tl.constexpr, BC: tl.constexpr):
    """(chunk n, its BC-row block i, kv head ibk of query head ibh, first row t0) of a program whose first
    grid axis runs over (chunk, row block) pairs."""
    NC: tl.constexpr = C // BC
    n, i = pid // NC, pid % NC
    return n, i, (ibh // H) * Hk + (ibh % H) // G, n * C


@triton.jit
def _attn_intra_split(q, k, b, A, scale, T, Tp, H, Hk, G,
                      K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
                      C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """`_attn_intra`'s A, one program per (BC-row block i, chunk, query head) instead of per (chunk, head):
    C/BC times the programs, and small [BC, BK] tiles only, so far fewer registers per program (more
    programs resident per SM to hide load latency). Off-diagonal blocks j < i one [BC, BC] matmul each
    through the reference r = b at row i·BC − 1 (the query rows come after it, the key rows at or before it:
    both exp factors ≤ 1, no masking needed); the diagonal block one key row at a time as in `_attn_intra`
    (exponents masked to ≤ 0 before the exp); zeros after it. Compiled for sm_90 (benchmarks/kernel_resources.py:
    bf16, per-channel gates, K = 128, 4 warps): 86 registers per thread against `_attn_intra`'s 204."""
    pid, ibh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    n, i, ibk, t0 = _row_block(pid, ibh, H, Hk, G, C, BC)
    oc = tl.arange(0, BC)
    okk = tl.arange(0, BK)
    tile_k = oc[:, None] * K + okk[None, :]  # BC rows x K block (offsets)
    tile_b = oc[:, None] * KG + okk[None, :] * SBK
    q_base = q + (ibh * T + t0 + i * BC) * K
    k_base = k + (ibk * T + t0) * K
    b_base = b + (ibk * Tp + t0) * KG
    A_base = A + (ibh * Tp + t0 + i * BC) * C
    tile_A = oc[:, None] * C + oc[None, :]
    mi = (oc < T - t0 - i * BC)[:, None]  # query rows that exist
    for j in range(i):
        mj = (oc < T - t0 - j * BC)[:, None]
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        for k0 in range(0, K, BK):
            mk = (okk < K - k0)[None, :]
            qi = tl.load(q_base + k0 + tile_k, mask=mi & mk, other=0.0).to(tl.float32)
            kj = tl.load(k_base + j * BC * K + k0 + tile_k, mask=mj & mk, other=0.0).to(tl.float32)
            if USE_G:
                r = tl.load(b_base + (i * BC - 1) * KG + k0 * SBK + okk[None, :] * SBK, mask=mk, other=0.0)
                bi = tl.load(b_base + i * BC * KG + k0 * SBK + tile_b, mask=mk, other=0.0)
                bj = tl.load(b_base + j * BC * KG + k0 * SBK + tile_b, mask=mk, other=0.0)
                qi = qi * tl.exp(bi - r)
                kj = kj * tl.exp(r - bj)
            acc = _dot(qi, tl.trans(kj), acc, ET, LOWP, PREC)
        tl.store(A_base + j * BC + tile_A, _lowp(acc * scale, A.dtype.element_ty))
    dia = tl.zeros([BC, BC], dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk1 = okk < K - k0
        mk = mk1[None, :]
        qi = tl.load(q_base + k0 + tile_k, mask=mi & mk, other=0.0).to(tl.float32)
        if USE_G:
            bi = tl.load(b_base + i * BC * KG + k0 * SBK + tile_b, mask=mk, other=0.0)
            dia = _diag_gated(dia, qi, bi, k_base + i * BC * K + k0, b_base + i * BC * KG + k0 * SBK,
                              tl.minimum(BC, T - t0 - i * BC), mk1, K, KG, SBK, BC, BK)
        else:
            ki = tl.load(k_base + i * BC * K + k0 + tile_k, mask=mi & mk, other=0.0).to(tl.float32)
            dia = _dot(qi, tl.trans(ki), dia, ET, LOWP, PREC)
    dia = tl.where(oc[:, None] >= oc[None, :], dia, 0.0) * scale
    tl.store(A_base + i * BC + tile_A, _lowp(dia, A.dtype.element_ty))
    for j in range(i + 1, C // BC):
        tl.store(A_base + j * BC + tile_A, tl.zeros([BC, BC], dtype=A.dtype.element_ty))


@triton.jit
def _gates(b_chunk, i, n_keys, k0, K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr, C: tl.constexpr,
           BC: tl.constexpr, BK: tl.constexpr, RAW: tl.constexpr, GMIN: tl.constexpr):
    """The cumulative gates one matmul-scheme block needs, for the K block at k0: the chunk's [C, BK] (rows
    after block i's end are not loaded, callers never use them), its row block i's [BC, BK] and the
    reference r = b at the block's middle row, [1, BK]. From the b buffer, or (RAW) from the gates
    themselves: b_chunk then points at g's first row of the chunk, rows ≥ n_keys read as zero gates, and the
    chunk-local cumsum of max(g, GMIN) is taken here; the block rows and r are picked out of it (masked sums
    of zeros: the same values, bit for bit)."""
    oC = tl.arange(0, C)
    okk = tl.arange(0, BK)
    mk = (okk < K - k0)[None, :]  # with one gate per step (SBK = 0) every column reads that gate
    upto = (oC < i * BC + BC)[:, None]  # rows after the block are not needed (callers mask them): not loaded
    cols = k0 * SBK + okk[None, :] * SBK
    if RAW:
        gg = tl.load(b_chunk + oC[:, None] * KG + cols, mask=(oC < n_keys)[:, None] & upto & mk, other=0.0)
        bc = tl.cumsum(tl.maximum(gg.to(tl.float32), GMIN, propagate_nan=tl.PropagateNan.ALL), axis=0)
        NC: tl.constexpr = C // BC
        sel = (tl.arange(0, NC) == i)[:, None, None]
        bi = tl.sum(tl.where(sel, tl.reshape(bc, (NC, BC, BK)), 0.0), axis=0)
        r = tl.sum(tl.where((oC == i * BC + BC // 2 - 1)[:, None], bc, 0.0), axis=0)[None, :]
    else:
        oc = tl.arange(0, BC)
        bc = tl.load(b_chunk + oC[:, None] * KG + cols, mask=upto & mk, other=0.0)
        bi = tl.load(b_chunk + (i * BC + oc[:, None]) * KG + cols, mask=mk, other=0.0)
        r = tl.load(b_chunk + (i * BC + BC // 2 - 1) * KG + cols, mask=mk, other=0.0)
    return bc, bi, r


@triton.jit
def _intra_block(q_rows, k_chunk, b_chunk, i, n_rows, n_keys,
                 K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                 BK: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr, RAW: tl.constexpr,
                 GMIN: tl.constexpr):
    """Row block i of the intra-chunk matrix, unscaled: [BC, C] with entry (t, s) = Σ_k q_tk k_sk exp(b_tk − b_sk)
    for s ≤ t, 0 elsewhere; q_rows points at the block's first query row, k_chunk / b_chunk at the chunk's first
    key row / gate row (`_gates`: b, or g itself with RAW), n_rows / n_keys the block's query rows and the
    chunk's key rows < T. One matmul per K block through the reference r = b at the block's middle row (see
    the module docstring: every factor ≤ e^40), fp32 operands (TF32 for half inputs) even under LOWP."""
    ET: tl.constexpr = tl.float32
    oc = tl.arange(0, BC)
    oC = tl.arange(0, C)
    okk = tl.arange(0, BK)
    mi = (oc < n_rows)[:, None]
    upto = (oC < i * BC + BC)[:, None]  # keys up to the end of the block
    mkeys = upto & (oC < n_keys)[:, None]
    att = tl.zeros([BC, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk = (okk < K - k0)[None, :]
        qi = tl.load(q_rows + k0 + oc[:, None] * K + okk[None, :], mask=mi & mk, other=0.0).to(tl.float32)
        kc = tl.load(k_chunk + k0 + oC[:, None] * K + okk[None, :], mask=mkeys & mk, other=0.0).to(tl.float32)
        if USE_G:
            bc, bi, r = _gates(b_chunk, i, n_keys, k0, K, KG, SBK, C, BC, BK, RAW, GMIN)
            qi = qi * tl.exp(bi - r)
            kc = kc * tl.exp(tl.where(upto, r - bc, 0.0))
        att = _dot(qi, tl.trans(kc), att, ET, False, PREC)
    return tl.where(oC[None, :] <= i * BC + oc[:, None], att, 0.0)


@triton.jit
def _attn_intra_mm(q, k, b, A, scale, T, Tp, H, Hk, G,
                   K: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
                   C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                   USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
                   RAW: tl.constexpr = False, GMIN: tl.constexpr = 0.0):
    """`_attn_intra`'s A without its row loop: one program per (BC-row block i, chunk, query head) stores the
    block's whole [BC, C] row of A, `_intra_block` (one matmul per K block through the reference
    r = b at the block's middle row m = i·BC + BC/2 − 1: every factor is ≤ exp((BC/2)·|LOG_GATE_MIN|) = e^40,
    `_chunk_cumsum` clamps the gates; keys of earlier blocks get factors ≤ 1; for s ≤ t the product,
    exp(b_t − b_s), is ≤ 1; keys after the block are not loaded (exponent 0 there); entries with s > t are
    dropped by tl.where, never multiplied). RAW: b is the gates g `[B, Hk, T, KG]` (`Tuning.raw_gates`)."""
    pid, ibh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n, i, ibk, t0 = _row_block(pid, ibh, H, Hk, G, C, BC)
    b_chunk = b + (ibk * (T if RAW else Tp) + t0) * KG
    att = _intra_block(q + (ibh * T + t0 + i * BC) * K, k + (ibk * T + t0) * K, b_chunk, i,
                       T - t0 - i * BC, T - t0, K, KG, SBK, C, BC, BK, USE_G, PREC, RAW, GMIN)
    oc = tl.arange(0, BC)
    oC = tl.arange(0, C)
    tl.store(A + (ibh * Tp + t0 + i * BC) * C + oc[:, None] * C + oC[None, :],
             _lowp(att * scale, A.dtype.element_ty))


@triton.jit
def _o_fwd(q, v, b, h, A, o, scale, T, Tp, H, Hk, G, N,
           K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
           RAW: tl.constexpr = False, GMIN: tl.constexpr = 0.0):
    """o = scale (q ⊙ exp(b)) h[n] + A v for one (chunk, V block, query head). RAW: b is the gates g
    `[B, Hk, T, KG]`, cumulated over the chunk's rows here (`Tuning.raw_gates`)."""
    n, iv, ibh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    ibk = (ibh // H) * Hk + (ibh % H) // G
    t0 = n * C
    oc = tl.arange(0, C)
    okk = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mt = (oc < T - t0)[:, None]
    mv = (ov < V)[None, :]
    ck = oc[:, None] * K + okk[None, :]
    cb = oc[:, None] * KG + okk[None, :] * SBK
    kv = okk[:, None] * V + ov[None, :]
    cv = oc[:, None] * V + ov[None, :]
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk = (okk < K - k0)[None, :]
        qq = tl.load(q + (ibh * T + t0) * K + k0 + ck, mask=mt & mk, other=0.0).to(tl.float32)
        if USE_G:
            if RAW:  # rows ≥ T as zero gates, as `_chunk_cumsum` pads them
                gg = tl.load(b + (ibk * T + t0) * KG + k0 * SBK + cb, mask=mt & mk, other=0.0).to(tl.float32)
                bb = tl.cumsum(tl.maximum(gg, GMIN, propagate_nan=tl.PropagateNan.ALL), axis=0)
            else:
                bb = tl.load(b + (ibk * Tp + t0) * KG + k0 * SBK + cb, mask=mk, other=0.0)
            qq = qq * tl.exp(bb)
        hh = tl.load(h + (ibk * N + n) * K * V + k0 * V + kv, mask=(okk < K - k0)[:, None] & mv, other=0.0)
        acc = _dot(qq, hh, acc, ET, LOWP, PREC)
    acc = acc * scale
    AA = tl.load(A + (ibh * Tp + t0) * C + oc[:, None] * C + oc[None, :])
    vv = tl.load(v + (ibk * T + t0) * V + cv, mask=mt & mv, other=0.0).to(tl.float32)
    acc = _dot(AA, vv, acc, ET, LOWP, PREC)
    tl.store(o + (ibh * T + t0) * V + cv, acc.to(o.dtype.element_ty), mask=mt & mv)


@triton.jit
def _o_fwd_mm(q, k, v, b, h, o, scale, T, Tp, H, Hk, G, N,
              K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
              C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, RAW: tl.constexpr,
              GMIN: tl.constexpr):
    """The forward's output without an A buffer (Tuning.fuse_intra): one program per (BC-row block i, chunk,
    V block, query head) forms the block's [BC, C] row of A in registers — `_intra_block`'s loop, inlined so
    that the inter-chunk product (q_i ⊙ exp(b_i)) h[n] shares its loads — and returns
    o_i = scale ((q_i ⊙ exp(b_i)) h[n] + A_i v), so A is never written to memory nor read back. RAW: b is
    the gates g `[B, Hk, T, KG]`, cumulated here (`_gates`), so the forward needs no b buffer either. A (and
    the gate cumsum) are recomputed per V block and query head: fewer bytes, more arithmetic."""
    pid, iv, ibh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    n, i, ibk, t0 = _row_block(pid, ibh, H, Hk, G, C, BC)
    oc = tl.arange(0, BC)
    oC = tl.arange(0, C)
    okk = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mv = (ov < V)[None, :]
    q_rows = q + (ibh * T + t0 + i * BC) * K
    b_chunk = b + (ibk * (T if RAW else Tp) + t0) * KG
    mi = (oc < T - t0 - i * BC)[:, None]
    upto = (oC < i * BC + BC)[:, None]
    mkeys = upto & (oC < T - t0)[:, None]
    inter = tl.zeros([BC, BV], dtype=tl.float32)
    att = tl.zeros([BC, C], dtype=tl.float32)
    for k0 in range(0, K, BK):  # `_intra_block`'s loop, with the inter-chunk product beside it
        mk = (okk < K - k0)[None, :]
        qi = tl.load(q_rows + k0 + oc[:, None] * K + okk[None, :], mask=mi & mk, other=0.0).to(tl.float32)
        kc = tl.load(k + (ibk * T + t0) * K + k0 + oC[:, None] * K + okk[None, :], mask=mkeys & mk,
                     other=0.0).to(tl.float32)
        hh = tl.load(h + (ibk * N + n) * K * V + (k0 + okk[:, None]) * V + ov[None, :],
                     mask=(okk < K - k0)[:, None] & mv, other=0.0)
        if USE_G:
            bc, bi, r = _gates(b_chunk, i, T - t0, k0, K, KG, SBK, C, BC, BK, RAW, GMIN)
            inter = _dot(qi * tl.exp(bi), hh, inter, ET, LOWP, PREC)
            qi = qi * tl.exp(bi - r)
            kc = kc * tl.exp(tl.where(upto, r - bc, 0.0))
        else:
            inter = _dot(qi, hh, inter, ET, LOWP, PREC)
        att = _dot(qi, tl.trans(kc), att, tl.float32, False, PREC)
    att = tl.where(oC[None, :] <= i * BC + oc[:, None], att, 0.0)
    vv = tl.load(v + (ibk * T + t0) * V + oC[:, None] * V + ov[None, :], mask=(oC < T - t0)[:, None] & mv,
                 other=0.0).to(tl.float32)
    acc = _dot(att * scale, vv, inter * scale, ET, LOWP, PREC)  # scaled before LOWP rounds it, as A is
    tl.store(o + (ibh * T + t0 + i * BC) * V + oc[:, None] * V + ov[None, :], acc.to(o.dtype.element_ty),
             mask=mi & mv)


@triton.jit
def _fwd_scan(q, k, v, g, h0, o, ht, scale, T, H, Hk, G, N,
              K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
              C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              USE_G: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
              GMIN: tl.constexpr):
    """The whole forward in one sequential pass (`Tuning.scan_forward`): one program per (V block, batch·kv
    head) walks the chunks with the state S [K, BV] in registers (BK ≥ K: the whole K in one block). Per
    chunk it loads k, v and g once and cumulates the gates (clamped, as `_chunk_cumsum` does); forms the
    output 16-row block by 16-row block, as `_o_fwd_mm` does, for each of the G query heads of the group
    (the intra-chunk row block through the reference r at the block's middle row, whose gates and key
    tile the heads share; the inter-chunk part from S as it was before the chunk, rounded to the input
    dtype under LOWP as the default forward's h buffer is); then advances S as `_h_fwd` does. No h, A or b buffer, one launch, and the state update is shared by
    the group's query heads; but only B·Hk·NV programs, each N chunks long."""
    iv, ibk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    NC: tl.constexpr = C // BC
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    ob = tl.arange(0, BC)
    mk = (ok < K)[None, :]
    mv = (ov < V)[None, :]
    okv = ok[:, None] * V + ov[None, :]
    mkv = (ok < K)[:, None] & mv
    first = (ibk // Hk) * H + (ibk % Hk) * G  # the group's first query head
    if HAS_H0:
        S = tl.load(h0 + ibk * K * V + okv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        t0 = n * C
        mt = (oc < T - t0)[:, None]
        # k and v stay as loaded (bf16 tiles take half the registers); `_dot` converts its operands
        kk = tl.load(k + (ibk * T + t0) * K + oc[:, None] * K + ok[None, :], mask=mt & mk, other=0.0)
        vv = tl.load(v + (ibk * T + t0) * V + oc[:, None] * V + ov[None, :], mask=mt & mv, other=0.0)
        if USE_G:  # rows ≥ T as zero gates, so bb stays flat past T and its last row is the chunk's decay
            gg = tl.load(g + (ibk * T + t0) * KG + oc[:, None] * KG + ok[None, :] * SBK, mask=mt & mk,
                         other=0.0).to(tl.float32)
            bb = tl.cumsum(tl.maximum(gg, GMIN, propagate_nan=tl.PropagateNan.ALL), axis=0)
            b3 = tl.reshape(bb, (NC, BC, BK))
        if LOWP:  # the rounding `_dot` would apply to S in every product below, done once per chunk
            hs = _lowp(S, ET)
        else:
            hs = S
        for i in range(NC):  # a loop, not unrolled: unrolled, the four blocks' tiles spill (280 bytes at 8 warps)
            mi = (ob < T - t0 - i * BC)[:, None]
            if USE_G:  # block i's rows of bb and r, picked out by masked sums of zeros (exact); its key tile
                bi = tl.sum(tl.where((tl.arange(0, NC) == i)[:, None, None], b3, 0.0), axis=0)
                r = tl.sum(tl.where((oc == i * BC + BC // 2 - 1)[:, None], bb, 0.0), axis=0)[None, :]
                # keys after the block keep factor 1: their entries (s > t) are dropped below
                kc = kk.to(tl.float32) * tl.exp(tl.where((oc < i * BC + BC)[:, None], r - bb, 0.0))
                qf, qr = tl.exp(bi), tl.exp(bi - r)  # the query factors of the inter- and intra-chunk parts
            else:
                kc = kk.to(tl.float32)
            for j in range(G):  # the group's query heads share the block's gates and key tile
                q_rows = q + ((first + j) * T + t0 + i * BC) * K
                qi = tl.load(q_rows + ob[:, None] * K + ok[None, :], mask=mi & mk, other=0.0).to(tl.float32)
                inter = tl.zeros([BC, BV], dtype=tl.float32)
                if USE_G:
                    inter = _dot(qi * qf, hs, inter, ET, LOWP, PREC)
                    qi = qi * qr
                else:
                    inter = _dot(qi, hs, inter, ET, LOWP, PREC)
                att = _dot(qi, tl.trans(kc), tl.zeros([BC, C], dtype=tl.float32), tl.float32, False, PREC)
                att = tl.where(oc[None, :] <= i * BC + ob[:, None], att, 0.0)
                acc = _dot(att * scale, vv, inter * scale, ET, LOWP, PREC)  # scaled before LOWP rounds it
                tl.store(o + ((first + j) * T + t0 + i * BC) * V + ob[:, None] * V + ov[None, :],
                         acc.to(o.dtype.element_ty), mask=mi & mv)
        if USE_G:
            bl = tl.sum(tl.where((oc == C - 1)[:, None], bb, 0.0), axis=0)
            S = S * tl.exp(bl)[:, None]
            S = _dot(tl.trans(kk.to(tl.float32) * tl.exp(bl[None, :] - bb)), vv, S, ET, LOWP, PREC)
        else:
            S = _dot(tl.trans(kk), vv, S, ET, LOWP, PREC)
    tl.store(ht + ibk * K * V + okv, S, mask=mkv)


@triton.jit
def _dh_bwd(q, do, b, dht, dh, dh0, scale, T, Tp, H, Hk, G, N,
            K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            USE_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
            LOWP: tl.constexpr):
    """dh[n] = gradient of the state after chunk n (= before chunk n+1); dh0 = gradient of the initial state."""
    ik, iv, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    bi = ibk // Hk
    hk = ibk % Hk
    ok = ik * BK + tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    oc = tl.arange(0, C)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    okv = ok[:, None] * V + ov[None, :]
    ck = oc[:, None] * K + ok[None, :]
    cv = oc[:, None] * V + ov[None, :]
    cb = oc[:, None] * KG + ok[None, :] * SBK
    if HAS_DHT:
        D = tl.load(dht + ibk * K * V + okv, mask=mkv, other=0.0).to(tl.float32)
    else:
        D = tl.zeros([BK, BV], dtype=tl.float32)
    for m in range(N):
        n = N - 1 - m
        t0 = n * C
        tl.store(dh + (ibk * N + n) * K * V + okv, _lowp(D, dh.dtype.element_ty), mask=mkv)
        mt = (oc < T - t0)[:, None]
        if USE_G:
            bb = tl.load(b + (ibk * Tp + t0) * KG + cb, mask=mk[None, :], other=0.0)
            bl = tl.load(b + (ibk * Tp + t0 + C - 1) * KG + ok * SBK, mask=mk, other=0.0)
            D = D * tl.exp(bl)[:, None]
            eb = tl.exp(bb)
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for gi in range(G):
            ibh = bi * H + hk * G + gi
            qq = tl.load(q + (ibh * T + t0) * K + ck, mask=mt & mk[None, :], other=0.0).to(tl.float32)
            if USE_G:
                qq = qq * eb
            dd = tl.load(do + (ibh * T + t0) * V + cv, mask=mt & mv[None, :], other=0.0).to(tl.float32)
            acc = _dot(tl.trans(qq), dd, acc, ET, LOWP, PREC)
        D += acc * scale
    if STORE_DH0:
        tl.store(dh0 + ibk * K * V + okv, D, mask=mkv)


@triton.jit
def _dA_bwd(do, v, dA, scale, T, Tp, H, Hk, G,
            V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """dA[t, s] = scale do_t · v_s for s ≤ t in the chunk, 0 above the diagonal."""
    n, ibh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ET: tl.constexpr = v.dtype.element_ty
    ibk = (ibh // H) * Hk + (ibh % H) // G
    t0 = n * C
    oc = tl.arange(0, C)
    ovv = tl.arange(0, BV)
    mt = (oc < T - t0)[:, None]
    cv = oc[:, None] * V + ovv[None, :]
    acc = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        m = mt & (ovv < V - v0)[None, :]
        dd = tl.load(do + (ibh * T + t0) * V + v0 + cv, mask=m, other=0.0).to(tl.float32)
        vv = tl.load(v + (ibk * T + t0) * V + v0 + cv, mask=m, other=0.0).to(tl.float32)
        acc = _dot(dd, tl.trans(vv), acc, ET, LOWP, PREC)
    acc = tl.where(oc[:, None] >= oc[None, :], acc * scale, 0.0)
    tl.store(dA + (ibh * Tp + t0) * C + oc[:, None] * C + oc[None, :], acc)


@triton.jit
def _dqk_bwd(q, k, v, b, h, do, dh, dA, dq, dk, dB, dC, scale, T, Tp, H, Hk, G, N,
             K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
             C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, DIAG_MM: tl.constexpr,
             CARRY: tl.constexpr, INTER: tl.constexpr = True):
    """Per (chunk, K block, kv head): dq of the G query heads, dk summed over them, dB = Σ q⊙dq − k⊙dk.

    INTER=False (Tuning.dqk "split"): only the intra-chunk terms, stored to dq and dk (fp32 scratch buffers
    then); `_dqk_inter` adds the inter-chunk terms in 64-row tiles and stores dq, dk, dB (and dC, so CARRY
    must be False here).

    CARRY (Tuning.dg_form "carry", with gates): also dC[n] = Σ_v S_n ⊙ dS_n `[B, Hk, N, K]`, the state after
    chunk n times its gradient dh[n], as exp(b_last) ⊙ Σ_v h[n] ⊙ dh[n] + Σ_s k_s ⊙ dk_s^inter, since
    S_n = exp(b_last) ⊙ h[n] + Σ_s (k_s ⊙ exp(b_last − b_s)) v_sᵀ and
    dk_s^inter = exp(b_last − b_s) ⊙ (dh[n] v_s): dk's inter-chunk tiles, and h[n] read once more.

    Sub-chunk i of 16 rows at a time. DIAG_MM (Tuning.intra "matmul"): one reference r = b at the
    sub-chunk's middle row i·16 + 7 for both; dq_i = exp(b_i − r) ⊙ (dA[i rows, :] (k ⊙ exp(r − b))) over the
    keys up to the end of the sub-chunk, dk_i = exp(r − b_i) ⊙ (dA[:, i cols]ᵀ (q ⊙ exp(b − r))) over the
    queries from its start: one matmul each, every factor ≤ e^40 as in `_attn_intra_mm` (dA is 0 above the
    diagonal, and the factors outside those ranges are exp(0) = 1, so nothing infinite meets a zero).
    Otherwise, dq: keys of earlier sub-chunks through the reference at row i·16 − 1; dk: queries of later
    sub-chunks through the reference at row i·16 + 15 (the end of the key's sub-chunk); diagonal blocks one
    row at a time ([16, BK] each: key rows for dq, query rows for dk) with exponents masked to ≤ 0 before
    the exp.
    """
    tl.static_assert(INTER or not CARRY, "the carry needs the inter-chunk terms (_dqk_inter forms it)")
    n, ik, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    bi = ibk // Hk
    hk = ibk % Hk
    t0 = n * C
    ok = ik * BK + tl.arange(0, BK)
    oc = tl.arange(0, BC)
    oC = tl.arange(0, C)
    ovv = tl.arange(0, BV)
    mk1 = ok < K
    mk = mk1[None, :]
    mC = (oC < T - t0)[:, None]
    ck = oC[:, None] * K + ok[None, :]
    cb = oC[:, None] * KG + ok[None, :] * SBK
    ik_ = oc[:, None] * K + ok[None, :]
    ib = oc[:, None] * KG + ok[None, :] * SBK
    iv_ = oc[:, None] * V + ovv[None, :]
    kv = ok[:, None] * V + ovv[None, :]
    mkT = (ok < K)[:, None]
    k_base = k + (ibk * T + t0) * K
    v_base = v + (ibk * T + t0) * V
    b_base = b + (ibk * Tp + t0) * KG
    h_base = h + (ibk * N + n) * K * V
    dh_base = dh + (ibk * N + n) * K * V
    NC: tl.constexpr = C // BC
    # the chunk's k and b tiles: held across the sub-chunks, or (DIAG_MM) loaded again for each (from cache),
    # which keeps the matmul form under 255 registers without spilling at 4 warps (kernel_resources.py)
    if not DIAG_MM:
        kc = tl.load(k_base + ck, mask=mC & mk, other=0.0).to(tl.float32)
    if USE_G:
        if not DIAG_MM:
            bc = tl.load(b_base + cb, mask=mk, other=0.0)
        bl = tl.load(b_base + (C - 1) * KG + ok[None, :] * SBK, mask=mk, other=0.0)
    if CARRY:
        hdh = tl.zeros([BK], dtype=tl.float32)  # Σ_v h[n] ⊙ dh[n]
        kdk = tl.zeros([BK], dtype=tl.float32)  # Σ_s k_s ⊙ dk_s^inter
    for i in tl.static_range(NC):
        mi = (oc < T - t0 - i * BC)[:, None]
        ki = tl.load(k_base + i * BC * K + ik_, mask=mi & mk, other=0.0).to(tl.float32)
        if DIAG_MM:
            kr = tl.load(k_base + ck, mask=mC & mk, other=0.0).to(tl.float32)
        if USE_G and DIAG_MM:
            bi_ = tl.load(b_base + i * BC * KG + ib, mask=mk, other=0.0)
            r = tl.load(b_base + (i * BC + BC // 2 - 1) * KG + ok[None, :] * SBK, mask=mk, other=0.0)
            bc = tl.load(b_base + cb, mask=mk, other=0.0)
            kr = kr * tl.exp(tl.where(oC[:, None] < i * BC + BC, r - bc, 0.0))
            qs = tl.exp(bi_ - r)
            eb = tl.exp(bi_)
        elif USE_G:
            bi_ = tl.load(b_base + i * BC * KG + ib, mask=mk, other=0.0)
            if i > 0:
                r = tl.load(b_base + (i * BC - 1) * KG + ok[None, :] * SBK, mask=mk, other=0.0)
                kr = kc * tl.exp(tl.where(oC[:, None] < i * BC, r - bc, 0.0))
                qs = tl.exp(bi_ - r)
            if i < NC - 1:
                r2 = tl.load(b_base + (i * BC + BC - 1) * KG + ok[None, :] * SBK, mask=mk, other=0.0)
                qs2 = tl.exp(tl.where(oC[:, None] >= i * BC + BC, bc - r2, 0.0))
                ks2 = tl.exp(r2 - bi_)
            eb = tl.exp(bi_)
        elif not DIAG_MM:
            kr = kc
        # ---- dq of sub-chunk i, one query head at a time
        qdq = tl.zeros([BC, BK], dtype=tl.float32)
        for gi in range(G):
            ibh = bi * H + hk * G + gi
            q_base = q + (ibh * T + t0) * K
            dA_base = dA + (ibh * Tp + t0 + i * BC) * C
            acc = tl.zeros([BC, BK], dtype=tl.float32)
            if INTER:
                for v0 in range(0, V, BV):
                    mv = (ovv < V - v0)[None, :]
                    dd = tl.load(do + (ibh * T + t0 + i * BC) * V + v0 + iv_, mask=mi & mv,
                                 other=0.0).to(tl.float32)
                    hh = tl.load(h_base + v0 + kv, mask=mkT & mv, other=0.0)
                    acc = _dot(dd, tl.trans(hh), acc, ET, LOWP, PREC)
                acc = acc * scale
                if USE_G:
                    acc = acc * eb
            if DIAG_MM:  # every key up to the end of sub-chunk i in one matmul (dA is 0 after the diagonal)
                dAr = tl.load(dA_base + oc[:, None] * C + oC[None, :])
                intra = _dot(dAr, kr, tl.zeros([BC, BK], dtype=tl.float32), ET, False, PREC)
                if USE_G:
                    intra = intra * qs
                acc += intra
            else:  # keys of earlier sub-chunks by a matmul, the diagonal block one key row at a time
                if i > 0:
                    dAr = tl.load(dA_base + oc[:, None] * C + oC[None, :], mask=(oC < i * BC)[None, :], other=0.0)
                    intra = _dot(dAr, kr, tl.zeros([BC, BK], dtype=tl.float32), ET, LOWP, PREC)
                    if USE_G:
                        intra = intra * qs
                    acc += intra
                if USE_G:
                    # diagonal block, one key row j at a time: acc[t] += dA[t, j] k_j exp(b_t − b_j), t ≥ j
                    # (dA is 0 above the diagonal; the exponent is masked to 0 there before the exp)
                    for j in range(tl.minimum(BC, T - t0 - i * BC)):  # rows ≥ T: nothing to add
                        dAj = tl.load(dA_base + oc * C + i * BC + j)
                        kj = tl.load(k_base + (i * BC + j) * K + ok, mask=mk1, other=0.0).to(tl.float32)
                        bj = tl.load(b_base + (i * BC + j) * KG + ok * SBK, mask=mk1, other=0.0)
                        e = tl.exp(tl.where(oc[:, None] >= j, bi_ - bj[None, :], 0.0))
                        acc += dAj[:, None] * kj[None, :] * e
                else:
                    dAii = tl.load(dA_base + i * BC + oc[:, None] * C + oc[None, :])
                    acc = _dot(dAii, ki, acc, ET, LOWP, PREC)
            tl.store(dq + (ibh * T + t0 + i * BC) * K + ik_, acc.to(dq.dtype.element_ty), mask=mi & mk)
            if INTER:
                qi = tl.load(q_base + i * BC * K + ik_, mask=mi & mk, other=0.0).to(tl.float32)
                qdq += qi * acc
        # ---- dk of sub-chunk i, summed over the query heads
        dkk = tl.zeros([BC, BK], dtype=tl.float32)
        if INTER:
            for v0 in range(0, V, BV):
                mv = (ovv < V - v0)[None, :]
                vv = tl.load(v_base + i * BC * V + v0 + iv_, mask=mi & mv, other=0.0).to(tl.float32)
                dhh = tl.load(dh_base + v0 + kv, mask=mkT & mv, other=0.0)
                dkk = _dot(vv, tl.trans(dhh), dkk, ET, LOWP, PREC)
                if CARRY:
                    if i == 0:
                        hh = tl.load(h_base + v0 + kv, mask=mkT & mv, other=0.0)
                        hdh += tl.sum(hh.to(tl.float32) * dhh.to(tl.float32), axis=1)
        if USE_G:
            if INTER:
                dkk = dkk * tl.exp(bl - bi_)
            if CARRY:
                kdk += tl.sum(ki * dkk, axis=0)
            if DIAG_MM:  # the query and key factors of dk, through the same reference r
                qs2 = tl.exp(tl.where(oC[:, None] >= i * BC, tl.load(b_base + cb, mask=mk, other=0.0) - r, 0.0))
                ks2 = tl.exp(r - bi_)
        intra = tl.zeros([BC, BK], dtype=tl.float32)
        diag = tl.zeros([BC, BK], dtype=tl.float32)
        for gi in range(G):
            ibh = bi * H + hk * G + gi
            q_base = q + (ibh * T + t0) * K
            dA_base = dA + (ibh * Tp + t0) * C
            if DIAG_MM:  # every query from the start of sub-chunk i in one matmul (dA is 0 before it)
                qc = tl.load(q_base + ck, mask=mC & mk, other=0.0).to(tl.float32)
                if USE_G:
                    qc = qc * qs2
                dAc = tl.load(dA_base + i * BC + oC[:, None] * C + oc[None, :])
                intra = _dot(tl.trans(dAc), qc, intra, ET, False, PREC)
            else:  # queries of later sub-chunks by a matmul, the diagonal block one query row at a time
                if i < NC - 1:
                    qc = tl.load(q_base + ck, mask=mC & mk, other=0.0).to(tl.float32)
                    if USE_G:
                        qc = qc * qs2
                    dAc = tl.load(dA_base + i * BC + oC[:, None] * C + oc[None, :],
                                  mask=(oC >= i * BC + BC)[:, None], other=0.0)
                    intra = _dot(tl.trans(dAc), qc, intra, ET, LOWP, PREC)
                if USE_G:
                    # diagonal block, one query row j at a time: dk[s] += dA[j, s] q_j exp(b_j − b_s), s ≤ j
                    for j in range(tl.minimum(BC, T - t0 - i * BC)):  # rows ≥ T: nothing to add
                        dAj = tl.load(dA_base + (i * BC + j) * C + i * BC + oc)
                        qj = tl.load(q_base + (i * BC + j) * K + ok, mask=mk1, other=0.0).to(tl.float32)
                        bj = tl.load(b_base + (i * BC + j) * KG + ok * SBK, mask=mk1, other=0.0)
                        e = tl.exp(tl.where(oc[:, None] <= j, bj[None, :] - bi_, 0.0))
                        diag += dAj[:, None] * qj[None, :] * e
                else:
                    qi = tl.load(q_base + i * BC * K + ik_, mask=mi & mk, other=0.0).to(tl.float32)
                    dAii = tl.load(dA_base + i * BC * C + i * BC + oc[:, None] * C + oc[None, :])
                    diag = _dot(tl.trans(dAii), qi, diag, ET, LOWP, PREC)
        if USE_G:
            if DIAG_MM or i < NC - 1:
                intra = intra * ks2
        dkk += intra + diag
        tl.store(dk + (ibk * T + t0 + i * BC) * K + ik_, dkk.to(dk.dtype.element_ty), mask=mi & mk)
        if INTER:
            tl.store(dB + (ibk * T + t0 + i * BC) * K + ik_, qdq - ki * dkk, mask=mi & mk)
    if CARRY:
        tl.store(dC + (ibk * N + n) * K + ok, tl.sum(tl.exp(bl) * hdh[None, :], axis=0) + kdk, mask=mk1)


@triton.jit
def _dqk_inter(q, k, v, b, h, do, dh, dqi, dki, dq, dk, dB, dC, scale, T, Tp, H, Hk, G, N,
               K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, CARRY: tl.constexpr):
    """Tuning.dqk "split": per (chunk, K block, kv head), the inter-chunk terms of dq and dk over the whole chunk
    (64-row tiles: on Hopper a wgmma, where `_dqk_bwd`'s 16-row sub-chunks get mma.sync),
        dq = dqi + scale exp(b) ⊙ (do h[n]ᵀ)  per query head,   dk = dki + exp(b_last − b) ⊙ (v dh[n]ᵀ),
    with dqi, dki the intra-chunk terms (fp32, from `_dqk_bwd` INTER=False); stores dq, dk, dB = Σ q⊙dq − k⊙dk
    and, with CARRY, dC as `_dqk_bwd` does."""
    n, ik, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = q.dtype.element_ty
    bi = ibk // Hk
    hk = ibk % Hk
    t0 = n * C
    ok = ik * BK + tl.arange(0, BK)
    oC = tl.arange(0, C)
    ovv = tl.arange(0, BV)
    mk1 = ok < K
    mk = mk1[None, :]
    mC = (oC < T - t0)[:, None]
    ck = oC[:, None] * K + ok[None, :]
    cv = oC[:, None] * V + ovv[None, :]
    kv = ok[:, None] * V + ovv[None, :]
    mkT = mk1[:, None]
    h_base = h + (ibk * N + n) * K * V
    dh_base = dh + (ibk * N + n) * K * V
    if USE_G:
        bc = tl.load(b + (ibk * Tp + t0) * KG + oC[:, None] * KG + ok[None, :] * SBK, mask=mk, other=0.0)
        bl = tl.load(b + (ibk * Tp + t0 + C - 1) * KG + ok[None, :] * SBK, mask=mk, other=0.0)
    # ---- dk: inter-chunk term, then the intra-chunk one
    dkk = tl.zeros([C, BK], dtype=tl.float32)
    if CARRY:
        hdh = tl.zeros([BK], dtype=tl.float32)  # Σ_v h[n] ⊙ dh[n]
    for v0 in range(0, V, BV):
        mv = (ovv < V - v0)[None, :]
        vv = tl.load(v + (ibk * T + t0) * V + v0 + cv, mask=mC & mv, other=0.0).to(tl.float32)
        dhh = tl.load(dh_base + v0 + kv, mask=mkT & mv, other=0.0)
        dkk = _dot(vv, tl.trans(dhh), dkk, ET, LOWP, PREC)
        if CARRY:
            hh = tl.load(h_base + v0 + kv, mask=mkT & mv, other=0.0)
            hdh += tl.sum(hh.to(tl.float32) * dhh.to(tl.float32), axis=1)
    kc = tl.load(k + (ibk * T + t0) * K + ck, mask=mC & mk, other=0.0).to(tl.float32)
    if USE_G:
        dkk = dkk * tl.exp(bl - bc)
    if CARRY:
        kdk = tl.sum(kc * dkk, axis=0)  # Σ_s k_s ⊙ dk_s^inter
        tl.store(dC + (ibk * N + n) * K + ok, tl.sum(tl.exp(bl) * hdh[None, :], axis=0) + kdk, mask=mk1)
    dkk += tl.load(dki + (ibk * T + t0) * K + ck, mask=mC & mk, other=0.0)
    tl.store(dk + (ibk * T + t0) * K + ck, dkk.to(dk.dtype.element_ty), mask=mC & mk)
    # ---- dq of each query head of the group
    qdq = tl.zeros([C, BK], dtype=tl.float32)
    for gi in range(G):
        ibh = bi * H + hk * G + gi
        acc = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            mv = (ovv < V - v0)[None, :]
            dd = tl.load(do + (ibh * T + t0) * V + v0 + cv, mask=mC & mv, other=0.0).to(tl.float32)
            hh = tl.load(h_base + v0 + kv, mask=mkT & mv, other=0.0)
            acc = _dot(dd, tl.trans(hh), acc, ET, LOWP, PREC)
        acc = acc * scale
        if USE_G:
            acc = acc * tl.exp(bc)
        acc += tl.load(dqi + (ibh * T + t0) * K + ck, mask=mC & mk, other=0.0)
        tl.store(dq + (ibh * T + t0) * K + ck, acc.to(dq.dtype.element_ty), mask=mC & mk)
        qc = tl.load(q + (ibh * T + t0) * K + ck, mask=mC & mk, other=0.0).to(tl.float32)
        qdq += qc * acc
    tl.store(dB + (ibk * T + t0) * K + ck, qdq - kc * dkk, mask=mC & mk)


@triton.jit
def _dv_bwd(q, k, b, dh, A, do, dv, scale, T, Tp, H, Hk, G, N,
            K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
            C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            USE_G: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, FUSED: tl.constexpr,
            APREC: tl.constexpr):
    """dv = Σ_heads Aᵀ do + (k ⊙ exp(b_last − b)) dh[n]. FUSED (Tuning.fuse_intra): A is not read but formed
    here, one BC-row block at a time (`_intra_block`, at the forward's precision APREC), dv += scale A_iᵀ do_i;
    q and scale are used only then."""
    n, iv, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ET: tl.constexpr = k.dtype.element_ty
    bi = ibk // Hk
    hk = ibk % Hk
    t0 = n * C
    oc = tl.arange(0, C)
    okk = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mt = (oc < T - t0)[:, None]
    mv = (ov < V)[None, :]
    ck = oc[:, None] * K + okk[None, :]
    cb = oc[:, None] * KG + okk[None, :] * SBK
    kv = okk[:, None] * V + ov[None, :]
    cv = oc[:, None] * V + ov[None, :]
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk = (okk < K - k0)[None, :]
        kk = tl.load(k + (ibk * T + t0) * K + k0 + ck, mask=mt & mk, other=0.0).to(tl.float32)
        if USE_G:
            bb = tl.load(b + (ibk * Tp + t0) * KG + k0 * SBK + cb, mask=mk, other=0.0)
            bl = tl.load(b + (ibk * Tp + t0 + C - 1) * KG + k0 * SBK + okk[None, :] * SBK, mask=mk, other=0.0)
            kk = kk * tl.exp(bl - bb)
        dhh = tl.load(dh + (ibk * N + n) * K * V + k0 * V + kv, mask=(okk < K - k0)[:, None] & mv, other=0.0)
        acc = _dot(kk, dhh, acc, ET, LOWP, PREC)
    cc = oc[:, None] * C + oc[None, :]
    for gi in range(G):
        ibh = bi * H + hk * G + gi
        if FUSED:
            ob = tl.arange(0, BC)
            NC: tl.constexpr = C // BC
            for i in tl.static_range(NC):
                att = _intra_block(q + (ibh * T + t0 + i * BC) * K, k + (ibk * T + t0) * K, b + (ibk * Tp + t0) * KG,
                                   i, T - t0 - i * BC, T - t0, K, KG, SBK, C, BC, BK, USE_G, APREC, False, 0.0)
                dd = tl.load(do + (ibh * T + t0 + i * BC) * V + ob[:, None] * V + ov[None, :],
                             mask=(ob < T - t0 - i * BC)[:, None] & mv, other=0.0).to(tl.float32)
                acc = _dot(tl.trans(att * scale), dd, acc, ET, LOWP, PREC)
        else:
            AA = tl.load(A + (ibh * Tp + t0) * C + cc)
            dd = tl.load(do + (ibh * T + t0) * V + cv, mask=mt & mv, other=0.0).to(tl.float32)
            acc = _dot(tl.trans(AA), dd, acc, ET, LOWP, PREC)
    tl.store(dv + (ibk * T + t0) * V + cv, acc.to(dv.dtype.element_ty), mask=mt & mv)


@triton.jit
def _chunk_cumsum(g, b, T, Tp, KG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, GMIN: tl.constexpr):
    """b = chunk-local inclusive cumulative sum of max(g, GMIN) in fp32, per (chunk, K block, batch·kv head):
    one [C, BK] tile each. Rows ≥ T are zero gates (b stays flat there); every row < Tp of b is written."""
    n, ik, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t0 = n * C
    oc = tl.arange(0, C)
    ok = ik * BK + tl.arange(0, BK)
    mk = (ok < KG)[None, :]
    ck = oc[:, None] * KG + ok[None, :]
    x = tl.load(g + (ibk * T + t0) * KG + ck, mask=(oc < T - t0)[:, None] & mk, other=0.0).to(tl.float32)
    x = tl.maximum(x, GMIN, propagate_nan=tl.PropagateNan.ALL)  # a NaN gate stays NaN, as in the oracle
    tl.store(b + (ibk * Tp + t0) * KG + ck, tl.cumsum(x, axis=0), mask=mk)


@triton.jit
def _rev_cumsum(x, last, gate, y, T, N, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                HAS_LAST: tl.constexpr, HAS_GATE: tl.constexpr, GMIN: tl.constexpr):
    """y[t] = Σ_{u ≥ t} x[u] (+ last, which belongs to row T−1) over the whole sequence, fp32, per (K block,
    batch·kv head): walks the chunks from the last to the first, each [C, BK] tile loaded with its rows
    reversed so that an inclusive tl.cumsum down the tile is the suffix sum; the running total of the later
    chunks is carried across. With HAS_GATE, y[t] is stored as 0 where gate[t] < GMIN (the gradient of the
    clamp; gate laid out like x). y may be x (each tile is read before it is written)."""
    ik, ibk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    ok = ik * BK + tl.arange(0, BK)
    mk = ok < K
    rc = C - 1 - tl.arange(0, C)  # rows of a chunk, last first
    cr = rc[:, None] * K + ok[None, :]
    if HAS_LAST:
        carry = tl.load(last + ibk * K + ok, mask=mk, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BK], dtype=tl.float32)
    for m in range(N):
        t0 = (N - 1 - m) * C
        msk = (rc < T - t0)[:, None] & mk[None, :]
        xx = tl.load(x + (ibk * T + t0) * K + cr, mask=msk, other=0.0).to(tl.float32)
        yy = tl.cumsum(xx, axis=0) + carry[None, :]
        if HAS_GATE:
            gg = tl.load(gate + (ibk * T + t0) * K + cr, mask=msk, other=0.0).to(tl.float32)
            yy = tl.where(gg >= GMIN, yy, 0.0)
        tl.store(y + (ibk * T + t0) * K + cr, yy, mask=msk)
        carry += tl.sum(xx, axis=0)


@triton.jit
def _chunk_suffix(x, carry, gate, y, T, N, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                  HAS_GATE: tl.constexpr, GMIN: tl.constexpr):
    """y[t] = Σ_{u ≥ t, u in t's chunk} x[u] + carry[t's chunk], fp32, per (chunk, K block, batch·kv head): the
    tile loaded with its rows reversed, so that an inclusive tl.cumsum down it is the suffix sum. Chunks are
    independent (no walk over the sequence). With HAS_GATE, 0 where gate[t] < GMIN, as `_rev_cumsum`. y may
    be x."""
    n, ik, ibk = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ok = ik * BK + tl.arange(0, BK)
    mk = ok < K
    rc = C - 1 - tl.arange(0, C)  # rows of the chunk, last first
    cr = rc[:, None] * K + ok[None, :]
    t0 = n * C
    msk = (rc < T - t0)[:, None] & mk[None, :]
    xx = tl.load(x + (ibk * T + t0) * K + cr, mask=msk, other=0.0).to(tl.float32)
    yy = tl.cumsum(xx, axis=0) + tl.load(carry + (ibk * N + n) * K + ok, mask=mk, other=0.0)[None, :]
    if HAS_GATE:
        gg = tl.load(gate + (ibk * T + t0) * K + cr, mask=msk, other=0.0).to(tl.float32)
        yy = tl.where(gg >= GMIN, yy, 0.0)
    tl.store(y + (ibk * T + t0) * K + cr, yy, mask=msk)


@triton.jit
def _step_kernel(q, k, v, g, S, S_out, o, scale, H, Hk, G,
                 K: tl.constexpr, V: tl.constexpr, KG: tl.constexpr, SBK: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, GMIN: tl.constexpr):
    iv, ibk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    bi = ibk // Hk
    hk = ibk % Hk
    ok = tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    mkv = mk[:, None] & mv[None, :]
    okv = ok[:, None] * V + ov[None, :]
    s = tl.load(S + ibk * K * V + okv, mask=mkv, other=0.0).to(tl.float32)
    if USE_G:
        gg = tl.load(g + ibk * KG + ok * SBK, mask=mk, other=0.0).to(tl.float32)
        s = s * tl.exp(tl.maximum(gg, GMIN, propagate_nan=tl.PropagateNan.ALL))[:, None]
    kk = tl.load(k + ibk * K + ok, mask=mk, other=0.0).to(tl.float32)
    vv = tl.load(v + ibk * V + ov, mask=mv, other=0.0).to(tl.float32)
    s += kk[:, None] * vv[None, :]
    tl.store(S_out + ibk * K * V + okv, s, mask=mkv)
    for gi in range(G):
        ibh = bi * H + hk * G + gi
        qq = tl.load(q + ibh * K + ok, mask=mk, other=0.0).to(tl.float32)
        oo = tl.sum(qq[:, None] * s, axis=0) * scale
        tl.store(o + ibh * V + ov, oo.to(o.dtype.element_ty), mask=mv)


# --------------------------------------------------------------------------------------------------
# Wrappers.


def supported(q, k, v, g) -> str | None:
    """None when the Triton kernels handle these inputs, else a one-line reason to fall back to PyTorch."""
    if not (q.is_cuda or _interpret()):
        return "not a CUDA tensor (and TRITON_INTERPRET is not set)"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return f"unexpected ranks q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        return f"head dim K={K}, V={V} > {MAX_HEAD_DIM}"
    if k.shape[-1] != K or k.shape[:-1] != v.shape[:-1]:
        return f"mismatched shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    H, Hk = q.shape[1], k.shape[1]
    if Hk == 0 or H % Hk:
        return f"{H} query heads cannot share {Hk} kv heads"
    if q.shape[0] != k.shape[0] or (q.dim() == 4 and q.shape[2] != k.shape[2]):
        return "q and k differ in batch or length"
    for name, x in (("q", q), ("k", k), ("v", v)) + ((("g", g),) if g is not None else ()):
        if x.dtype not in _DTYPES:
            return f"{name} dtype {x.dtype} not in fp32/fp16/bf16"
        if x.device != q.device:
            return f"{name} on {x.device}, q on {q.device}"
    if g is not None and (g.shape[:-1] != k.shape[:-1] or g.shape[-1] not in (1, K)):
        return f"gate shape {tuple(g.shape)} is neither [..., {K}] nor [..., 1]"
    return None


def _precision(q, k, v, requested: str) -> str:
    """The precision a call runs: `requested` for bf16 or fp16 q, k, v of one dtype, except that fp16 runs
    "mixed" as "full" (fp16's range: without decay the states can pass 65504 over long sequences); fp32 or
    mixed dtypes: "full"."""
    half = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    if requested not in PRECISION:
        raise ValueError(f"precision must be one of {', '.join(PRECISION)}, got {requested!r}")
    if not half or (requested == "mixed" and q.dtype == torch.float16):
        return "full"
    return requested


def kept_layout(q, k, v, g, keep_a: bool = True, keep_b: bool = True, precision: str | None = None):
    """What `chunk_gla_fwd(..., keep_a, keep_b, precision)` returns as A and b: (A's shape and dtype, or None;
    b's shape, or None). None where not asked for, with fuse_intra or scan_forward (the forward forms
    neither) and b without gates; A's dtype follows the precision (TUNING's unless given). Shapes may be
    symbolic: the custom op's register_fake calls this too."""
    if TUNING.keeps_nothing:
        return None, None
    B, H, T = q.shape[0], q.shape[1], q.shape[2]
    Tp = (T + CHUNK - 1) // CHUNK * CHUNK
    a_dtype = torch.float32 if _precision(q, k, v, precision or TUNING.precision) == "full" else q.dtype
    a_layout = ((B, H, Tp, CHUNK), a_dtype) if keep_a else None
    b_shape = (B, k.shape[1], Tp, g.shape[-1]) if keep_b and g is not None else None
    return a_layout, b_shape


def _matches(x, shape, dtype, device) -> bool:
    return (x is not None and tuple(x.shape) == tuple(shape) and x.dtype == dtype and x.device == device
            and x.is_contiguous())


def _prec(*xs) -> str:
    return "ieee" if all(x.dtype == torch.float32 for x in xs) else "tf32"


def _cum_gates(g, B, Hk, T, N, C):
    """Chunk-local cumulative log gates, fp32 [B, Hk, N·C, KG], padded with zero gates; (b, KG, SBK).
    Same values as `g.float()` zero-padded to N·C rows, then `.reshape(B, Hk, N, C, KG).cumsum(3)`, up to
    the summation order (`_chunk_cumsum`)."""
    if g is None:
        return None, 1, 0
    KG = g.shape[-1]
    b = _empty(B, Hk, N * C, KG, device=g.device)
    if N and B * Hk:
        BK = _pow2(KG)
        _chunk_cumsum[(N, triton.cdiv(KG, BK), B * Hk)](g.contiguous(), b, T, N * C, KG=KG, C=C, BK=BK,
                                                        GMIN=LOG_GATE_MIN)
    return b, KG, (1 if KG > 1 else 0)


def _suffix_out(x, gate, out):
    """The checks `_reverse_cumsum` and `_chunk_suffix_sum` share: gate shaped like x, out (if given) fp32
    contiguous like x; returns out, or a new fp32 tensor."""
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must be {tuple(x.shape)}, got {tuple(gate.shape)}")
    if out is None:
        return _empty(*x.shape, device=x.device)
    if out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be fp32 contiguous {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    return out


def _reverse_cumsum(x, last=None, out=None, gate=None):
    """Σ_{u ≥ t} x[..., u, :] over dim 2 of a [B, Hk, T, K] tensor, fp32 (`_rev_cumsum`): the value of
    `x.flip(2).cumsum(2).flip(2)` up to the summation order, where x[:, :, T−1] is taken plus `last`
    [B, Hk, K] if given (x itself is not modified unless out is x); zero where `gate` (x's shape, if given)
    is below LOG_GATE_MIN. out: fp32 contiguous [B, Hk, T, K] (may be x), else a new tensor."""
    B, Hk, T, K = x.shape
    out = _suffix_out(x, gate, out)
    has_last = last is not None
    if has_last and tuple(last.shape) != (B, Hk, K):
        raise ValueError(f"last must be {(B, Hk, K)}, got {tuple(last.shape)}")
    x = x.contiguous()
    if T and K and B * Hk:
        BK = _pow2(K, hi=32)  # more programs (each walks the whole sequence) rather than wider tiles
        lst = last.float().contiguous() if has_last else x
        gt = gate.contiguous() if gate is not None else x
        _rev_cumsum[(triton.cdiv(K, BK), B * Hk)](x, lst, gt, out, T, triton.cdiv(T, CHUNK), K=K, C=CHUNK, BK=BK,
                                                  HAS_LAST=has_last, HAS_GATE=gate is not None,
                                                  GMIN=LOG_GATE_MIN)
    return out


def _chunk_suffix_sum(x, carry, out=None, gate=None):
    """Σ_{u ≥ t, u in t's chunk of CHUNK} x[..., u, :] + carry[..., t's chunk, :] for x `[B, Hk, T, K]` and carry
    `[B, Hk, N, K]` fp32 (`_chunk_suffix`); zero where `gate` (x's shape) is below LOG_GATE_MIN. out: fp32
    contiguous, may be x."""
    B, Hk, T, K = x.shape
    N = triton.cdiv(T, CHUNK)
    if tuple(carry.shape) != (B, Hk, N, K):
        raise ValueError(f"carry must be {(B, Hk, N, K)}, got {tuple(carry.shape)}")
    out = _suffix_out(x, gate, out)
    x = x.contiguous()
    if T and K and B * Hk:
        BK = _pow2(K, hi=32)
        gt = gate.contiguous() if gate is not None else x
        _chunk_suffix[(N, triton.cdiv(K, BK), B * Hk)](x, carry.float().contiguous(), gt, out, T, N, K=K, C=CHUNK,
                                                       BK=BK, HAS_GATE=gate is not None, GMIN=LOG_GATE_MIN)
    return out


class _Setup:
    def __init__(self, q, k, v, g, chunk, backward=False, precision=None):
        if chunk != CHUNK:
            raise ValueError(f"the Triton GLA kernels use chunks of {CHUNK}, not {chunk}")
        reason = supported(q, k, v, g)
        if reason:
            raise ValueError(f"triton_gla: {reason}")
        self.q, self.k, self.v = q.contiguous(), k.contiguous(), v.contiguous()
        self.B, self.H, self.T, self.K = q.shape
        self.Hk, self.V = k.shape[1], v.shape[-1]
        self.G = self.H // self.Hk
        self.C = CHUNK
        self.N = triton.cdiv(self.T, self.C)
        self.Tp = self.N * self.C
        self.g = g.contiguous() if g is not None else None
        self.use_g = g is not None
        self.KG = g.shape[-1] if self.use_g else 1
        self.SBK = 1 if self.KG > 1 else 0
        self._b = None
        t = TUNING  # read at every call, so that a benchmark can switch configurations between calls
        t.validate()
        self.BK = _pow2(self.K, hi=t.block_k)
        self.BV = _pow2(self.V, hi=t.block_v)
        self.NK = triton.cdiv(self.K, self.BK)
        self.NV = triton.cdiv(self.V, self.BV)
        self.prec = _prec(q, k, v)
        half = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        precision = _precision(q, k, v, precision or t.precision)
        # lowp: LOWP of every forward kernel and of the backward's state kernels (h, dh, dq/dk); lowp_v: of the
        # backward's A and dv (whose rounding reaches dv only) and dA (exact: do and v are half values)
        self.lowp_v = precision != "full"
        self.lowp = precision == "low" if backward else self.lowp_v
        self.sdt = q.dtype if self.lowp else torch.float32  # dtype of the scratch buffers h, dh
        self.adt = q.dtype if self.lowp_v else torch.float32  # dtype of A
        self.fwd_hdt = q.dtype if half and t.half_states else self.sdt  # dtype of the forward's h
        self.launch = {name: x for name, x in (("num_warps", t.num_warps), ("num_stages", t.num_stages))
                       if x is not None}
        self.intra_kind = t.intra
        self.fuse_intra = bool(t.fuse_intra)
        self.raw_gates = bool(t.raw_gates) and self.use_g
        self.scan_forward = t.scan_forward
        self.dg_carry = t.dg_form == "carry" and self.use_g
        self.dqk_split = t.dqk == "split"
        self.dev = q.device

    @property
    def b_arg(self):
        """The chunk-local cumulative gates (`_cum_gates`, computed on first use), or a dummy pointer when there
        are no gates."""
        if not self.use_g:
            return self.q
        if self._b is None:
            self._b = _cum_gates(self.g, self.B, self.Hk, self.T, self.N, self.C)[0]
        return self._b

    def consts(self):
        return dict(K=self.K, V=self.V, KG=self.KG, SBK=self.SBK, C=self.C, BK=self.BK, BV=self.BV,
                    USE_G=self.use_g, PREC=self.prec, LOWP=self.lowp, **self.launch)

    def states(self, initial_state, raw=False, dtype=None):
        """h [B, Hk, N, K, V] (state each chunk starts from; in `sdt` unless `dtype` is given) and
        the final state (fp32). raw: from the gates themselves (no b buffer)."""
        s = self
        h = _empty(s.B, s.Hk, s.N, s.K, s.V, device=s.dev, dtype=dtype or s.sdt)
        ht = _empty(s.B, s.Hk, s.K, s.V, device=s.dev)
        h0 = initial_state.contiguous() if initial_state is not None else ht
        gates = (s.g if s.use_g else s.q) if raw else s.b_arg
        _h_fwd[(s.NK, s.NV, s.B * s.Hk)](s.k, s.v, gates, h0, h, ht, s.T, s.Tp, s.N,
                                         HAS_H0=initial_state is not None, RAW=raw, GMIN=LOG_GATE_MIN,
                                         **s.consts())
        return h, ht

    def intra(self, scale, raw=False):
        """A [B, H, N·C, C]; raw (intra "matmul" only): from the gates themselves (no b buffer)."""
        s = self
        A = _empty(s.B, s.H, s.Tp, s.C, device=s.dev, dtype=s.adt)
        kernel = {"matmul": _attn_intra_mm, "rows": _attn_intra, "split": _attn_intra_split}[s.intra_kind]
        grid = (s.N if s.intra_kind == "rows" else s.N * (s.C // SUB), s.B * s.H)
        extra = dict(RAW=True, GMIN=LOG_GATE_MIN) if raw else {}
        kernel[grid](s.q, s.k, s.g if raw else s.b_arg, A, scale, s.T, s.Tp, s.H, s.Hk, s.G,
                     K=s.K, KG=s.KG, SBK=s.SBK, C=s.C, BC=SUB, BK=s.BK,
                     USE_G=s.use_g, PREC=s.prec, LOWP=s.lowp_v, **extra, **s.launch)
        return A


def _check_state(state, s):
    want = (s.B, s.Hk, s.K, s.V)
    if tuple(state.shape) != want:
        raise ValueError(f"state shape {tuple(state.shape)}, expected {want}")


def _scan_forward(s: _Setup, scale: float, initial_state):
    """(o, final state) by `_fwd_scan` (Tuning.scan_forward)."""
    o = _empty(s.B, s.H, s.T, s.V, device=s.dev, dtype=s.q.dtype)
    ht = _empty(s.B, s.Hk, s.K, s.V, device=s.dev)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    launch = {"num_warps": 8, **s.launch}  # S [K, BV] fp32 and the chunk's k and gates stay in registers
    _fwd_scan[(s.NV, s.B * s.Hk)](s.q, s.k, s.v, s.g if s.use_g else s.q, h0, o, ht, scale, s.T, s.H, s.Hk,
                                  s.G, s.N, K=s.K, V=s.V, KG=s.KG, SBK=s.SBK, C=s.C, BC=SUB,
                                  BK=_pow2(s.K, hi=MAX_HEAD_DIM), BV=s.BV, USE_G=s.use_g,
                                  HAS_H0=initial_state is not None, PREC=s.prec, LOWP=s.lowp, GMIN=LOG_GATE_MIN,
                                  **launch)
    return o, ht


def chunk_gla_fwd(q, k, v, g, scale: float, initial_state=None, chunk: int = 64, keep_a: bool = False,
                  keep_b: bool = False, precision: str | None = None):
    """(o [B,H,T,V] q.dtype, final_state [B,Hk,K,V] fp32); keep_a or keep_b adds (A, b), the intra-chunk
    matrix and the cumulative gates for `chunk_gla_bwd` to reuse (each None where `kept_layout` says so).
    precision: instead of TUNING.precision (the custom op passes the one its wrapper read)."""
    keep = keep_a or keep_b
    s = _Setup(q, k, v, g, chunk, precision=precision)
    if initial_state is not None:
        _check_state(initial_state, s)
        initial_state = initial_state.float()
    if s.T == 0:
        fin = initial_state.clone() if initial_state is not None else q.new_zeros(s.B, s.Hk, s.K, s.V,
                                                                                   dtype=torch.float32)
        o = q.new_empty(s.B, s.H, 0, s.V)
        if not keep:
            return o, fin
        a_layout, b_shape = kept_layout(q, k, v, g, keep_a, keep_b, precision)
        return (o, fin, None if a_layout is None else q.new_empty(a_layout[0], dtype=a_layout[1]),
                None if b_shape is None else q.new_empty(b_shape, dtype=torch.float32))
    scale = float(scale)
    # fuse_intra: neither A nor the cumulative gates b are stored; the two kernels cumulate g themselves.
    # raw_gates: A is, b is not (unless it is to be kept); the three kernels cumulate g themselves
    raw = s.raw_gates and not keep_b
    if s.scan_forward:
        o, ht = _scan_forward(s, scale, initial_state)
        return (o, ht, None, None) if keep else (o, ht)
    h, ht = s.states(initial_state, raw=s.fuse_intra or raw, dtype=s.fwd_hdt)
    o = _empty(s.B, s.H, s.T, s.V, device=s.dev, dtype=q.dtype)
    if s.fuse_intra:
        gates = s.g if s.use_g else s.q
        _o_fwd_mm[(s.N * (s.C // SUB), s.NV, s.B * s.H)](s.q, s.k, s.v, gates, h, o, scale, s.T, s.Tp, s.H,
                                                          s.Hk, s.G, s.N, BC=SUB, RAW=True, GMIN=LOG_GATE_MIN,
                                                          **s.consts())
        A = None
    else:
        A = s.intra(scale, raw=raw)
        _o_fwd[(s.N, s.NV, s.B * s.H)](s.q, s.v, s.g if raw else s.b_arg, h, A, o, scale, s.T, s.Tp, s.H, s.Hk,
                                       s.G, s.N, RAW=raw, GMIN=LOG_GATE_MIN, **s.consts())
    if not keep:
        return o, ht
    a_layout, b_shape = kept_layout(q, k, v, g, keep_a, keep_b, precision)
    return o, ht, (A if a_layout is not None else None), (s._b if b_shape is not None else None)


def chunk_gla_bwd(q, k, v, g, scale: float, initial_state, do, dfinal_state, chunk: int = 64, A=None, b=None):
    """Gradients (dq, dk, dv, dg, dinitial_state).

    dq/dk/dv in their inputs' dtypes and shapes; dg fp32 shaped like g (None if g is None; summed over the
    channel axis when g is [..., 1]); dinitial_state fp32 [B,Hk,K,V] (None if initial_state is None).
    do: gradient of o; dfinal_state: gradient of the final state or None (= zeros).
    A, b: the forward's (`chunk_gla_fwd(..., keep_a, keep_b)`), used when they have the shape, dtype and device
    this call would form them in (and are contiguous), else formed again. Under the same TUNING that makes
    the gradients bit-identical to forming them here; after a change of intra scheme or block size between
    the two calls, A is the same matrix up to rounding.
    """
    s = _Setup(q, k, v, g, chunk, backward=True)
    if s.use_g and _matches(b, (s.B, s.Hk, s.Tp, s.KG), torch.float32, s.dev):
        s._b = b
    has_h0 = initial_state is not None
    if has_h0:
        _check_state(initial_state, s)
        initial_state = initial_state.float()
    if dfinal_state is not None:
        _check_state(dfinal_state, s)
        dfinal_state = dfinal_state.float().contiguous()
    if s.T == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dg = None if g is None else torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        dh0 = None
        if has_h0:
            dh0 = dfinal_state.clone() if dfinal_state is not None else torch.zeros_like(initial_state)
        return dq, dk, dv, dg, dh0
    scale = float(scale)
    do = do.contiguous()
    prec = "ieee" if s.prec == "ieee" and do.dtype == torch.float32 else "tf32"
    c = dict(s.consts(), PREC=prec)
    h, ht = s.states(initial_state)
    if s.fuse_intra:
        A = None  # _dv_bwd forms A itself
    elif not _matches(A, (s.B, s.H, s.Tp, s.C), s.adt, s.dev):
        A = s.intra(scale)
    B, H, Hk, G, N, T, Tp, K, V = s.B, s.H, s.Hk, s.G, s.N, s.T, s.Tp, s.K, s.V
    dev = s.dev

    dh = _empty(B, Hk, N, K, V, device=dev, dtype=s.sdt)
    dh0 = _empty(B, Hk, K, V, device=dev) if has_h0 else dh
    dht = dfinal_state if dfinal_state is not None else dh
    _dh_bwd[(s.NK, s.NV, B * Hk)](s.q, do, s.b_arg, dht, dh, dh0, scale, T, Tp, H, Hk, G, N,
                                  HAS_DHT=dfinal_state is not None, STORE_DH0=has_h0, **c)

    dA = _empty(B, H, Tp, s.C, device=dev)
    # do · v in the input dtype is exact when do is in it too (products of two half values fit fp32)
    _dA_bwd[(N, B * H)](do, s.v, dA, scale, T, Tp, H, Hk, G, V=V, C=s.C, BV=s.BV, PREC=prec,
                        LOWP=s.lowp_v and do.dtype == s.v.dtype,
                        **s.launch)

    dq = _empty(B, H, T, K, device=dev, dtype=q.dtype)
    dk = _empty(B, Hk, T, K, device=dev, dtype=k.dtype)
    dB = _empty(B, Hk, T, K, device=dev)
    dC = _empty(B, Hk, N, K, device=dev) if s.dg_carry else dB  # per-chunk carry of dg ("carry")
    diag_mm = s.intra_kind == "matmul"
    if s.dqk_split:  # the intra-chunk terms in fp32 scratch, then the inter-chunk ones in 64-row tiles
        dqi = _empty(B, H, T, K, device=dev)
        dki = _empty(B, Hk, T, K, device=dev)
        _dqk_bwd[(N, s.NK, B * Hk)](s.q, s.k, s.v, s.b_arg, h, do, dh, dA, dqi, dki, dB, dC, scale,
                                    T, Tp, H, Hk, G, N, BC=SUB, DIAG_MM=diag_mm, CARRY=False, INTER=False, **c)
        # 8 warps unless TUNING says otherwise: five [64, BK] fp32 tiles spill at 4 (kernel_resources.py)
        _dqk_inter[(N, s.NK, B * Hk)](s.q, s.k, s.v, s.b_arg, h, do, dh, dqi, dki, dq, dk, dB, dC, scale,
                                      T, Tp, H, Hk, G, N, CARRY=s.dg_carry, **{"num_warps": 8, **c})
    else:
        _dqk_bwd[(N, s.NK, B * Hk)](s.q, s.k, s.v, s.b_arg, h, do, dh, dA, dq, dk, dB, dC, scale,
                                    T, Tp, H, Hk, G, N, BC=SUB, DIAG_MM=diag_mm, CARRY=s.dg_carry, **c)

    dv = _empty(B, Hk, T, V, device=dev, dtype=v.dtype)
    _dv_bwd[(N, s.NV, B * Hk)](s.q, s.k, s.b_arg, dh, A if A is not None else dh, do, dv, scale, T, Tp, H, Hk,
                               G, N, BC=SUB, FUSED=s.fuse_intra, APREC=s.prec, **dict(c, LOWP=s.lowp_v))

    dg = None
    if s.dg_carry:  # dC's last chunk is Σ_v dS_T ⊙ S_T: dh there is dfinal_state (or 0)
        if g.shape[-1] == 1 and K != 1:  # one gate per step: summed over K first, as below
            dB, dC = dB.sum(-1, keepdim=True), dC.sum(-1, keepdim=True)
        dg = _chunk_suffix_sum(dB, dC, out=dB, gate=s.g)
    elif g is not None:
        # the final state is exp(B_T) ⊙ (…): ∂L/∂B_{T-1} += Σ_v dS_T ⊙ S_T, which the reverse cumsum adds
        last = (dfinal_state * ht).sum(-1) if dfinal_state is not None else None
        if g.shape[-1] == 1 and K != 1:  # one gate per step: Σ_k of the reverse cumsum = reverse cumsum of Σ_k
            dB = dB.sum(-1, keepdim=True)
            last = None if last is None else last.sum(-1, keepdim=True)
        # the kernels clamp g at LOG_GATE_MIN (`_chunk_cumsum`): no gradient reaches gates below it
        dg = _reverse_cumsum(dB, last, out=dB, gate=s.g)
    return dq, dk, dv, dg, (dh0 if has_h0 else None)


def fused_recurrent_gla_step(q, k, v, g, state, scale: float, inplace: bool = False):
    """One decode position: q [B,H,K], k [B,Hk,K], v [B,Hk,V], g [B,Hk,K] or [B,Hk,1] or None,
    state [B,Hk,K,V] fp32 -> (o [B,H,V] in q.dtype, new state fp32). inplace=True updates `state`."""
    reason = supported(q, k, v, g)
    if reason:
        raise ValueError(f"triton_gla: {reason}")
    B, H, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    if tuple(state.shape) != (B, Hk, K, V) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 {(B, Hk, K, V)}, got {state.dtype} {tuple(state.shape)}")
    if inplace and not state.is_contiguous():
        raise ValueError("inplace needs a contiguous state")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S = state.contiguous()
    S_out = S if inplace else _empty(B, Hk, K, V, device=q.device)
    o = _empty(B, H, V, device=q.device, dtype=q.dtype)
    if g is not None:
        g = g.contiguous()
        KG = g.shape[-1]
    else:
        KG = 1
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), max(16, 4096 // BK)))
    grid = (triton.cdiv(V, BV), B * Hk)
    _step_kernel[grid](q, k, v, g if g is not None else q, S, S_out, o, float(scale), H, Hk, H // Hk,
                       K=K, V=V, KG=KG, SBK=1 if KG > 1 else 0, BK=BK, BV=BV, USE_G=g is not None,
                       GMIN=LOG_GATE_MIN)
    return o, S_out
