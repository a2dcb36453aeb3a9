"""Zeroth-order optimizers: MeZO (ZO-SGD) and ZO-AdaMU, as torch.optim.Optimizer subclasses.

Noise definition (what a seed means; everything else may change without changing the directions):
  * step seed  = step_seed(seed, t), t = 0-based count of completed steps.  A pure function, so no RNG
    state is saved and a resumed run replays the same directions.
  * tensor `index` = position of the parameter in the optimizer (groups in order, then params).
  * rng="counter" (the default for CPU tensors): a counter-based stream, a pure function of
    (step seed, index, stream, element position j of the flattened tensor).  key = mix(step seed, index, stream);
    h(i) = splitmix64 output number i+1 of seed `key` = fmix64(key + (i+1)·0x9E3779B97F4A7C15).
      gaussian:   elements 2p and 2p+1 are the Box–Muller pair of h(p): u1 = (h>>40 + 1)/2^24 ∈ (0, 1],
                  u2 = (h>>16 & 0xFFFFFF)/2^24, r = sqrt(-2 ln u1), z(2p) = r·cos 2πu2, z(2p+1) = r·sin 2πu2,
                  with ln / cos / sin evaluated by fixed float32 polynomials after exact range reduction
                  (_counter_noise_torch spells out every operation).  Every step is one IEEE-754 float32
                  operation (no fused multiply-add, no library transcendental), so the C kernel below and the
                  pure-torch reference give bit-identical noise on any machine.  |z| <= 5.77 (24-bit u1).
      rademacher: z(j) = -1 if bit (j mod 64) of h(j div 64) is set, else +1: one hash gives 64 signs.  (Until
                  2026-11-26 it was the top bit of h(j), one hash per element: Rademacher runs from before then
                  draw other directions from the same seed.)
    Because the noise is a function of the element position, any chunking gives the same noise.
  * rng="counter" is also the default for CUDA tensors where Triton is installed: zo_triton generates the same
    stream inside fused sweep kernels, so a GPU run draws exactly the CPU run's directions.
  * rng="torch" (the default for other devices, and for CUDA without Triton): the flat
    tensor is cut into blocks of `noise_block` elements; block b of stream s is `normal_()` (or ±1) of a float32
    vector of that block's size, drawn by a torch.Generator on the parameter's device seeded with
    mix(step seed, index, b, s).  Processing chunks (`chunk_numel`) are whole numbers of blocks.
  MeZO uses stream 0; ZO-AdaMU uses stream 0 for n1 and stream 1 for n2.

Step protocol (sweep = one pass over the trainable tensors regenerating the noise):
  probe(closure): first probe of a step +εu, -2εu (2 sweeps); later probes +2εu, -2εu (2 sweeps);
                  parameters rest at θ-εu between probes.
  step():         restore and update fused in one sweep, θ <- (θ-εu + εu)·(1-lr·λ) - lr·g·w.
  carry_perturbation=True (opt-in) also applies the next step's +εu' in the update sweep, so a step costs 2
  sweeps instead of 3 where one fused kernel does both (CUDA + Triton); elsewhere the update and the perturbation
  stay two sweeps with the same result.  The parameters then rest at θ+εu' between steps: whoever reads them
  (evaluation, checkpoints, the end of training) calls settle() first, which restores θ (one sweep; `carried`
  says whether one is due).  The results equal the uncarried run's bit for bit up to the first settle(); each
  settle() without a stash adds the ≤1-ulp perturb/restore round-trip error described below (with a stash, none).
  Without a stash the perturb/restore round trip is not bit-exact, and no memory-free scheme can be:
  x+εu rounds away the low bits of every |x| << ε|u|, so distinct x collide.  The error is up to
  about one ulp of θ per step, for a large share of the elements: ~1e-7 relative in fp32 (negligible
  next to updates), ~4e-3 relative in bf16 (larger than typical ZO updates, and it random-walks).  Hence
  exact_restore=None (default) stashes a copy of θ at the first probe only for tensors below fp32 and
  restores those bit-exactly; True stashes every tensor (bit-exact fp32 too), False none (MeZO memory).
  keep_direction=True (opt-in, small models) keeps the step's direction in memory (one parameter-sized float32
  buffer for MeZO, two compute-dtype buffers u, w for ZO-AdaMU): one noise sweep per step instead of three.

Arithmetic of a sweep, in the compute dtype T (fp64 for fp64 tensors, else fp32), one rounding per operation:
  perturb  x <- x + (k·ε)·u
  update   y <- x + (-o·ε)·u (or y <- stash), y <- y·(1-lr·λ), x <- y + (-lr·g)·w, o = offset of the probes
  ZO-AdaMU zd = n1·√α, zdd = n2·√(1-α) + m, u = zd·β1 + zdd·(1-β1), w = u / √(zd²·β2 + zdd²·(1-β2) + σ),
           m <- sign(g)·u
Speed: on CPU, float32/float64 tensors with rng="counter" go through small C kernels (compiled once with the
system C compiler, cached, and checked against the torch reference at load) that generate the noise and apply a
whole sweep in one pass over memory with no temporaries, on torch.get_num_threads() worker threads.  Without a
compiler (or with ZO_NO_CKERNEL=1) the same arithmetic runs as torch operations: identical results, slower.
On CUDA, float32/bfloat16/float16 tensors with the counter noise go through one fused Triton kernel per tensor and
sweep (zo_triton), also bit-identical to the torch operations.  Those kernels read every per-step value (noise keys,
schedule values, update coefficients) from device buffers at fixed addresses, so with cuda_graphs=True (default) each
kind of sweep is captured once as a CUDA graph and replayed: one launch per sweep instead of one per tensor, which is
what a step of a model with many small tensors spends most of its sweep time on.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["NOISE_BLOCK", "DIRECTIONS", "RNGS", "step_seed", "sample_direction", "anneal", "AdaMUSchedule",
           "param_groups_for_model", "ZOOptimizer", "MeZO", "ZOAdaMU", "kernels_available", "triton_available"]

logger = logging.getLogger(__name__)

NOISE_BLOCK = 1 << 20
DIRECTIONS = ("gaussian", "rademacher")
RNGS = ("auto", "counter", "torch")
_M64 = (1 << 64) - 1
_META = ("zo_kind", "zo_step", "zo_skipped")


def step_seed(base_seed: int, step: int) -> int:
    """64-bit seed of step `step`: a pure function of (base_seed, step)."""
    return int(np.random.SeedSequence([int(base_seed), int(step)]).generate_state(1, np.uint64)[0])


def _mix(*words: int) -> int:
    # splitmix64 chained over the words: cheap enough to run once per noise block in Python.
    h = 0
    for w in words:
        h = ((h ^ (w & _M64)) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def _resolve_rng(rng: str, device) -> str:
    if rng not in RNGS:
        raise ValueError(f"Invalid rng: {rng!r} (choose from {RNGS})")
    if rng == "auto":
        kind = torch.device(device).type
        return "counter" if kind == "cpu" or (kind == "cuda" and _triton() is not None) else "torch"
    return rng


@functools.cache
def _triton():
    """The fused Triton sweeps (zo_triton), or None where Triton is not installed."""
    import zo_triton
    return zo_triton if zo_triton.available() else None


# ------------------------------------------------------------------------ counter-based noise (definition)
def _f32(x: float) -> float:
    return float(np.float32(x))


_GOLDEN, _FM1, _FM2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_LN2 = _f32(math.log(2.0))
# ln f = s·(2 + s²·(L3 + s²·(L5 + s²·L7))), s = (f-1)/(f+1), f ∈ (√½, √2]   (fit, rel. error 1.5e-9)
_LN = tuple(map(_f32, (2.0, 0.6666678190231323, 0.3997836709022522, 0.2983228266239166)))
# sin(πt/2) = t·(S1 + t²·(S3 + t²·(S5 + t²·S7))), cos(πt/2) = 1 + t²·(C2 + t²·(C4 + t²·(C6 + t²·C8))), t ∈ [0, ½]
_SIN = tuple(map(_f32, (1.5707963705062866, -0.6459635496139526, 0.07968097180128098, -0.004603920038789511)))
_COS = tuple(map(_f32, (1.0, -1.2337005138397217, 0.25366926193237305, -0.020860355347394943,
                        0.0009041568846441805)))


def _s64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift of an int64 tensor


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (IEEE-754).  torch's CPU sqrt goes through vectorised math libraries that are
    off by one ulp for ~20 % of float32 inputs; numpy's is the hardware instruction."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.numpy()))
    return x.sqrt()


def _splitmix_torch(key: int, i: torch.Tensor) -> torch.Tensor:
    """h(i) for an int64 tensor of positions (int64 arithmetic wraps like uint64)."""
    z = (i + 1) * _s64(_GOLDEN) + _s64(key)
    z = (z ^ _lsr(z, 30)) * _s64(_FM1)
    z = (z ^ _lsr(z, 27)) * _s64(_FM2)
    return z ^ _lsr(z, 31)


def _horner(x: torch.Tensor, coefficients) -> torch.Tensor:
    """c0 + x(c1 + x(c2 + ...)), one rounding per operation in the same order as the C kernel."""
    p = x * coefficients[-1]
    for c in coefficients[-2:0:-1]:
        p = (p + c) * x
    return p + coefficients[0]


def _box_muller_torch(h: torch.Tensor):
    """(z(2p), z(2p+1)) of the hashes h(p): the reference of the C kernel's zo_gauss2, operation by operation."""
    i32, f32 = torch.int32, torch.float32
    m = (_lsr(h, 40) + 1).to(i32)                      # 1 .. 2^24
    k = (_lsr(h, 16) & 0xFFFFFF).to(i32)               # 0 .. 2^24-1
    b = m.to(f32).view(i32)                            # exact
    mant = (b & 0x7FFFFF) | 0x3F800000                 # f ∈ [1, 2)
    big = (mant > 0x3FB504F3).to(i32)                  # f > √2: halve it
    e = (b >> 23) - 127 + big - 24
    f = (mant - (big << 23)).view(f32)
    s = (f - 1.0) / (f + 1.0)
    ln_f = s * _horner(s * s, _LN)
    ln_u1 = e.to(f32) * _LN2
    ln_u1 = ln_u1 + ln_f
    r = _sqrt(ln_u1 * -2.0)
    q, j = k >> 22, k & 0x3FFFFF                       # quadrant, position in it
    swap = j > 0x200000
    t = torch.where(swap, 0x400000 - j, j).to(f32) * 2.0 ** -22   # exact, ∈ [0, ½]
    t2 = t * t
    S = _horner(t2, _SIN) * t
    C = _horner(t2, _COS)

    def quadrant(q):  # cos(qπ/2 + πt'/2) from the sine / cosine of the reduced angle
        v = torch.where(((swap.to(i32) ^ q) & 1).bool(), S, C)
        return r * torch.where((((q + 1) >> 1) & 1).bool(), -v, v)
    return quadrant(q), quadrant((q + 3) & 3)


def _counter_noise_torch(key: int, start: int, n: int, direction: str, device) -> torch.Tensor:
    """Elements [start, start+n) of the counter stream `key`, float32, in torch operations (any device)."""
    if n <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    if direction == "rademacher":  # element j: bit j mod 64 of h(j div 64)
        w0, w1 = start >> 6, (start + n - 1) >> 6
        h = _splitmix_torch(key, torch.arange(w0, w1 + 1, dtype=torch.int64, device=device))
        bits = (h[:, None] >> torch.arange(64, device=device)) & 1   # arithmetic shift: bit b is still bit b
        one = torch.ones((), dtype=torch.float32, device=device)
        off = start - 64 * w0
        return torch.where(bits.view(-1)[off:off + n].bool(), -one, one)
    p0, p1 = start >> 1, (start + n - 1) >> 1
    z0, z1 = _box_muller_torch(_splitmix_torch(key, torch.arange(p0, p1 + 1, dtype=torch.int64, device=device)))
    off = start - 2 * p0
    return torch.stack([z0, z1], -1).view(-1)[off:off + n].contiguous()


# ----------------------------------------------------------------------------------- C kernels (speed)
_CTYPES = {"f32": ("float", ctypes.c_float), "f64": ("double", ctypes.c_double),
           "bf16": ("uint16_t", None), "f16": ("uint16_t", None)}
_TORCH_TN = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_LOAD = {"f32": "({v})", "f64": "({v})", "bf16": "zo_u2f((uint32_t)({v}) << 16)", "f16": "zo_h2f({v})"}
_STORE = {"f32": "({v})", "f64": "({v})", "bf16": "zo_f2bf({v})", "f16": "zo_f2h({v})"}
_SQRT = {"f32": "sqrtf", "f64": "sqrt"}
_GENS = {"g": "zo_gauss2", "r": "zo_rad2"}
_BUF_PAIRS = (("f32", "f32"), ("f64", "f32"), ("f64", "f64"))      # (x dtype, buffer dtype)
_AMU_PAIRS = (("f32", "f32"), ("f32", "bf16"), ("f32", "f16"), ("f64", "f64"))  # (x dtype, momentum dtype)

_C_PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
static inline __attribute__((always_inline)) uint64_t zo_hash(uint64_t key, uint64_t i) {
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static inline __attribute__((always_inline)) float zo_i2f(int32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline __attribute__((always_inline)) float zo_u2f(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline __attribute__((always_inline)) int32_t zo_f2i(float f) { int32_t b; memcpy(&b, &f, 4); return b; }
static inline __attribute__((always_inline)) uint16_t zo_f2bf(float f) {   /* round to nearest even, as c10::BFloat16 */
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)r;
}
static inline __attribute__((always_inline)) uint32_t zo_f2u(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }
static inline __attribute__((always_inline)) float zo_h2f(uint16_t h) {   /* IEEE half -> float, exact */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu;
    uint32_t r = em >= 0x7C00u ? ((em << 13) | 0x7F800000u) : (em << 13) + 0x38000000u;
    r = em < 0x0400u ? zo_f2u((float)(int32_t)em * 0x1p-24f) : r;          /* subnormal: mant * 2^-24 */
    return zo_u2f(r | sign);
}
static inline __attribute__((always_inline)) uint16_t zo_f2h(float f) {   /* float -> IEEE half, nearest even */
    uint32_t x = zo_f2u(f), sign = x & 0x80000000u;
    x ^= sign;
    uint32_t special = x > 0x7F800000u ? 0x7E00u : 0x7C00u;                   /* NaN / overflow to inf */
    uint32_t sub = zo_f2u(zo_u2f(x) + 0.5f) - 0x3F000000u;                  /* |f| < 2^-14: align to 2^-24 */
    uint32_t nrm = (x + 0xC8000FFFu + ((x >> 13) & 1u)) >> 13;              /* rebias, round half to even */
    uint32_t o = x >= 0x47800000u ? special : (x < 0x38800000u ? sub : nrm);
    return (uint16_t)(o | (sign >> 16));
}
static inline __attribute__((always_inline)) float zo_quadrant(int32_t q, int32_t swap, float r, float S, float C) {
    int32_t mask = -((swap ^ q) & 1);
    int32_t vb = (zo_f2i(S) & mask) | (zo_f2i(C) & ~mask);
    vb ^= (int32_t)((uint32_t)(((q + 1) >> 1) & 1) << 31);
    return r * zo_i2f(vb);
}
static inline __attribute__((always_inline)) void zo_gauss2(uint64_t key, uint64_t p, float* z) {
    uint64_t h = zo_hash(key, p);
    int32_t m = (int32_t)(h >> 40) + 1;
    int32_t k = (int32_t)((h >> 16) & 0xFFFFFF);
    int32_t b = zo_f2i((float)m);
    int32_t mant = (b & 0x7FFFFF) | 0x3F800000;
    int32_t big = ((0x3FB504F3 - mant) >> 31) & 1;
    int32_t e = ((b >> 23) - 127) + big - 24;
    float f = zo_i2f(mant - (big << 23));
    float s = (f - 1.0f) / (f + 1.0f);
    float s2 = s * s;
    float p_ = s2 * LN3; p_ = p_ + LN2c; p_ = p_ * s2; p_ = p_ + LN1; p_ = p_ * s2; p_ = p_ + LN0;
    float lnf = s * p_;
    float L = (float)e * LNTWO; L = L + lnf;
    float r = sqrtf(L * -2.0f);
    int32_t q = k >> 22, j = k & 0x3FFFFF;
    int32_t swap = ((0x200000 - j) >> 31) & 1;
    float t = (float)(j + swap * (0x400000 - 2 * j)) * 0x1p-22f;
    float t2 = t * t;
    float S = t2 * SN3; S = S + SN2; S = S * t2; S = S + SN1; S = S * t2; S = S + SN0; S = S * t;
    float C = t2 * CS4; C = C + CS3; C = C * t2; C = C + CS2; C = C * t2; C = C + CS1; C = C * t2; C = C + CS0;
    z[0] = zo_quadrant(q, swap, r, S, C);
    z[1] = zo_quadrant((q + 3) & 3, swap, r, S, C);
}
static inline __attribute__((always_inline)) float zo_sign(uint64_t h, uint32_t b) {   /* bit b set: -1 */
    return zo_u2f(0x3F800000u | ((uint32_t)((h >> b) & 1u) << 31));
}
static inline __attribute__((always_inline)) void zo_rad2(uint64_t key, uint64_t p, float* z) {
    uint64_t h = zo_hash(key, p >> 5);           /* elements 2p, 2p+1: bits 2(p mod 32), +1 of h(2p div 64) */
    uint32_t b = (uint32_t)(p & 31) << 1;
    z[0] = zo_sign(h, b);
    z[1] = zo_sign(h, b + 1);
}
"""


def _c_float(x: float) -> str:
    return f"({float(x).hex()}f)"


def _pair_loop(gen: str, streams, elem: str) -> str:
    """C loop over elements [start, start+n) of the counter streams, pair by pair (vectorisable body);
    `elem` uses @J (element index in the chunk) and @S (0/1: which half of the pair)."""
    def g(p):
        return " ".join(f"float {arr}[2]; {gen}({key}, {p}, {arr});" for key, arr in streams)

    def e(j, s):
        return "{ " + elem.replace("@J", f"({j})").replace("@S", s) + " }"
    return (f"int64_t i0 = 0;\n"
            f"    if ((start & 1) && n > 0) {{ {g('(uint64_t)start >> 1')} {e('0', '1')} i0 = 1; }}\n"
            f"    int64_t np_ = (n - i0) >> 1; uint64_t p0 = (uint64_t)(start + i0) >> 1;\n"
            f"    for (int64_t k_ = 0; k_ < np_; k_++) {{ {g('p0 + (uint64_t)k_')}\n"
            f"        {e('i0 + 2 * k_', '0')} {e('i0 + 2 * k_ + 1', '1')} }}\n"
            f"    if ((n - i0) & 1) {{ {g('(uint64_t)(start + n - 1) >> 1')} {e('n - 1', '0')} }}\n")


def _c_source():
    """(C source, {function name: ctypes argtypes})."""
    consts = dict(LN0=_LN[0], LN1=_LN[1], LN2c=_LN[2], LN3=_LN[3], LNTWO=_LN2, SN0=_SIN[0], SN1=_SIN[1],
                  SN2=_SIN[2], SN3=_SIN[3], CS0=_COS[0], CS1=_COS[1], CS2=_COS[2], CS3=_COS[3], CS4=_COS[4])
    src = ["".join(f"#define {k} {_c_float(v)}\n" for k, v in consts.items()), _C_PRELUDE]
    sigs = {}
    P, I64, U64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int

    def fn(name, args, body, argtypes):
        src.append(f"void {name}({args}) {{\n    {body}}}\n")
        sigs[name] = argtypes

    for gn, gen in _GENS.items():
        one = [("key", "za")]
        two = [("key1", "za"), ("key2", "zb")]
        fn(f"zo_fill_{gn}", "float* restrict out, int64_t n, uint64_t key, int64_t start",
           _pair_loop(gen, one, "out[@J] = za[@S];"), [P, I64, U64, I64])
        for tn in ("f32", "f64"):
            T, CT = _CTYPES[tn]
            fn(f"zo_axpy_{tn}_{gn}", f"{T}* restrict x, int64_t n, uint64_t key, int64_t start, {T} a",
               _pair_loop(gen, one, f"{T} t = a * ({T})za[@S]; x[@J] = x[@J] + t;"), [P, I64, U64, I64, CT])
            fn(f"zo_upd_{tn}_{gn}", f"{T}* restrict x, int64_t n, uint64_t key, int64_t start, {T} c, {T} d, {T} g",
               _pair_loop(gen, one, f"{T} z = ({T})za[@S]; {T} t = c * z; {T} y = x[@J] + t; y = y * d; "
                                    f"t = g * z; x[@J] = y + t;"), [P, I64, U64, I64, CT, CT, CT])
            fn(f"zo_rupd_{tn}_{gn}",
               f"{T}* restrict x, const {T}* restrict src, int64_t n, uint64_t key, int64_t start, {T} d, {T} g",
               _pair_loop(gen, one, f"{T} z = ({T})za[@S]; {T} y = src[@J] * d; {T} t = g * z; x[@J] = y + t;"),
               [P, P, I64, U64, I64, CT, CT])
        for tn, mn in _AMU_PAIRS:
            T, CT = _CTYPES[tn]
            M = _CTYPES[mn][0]
            sq, ld, st = _SQRT[tn], _LOAD[mn], _STORE[mn]
            dirs = (f"{T} zd = ({T})za[@S] * sa; {T} zdd = ({T})zb[@S] * sb; zdd = zdd + ({T}){ld.format(v='m[@J]')}; "
                    f"{T} u = zd * b1; {T} t = zdd * ob1; u = u + t; ")
            wexp = (f"{T} v = zd * zd; v = v * b2; t = zdd * zdd; t = t * ob2; v = v + t; v = v + sig; "
                    f"v = {sq}(v); {T} w = u / v; ")
            mom = f"m[@J] = {st.format(v='u * sgn')};"
            base = f"const {M}* restrict m, int64_t n, uint64_t key1, uint64_t key2, int64_t start, " \
                   f"{T} sa, {T} sb, {T} b1, {T} ob1"
            btypes = [P, I64, U64, U64, I64, CT, CT, CT, CT]
            suf = f"{tn}_{mn}_{gn}"
            fn(f"zo_amu_probe_{suf}", f"{T}* restrict x, {base}, {T} a",
               _pair_loop(gen, two, dirs + "t = a * u; x[@J] = x[@J] + t;"), [P] + btypes + [CT])
            fn(f"zo_amu_dirs_{suf}", f"{T}* restrict uo, {T}* restrict wo, {base}, {T} b2, {T} ob2, {T} sig",
               _pair_loop(gen, two, dirs + wexp + "uo[@J] = u; wo[@J] = w;"), [P, P] + btypes + [CT] * 3)
            mbase = base.replace(f"const {M}* restrict m", f"{M}* restrict m")
            upd_args = f"{T} b2, {T} ob2, {T} sig, {T} d, {T} g, {T} sgn, int wm"
            for name, head, xexpr, extra in (
                    ("upd", f"{T}* restrict x", "t = c * u; {T} y = x[@J] + t;", f", {T} c"),
                    ("rupd", f"{T}* restrict x, const {T}* restrict src", "{T} y = src[@J];", "")):
                upd = dirs + wexp + xexpr.format(T=T) + " y = y * d; t = g * w; x[@J] = y + t; "
                argt = [P] + ([P] if name == "rupd" else []) + btypes + [CT] * 6 + [INT] + ([CT] if extra else [])
                body = (f"if (wm) {{\n    {_pair_loop(gen, two, upd + mom)}    }} else {{\n"
                        f"    {_pair_loop(gen, two, upd)}    }}\n")
                fn(f"zo_amu_{name}_{suf}", f"{head}, {mbase}, {upd_args}{extra}", body, argt)
    for tn, bn in _BUF_PAIRS:
        T, CT = _CTYPES[tn]
        B = _CTYPES[bn][0]
        loop = "for (int64_t j = 0; j < n; j++) {{ {} }}\n"
        fn(f"zo_axpyb_{tn}_{bn}", f"{T}* restrict x, const {B}* restrict u, int64_t n, {T} a",
           loop.format(f"{T} t = a * ({T})u[j]; x[j] = x[j] + t;"), [P, P, I64, CT])
        fn(f"zo_updb_{tn}_{bn}",
           f"{T}* restrict x, const {B}* restrict u, const {B}* restrict w, int64_t n, {T} c, {T} d, {T} g",
           loop.format(f"{T} t = c * ({T})u[j]; {T} y = x[j] + t; y = y * d; t = g * ({T})w[j]; x[j] = y + t;"),
           [P, P, P, I64, CT, CT, CT])
        fn(f"zo_rupdb_{tn}_{bn}",
           f"{T}* restrict x, const {T}* restrict src, const {B}* restrict w, int64_t n, {T} d, {T} g",
           loop.format(f"{T} y = src[j] * d; {T} t = g * ({T})w[j]; x[j] = y + t;"), [P, P, P, I64, CT, CT])
    for tn, mn in _AMU_PAIRS:
        T, CT = _CTYPES[tn]
        M = _CTYPES[mn][0]
        fn(f"zo_mom_{tn}_{mn}", f"{M}* restrict m, const {T}* restrict u, int64_t n, {T} sgn",
           f"for (int64_t j = 0; j < n; j++) {{ m[j] = {_STORE[mn].format(v='u[j] * sgn')}; }}\n", [P, P, I64, CT])
    return "".join(src), sigs


_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=gnu11")


class _Kernels:
    """The compiled C kernels (ctypes), or None with the reason, built once per process and cached on disk."""
    lock = threading.Lock()
    lib = None
    error: str | None = None
    tried = False


def _kernel_cache_dir() -> Path:
    if os.environ.get("ZO_KERNEL_CACHE"):
        return Path(os.environ["ZO_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zo-adamu" / "kernels"


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _build_kernels():
    if os.environ.get("ZO_NO_CKERNEL", "") not in ("", "0"):
        raise RuntimeError("disabled by ZO_NO_CKERNEL")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source, sigs = _c_source()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    errors = []
    for arch in (("-march=native",), ()):
        flags = _CFLAGS + arch
        tag = hashlib.sha256("\0".join((source, cc, version, _cpu_tag()) + flags).encode()).hexdigest()[:20]
        for cache in (_kernel_cache_dir(), Path(tempfile.gettempdir()) / f"zo-adamu-kernels-{os.getuid()}"):
            path = cache / f"zo_kernels_{tag}.so"
            try:
                if not path.is_file():
                    cache.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(dir=cache) as tmp:
                        c_file, so_file = Path(tmp) / "zo_kernels.c", Path(tmp) / "zo_kernels.so"
                        c_file.write_text(source)
                        done = subprocess.run([cc, *flags, str(c_file), "-o", str(so_file), "-lm"],
                                              capture_output=True, text=True, timeout=600)
                        if done.returncode:
                            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-500:]}")
                            break
                        os.replace(so_file, path)  # atomic: concurrent builders agree on the content
                lib = ctypes.CDLL(str(path))
            except OSError as error:
                errors.append(f"{path}: {error}")
                continue
            for name, argtypes in sigs.items():
                f = getattr(lib, name, None)
                if f is not None:
                    f.argtypes, f.restype = argtypes, None
            _self_test(lib)
            logger.debug("zo: C kernels loaded from %s", path)
            return lib
    raise RuntimeError("; ".join(errors) or "build failed")


def _self_test(lib):
    """The kernels must reproduce the torch definition bit for bit (guards against a compiler that contracts
    multiply-adds or approximates anyway)."""
    for direction, gn in (("gaussian", "g"), ("rademacher", "r")):
        for start, n in ((0, 4099), (12345, 777), (1, 2)):
            key = _mix(start, n, 7)
            out = torch.empty(n, dtype=torch.float32)
            getattr(lib, f"zo_fill_{gn}")(out.data_ptr(), n, key, start)
            if not torch.equal(out, _counter_noise_torch(key, start, n, direction, "cpu")):
                raise RuntimeError("the compiled kernel disagrees with the torch definition of the noise")


def _kernels():
    if not _Kernels.tried:
        with _Kernels.lock:
            if not _Kernels.tried:
                try:
                    _Kernels.lib = _build_kernels()
                except Exception as error:  # any failure: the torch implementation computes the same numbers
                    _Kernels.error = f"{type(error).__name__}: {error}"
                    logger.warning("zo: C kernels unavailable (%s); using the pure-torch implementation of the "
                                   "same noise and arithmetic (identical results, slower CPU steps)", _Kernels.error)
                _Kernels.tried = True
    return _Kernels.lib


def triton_available() -> bool:
    """Whether CUDA tensors get the fused Triton sweeps (zo_triton) and, by default, the counter noise."""
    return _triton() is not None


def kernels_available() -> bool:
    """Whether the fast CPU kernels are in use (built on first call)."""
    return _kernels() is not None


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _run_jobs(jobs: list):
    """Each job is a list of ctypes calls (they release the GIL); jobs touch disjoint memory, so any order gives
    the same result.  Dynamic scheduling over torch.get_num_threads() threads tolerates a busy core."""
    workers = min(torch.get_num_threads(), len(jobs), 32)
    if workers <= 1:
        for job in jobs:
            for call in job:
                call()
        return
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS.setdefault(workers, ThreadPoolExecutor(workers, thread_name_prefix="zo-sweep"))
    for _ in pool.map(lambda job: [call() for call in job], jobs):
        pass


# ------------------------------------------------------------------------------------------ noise API
def _fill_noise(out, gen, seed, index, start, stream, direction, block):
    """rng="torch": elements [start, start+len(out)) of the noise of tensor `index` into float32 `out`."""
    b = start // block
    for off in range(0, out.numel(), block):
        gen.manual_seed(_mix(seed, index, b, stream))
        piece = out[off:off + block]
        if direction == "gaussian":
            piece.normal_(generator=gen)
        else:
            piece.random_(0, 2, generator=gen).mul_(2).sub_(1)
        b += 1
    return out


def _counter_key(seed: int, index: int, stream: int) -> int:
    return _mix(seed, index, stream)


def _counter_fill(out: torch.Tensor, key: int, start: int, direction: str, use_kernels: bool = True):
    """Elements [start, start+len(out)) of counter stream `key` into contiguous float32 `out`."""
    lib = _kernels() if use_kernels and out.device.type == "cpu" else None
    if lib is not None:
        getattr(lib, "zo_fill_g" if direction == "gaussian" else "zo_fill_r")(out.data_ptr(), out.numel(), key, start)
    else:
        out.copy_(_counter_noise_torch(key, start, out.numel(), direction, out.device))
    return out


def sample_direction(seed: int, index: int, numel: int, *, stream: int = 0, direction: str = "gaussian",
                     noise_block: int = NOISE_BLOCK, device="cpu", rng: str = "auto") -> torch.Tensor:
    """The whole flat float32 noise of tensor `index` for step seed `seed` (for references and tests)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if _resolve_rng(rng, device) == "counter":
        return _counter_fill(out, _counter_key(seed, index, stream), 0, direction)
    return _fill_noise(out, torch.Generator(device=device), seed, index, 0, stream, direction, noise_block)


# ----------------------------------------------------------------------------------------- schedule
def anneal(t: float, T1: int, T2: int, T3: int, phi: float) -> float:
    """ZO-AdaMU annealing (zo-adamu.md §1.3, closed form of the code's once-per-step recursion)."""
    if not T1 < T2 <= T3:
        raise ValueError(f"need T1 < T2 <= T3, got T1={T1}, T2={T2}, T3={T3}")
    if t < T1:
        return 1.0
    t = min(t, T2)  # frozen after T2
    denom = T3 - phi * (t - T1) * (T3 - T2) / (T2 - T1)
    if denom <= 0:
        raise ValueError(f"anneal denominator {denom} <= 0 at t={t} (T1={T1}, T2={T2}, T3={T3}, phi={phi})")
    return 0.5 * (1.0 + math.cos(math.pi * (t - T1) / denom))


@dataclass(frozen=True)
class AdaMUSchedule:
    """(alpha, beta1, beta2) of ZO-AdaMU as functions of the 0-based completed-step count t."""
    T1: int = 1024
    T2: int = 16000
    T3: int = 20000
    phi_alpha: float = 1.0
    phi_beta1: float = 0.1
    phi_beta2: float = 1.5
    alpha_floor: float | None = None  # "paper-text mode": alpha >= floor once t >= T2

    def __post_init__(self):
        if self.T1 < 0 or self.T1 >= self.T2:
            raise ValueError(f"need 0 <= T1 < T2, got T1={self.T1}, T2={self.T2}")
        if self.T2 > self.T3:
            raise ValueError(f"need T2 <= T3, got T2={self.T2}, T3={self.T3}")
        for name in ("phi_alpha", "phi_beta1", "phi_beta2"):
            # the denominator is smallest at t = T2; <= 0 there means a pole or sign flip mid-schedule
            phi = getattr(self, name)
            if self.T3 - phi * (self.T3 - self.T2) <= 0:
                raise ValueError(f"{name}={phi} makes the anneal denominator T3 - phi*(T3-T2) = "
                                 f"{self.T3 - phi * (self.T3 - self.T2)} <= 0 (T2={self.T2}, T3={self.T3})")
        if self.alpha_floor is not None and not 0.0 <= self.alpha_floor <= 1.0:
            raise ValueError(f"alpha_floor must be in [0, 1], got {self.alpha_floor}")

    def values(self, t: int) -> tuple[float, float, float]:
        T = (self.T1, self.T2, self.T3)
        alpha = anneal(t, *T, self.phi_alpha)
        if self.alpha_floor is not None and t >= self.T2:
            alpha = max(alpha, self.alpha_floor)
        return alpha, anneal(t, *T, self.phi_beta1), anneal(t, *T, self.phi_beta2)

    @classmethod
    def for_max_steps(cls, max_steps: int, **kwargs) -> "AdaMUSchedule":
        """The paper's (1024, 16000, 20000)-at-20k-steps shape scaled to `max_steps`; T1/T2/T3 in `kwargs` win."""
        if max_steps < 2:
            raise ValueError(f"max_steps must be >= 2 for an annealing schedule, got {max_steps}")
        T1 = max(1, round(0.0512 * max_steps))
        T2 = max(T1 + 1, round(0.8 * max_steps))
        return cls(**{"T1": T1, "T2": T2, "T3": max(T2, max_steps), **kwargs})


# ------------------------------------------------------------------------------------- param groups
_NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                                getattr(nn, "RMSNorm", None)) if t is not None)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def param_groups_for_model(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups of the trainable parameters; no-decay = owned by a normalisation module
    (by type or a class name ending in "Norm") or registered under the name "bias" by some module."""
    no_decay = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or _is_norm(module):
                no_decay.add(id(p))
    decay, plain = [], []
    for p in model.parameters():  # deduplicated: a tied tensor appears once
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------- optimizer
def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class ZOOptimizer(torch.optim.Optimizer):
    """Shared machinery: seeded directions, probe/update protocol, bookkeeping, checkpointing.
    Subclasses define the direction u, the update direction w (update = g·w + λθ) and post-update state.

    Each sweep goes tensor by tensor and, inside a tensor, chunk by chunk (`chunk_numel`, default `noise_block`
    elements), so no temporary is larger than one chunk.  CPU float32/float64 tensors with the counter noise take
    the C kernels (noise generated and applied in registers: no temporary at all); everything else runs the same
    arithmetic as torch operations (`_generic`)."""

    kind = "zo"
    streams = 0  # noise streams per tensor (subclasses)

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, keep_direction=False,
                 rng="auto", carry_perturbation=False, cuda_graphs=True):
        if rng not in RNGS:
            raise ValueError(f"Invalid rng: {rng!r} (choose from {RNGS})")
        if keep_direction and carry_perturbation:
            raise ValueError("keep_direction and carry_perturbation do not combine: a kept direction already costs "
                             "one noise sweep per step; choose one")
        self.rng = rng
        self.carry_perturbation = bool(carry_perturbation)
        self.cuda_graphs = bool(cuda_graphs)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, direction=direction,
                        chunk_numel=chunk_numel, noise_block=noise_block)
        super().__init__(params, defaults)
        self.exact_restore = None if exact_restore is None else bool(exact_restore)
        self.keep_direction = bool(keep_direction)
        self._use_kernels = True  # False: the torch path for every tensor (tests compare the two)
        self._gens: dict[torch.device, torch.Generator] = {}
        self._stash: dict[torch.Tensor, torch.Tensor] = {}
        self._kept: dict[torch.Tensor, tuple] = {}
        self._device_inputs: dict[torch.device, dict] = {}
        self._graphs: dict[tuple, object] = {}  # sweep key -> "seen" (ran once, eagerly) or (CUDA graph, noise calls)
        self._layout = None
        self.sweeps = self.noise_calls = 0  # diagnostics, not saved
        self.last_projected_grad = self.last_loss_plus = self.last_loss_minus = None
        self.last_schedule: dict[str, float] = {}
        self._meta()
        self._reset_step()

    # -- validation / bookkeeping
    def add_param_group(self, group):
        super().add_param_group(group)
        g = self.param_groups[-1]
        lr, eps, wd, seed = g["lr"], g["eps"], g["weight_decay"], g["seed"]
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"Invalid eps (perturbation scale): {eps}")
        if not wd >= 0:
            raise ValueError(f"Invalid weight_decay value: {wd}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r} (need a non-negative int)")
        if g["direction"] not in DIRECTIONS:
            raise ValueError(f"Invalid direction: {g['direction']!r} (choose from {DIRECTIONS})")
        nb, cn = g["noise_block"], g["chunk_numel"]
        if not (isinstance(nb, int) and nb >= 1):
            raise ValueError(f"Invalid noise_block: {nb!r}")
        if cn is not None and not (isinstance(cn, int) and cn >= 1 and cn % nb == 0):
            raise ValueError(f"Invalid chunk_numel: {cn!r} (must be a positive multiple of noise_block={nb}, "
                             "the unit in which the noise is defined)")
        for p in g["params"]:
            if not p.is_floating_point():
                raise ValueError(f"ZO optimizers need floating-point parameters, got {p.dtype}")
        for other in self.param_groups[:-1]:
            # one probe measures one directional derivative: eps and seed must be global
            if (other["eps"], other["seed"]) != (eps, seed):
                raise ValueError(f"all param groups must share eps and seed, got eps {other['eps']} vs {eps}, "
                                 f"seed {other['seed']} vs {seed}")

    def _params(self):
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def _entries(self):
        """(index, group index, group, param) in the optimizer's order; `index` names the tensor's noise."""
        index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                yield index, gi, group, p
                index += 1

    def _meta(self) -> dict:
        # global bookkeeping lives in the state of the first parameter so torch/HF checkpointing carries it
        first = next(iter(self._params()))
        st = self.state[first]
        if "zo_kind" not in st:
            st.update(zo_kind=self.kind, zo_step=0,
                      zo_skipped=torch.zeros((), dtype=torch.int64, device=first.device))
        return st

    @property
    def step_count(self) -> int:
        return self._meta()["zo_step"]

    @property
    def skipped_steps(self) -> torch.Tensor:
        return self._meta()["zo_skipped"]

    def _reset_step(self):
        self._n_probes, self._offset, self._g_sum, self._lp_sum, self._lm_sum = 0, 0, None, None, None
        self._kept_ready = False
        self._g = self._ok = None
        self._scal, self._host = {}, {}
        self._next = None  # (seed, ZO-AdaMU values) of the next step, for an update that carries its perturbation

    def state_dict(self):
        if self._n_probes:
            raise RuntimeError("state_dict() between probe() and step(): parameters are perturbed")
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self.carried:
            raise RuntimeError("load_state_dict() while the next step's perturbation rests on the parameters: "
                               "call settle() first")
        meta = next((v for v in state_dict["state"].values() if isinstance(v, dict) and "zo_kind" in v), None)
        kind = meta["zo_kind"] if meta is not None else "<not a ZO optimizer>"
        if kind != self.kind:
            raise ValueError(f"checkpoint was made with optimizer {kind}, this run uses {self.kind}; "
                             "their states are not interchangeable: resume with the same optimizer "
                             "or start from the model weights with a fresh optimizer")
        # torch's loader would cast our tensors to the parameter dtype (and mangle strings): keep them out
        own = _META + ("momentum",)
        stripped = {k: {kk: vv for kk, vv in v.items() if kk not in own} for k, v in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": stripped})
        params = list(self._params())
        for k, v in state_dict["state"].items():
            if "momentum" in v:
                p = params[k]
                self.state[p]["momentum"] = v["momentum"].to(p.device, self._state_dtype(p), copy=True,
                                                             memory_format=torch.contiguous_format)
        first = params[0]
        self._graphs.clear()  # the captured sweeps point at the replaced momentum buffers
        self.state[first].update(zo_kind=kind, zo_step=int(meta["zo_step"]),
                                 zo_skipped=meta["zo_skipped"].to(first.device, torch.int64, copy=True))
        self._reset_step()

    def _state_dtype(self, p):
        return p.dtype

    def _stashes(self, p) -> bool:
        if self.exact_restore is None:
            return p.dtype not in (torch.float32, torch.float64)
        return self.exact_restore

    # -- noise
    def _rng(self, device) -> str:
        return _resolve_rng(self.rng, device)

    def _key(self, index: int, stream: int) -> int:
        return _counter_key(self._seed, index, stream)

    def _noise(self, index, group, start, n, device, stream):
        """float32 noise of elements [start, start+n) of tensor `index` (torch path)."""
        self.noise_calls += 1
        out = torch.empty(n, dtype=torch.float32, device=device)
        if self._rng(device) == "counter":
            return _counter_fill(out, self._key(index, stream), start, group["direction"], self._use_kernels)
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        return _fill_noise(out, gen, self._seed, index, start, stream, group["direction"], group["noise_block"])

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        """(u, w) for elements [start, start+n) of parameter `index`, dtype cdt; w may be None if not need_w."""
        raise NotImplementedError

    def _kept_dtypes(self, cdt) -> tuple:
        """dtypes of the keep_direction buffers (u[, w])."""
        raise NotImplementedError

    def _kept_buffers(self, p, cdt):
        dtypes = self._kept_dtypes(cdt)
        bufs = self._kept.get(p)
        if bufs is None or tuple(b.dtype for b in bufs) != dtypes:
            bufs = self._kept[p] = tuple(torch.empty(p.numel(), dtype=dt, device=p.device) for dt in dtypes)
        return bufs

    def _dirs(self, index, p, group, start, n, cdt, need_w):
        if not self.keep_direction:
            return self._chunk_dirs(index, p, group, start, n, cdt, need_w)
        bufs = self._kept_buffers(p, cdt)
        if not self._kept_ready:  # the step's first sweep materialises u and w once
            u, w = self._chunk_dirs(index, p, group, start, n, cdt, True)
            bufs[0][start:start + n].copy_(u)
            if len(bufs) > 1:
                bufs[1][start:start + n].copy_(w)
        u = bufs[0][start:start + n].to(cdt)
        return u, (bufs[1][start:start + n].to(cdt) if len(bufs) > 1 else u)

    # -- update coefficients (once per step)
    def _coef64(self, gi, group):
        """(-lr·g, 1-lr·λ, sign(g)) as float64 tensors; a skipped step (non-finite g) gets (0, 1, ·)."""
        lr, wd = group["lr"], group["weight_decay"]
        g64 = self._g.to(torch.float64)
        neg = torch.where(self._ok, -(g64 * lr), 0.0)
        # torch.full fills on the device; torch.as_tensor of a Python float would copy it there and synchronise
        decay = torch.where(self._ok, torch.full((), 1.0 - lr * wd, dtype=torch.float64, device=g64.device), 1.0)
        sgn = torch.where(g64 >= 0, 1.0, -1.0)  # sign(0) = +1
        return neg, decay, sgn

    def _coef(self, gi, group, device, cdt):
        """0-dim (neg, decay, sgn, ok) on `device`, built once per step: no host synchronisation."""
        key = (gi, device, cdt)
        if key not in self._scal:
            self._scal[key] = tuple(x.to(device, cdt) for x in self._coef64(gi, group)) + (self._ok.to(device),)
        return self._scal[key]

    def _coef_host(self, gi, group):
        """The same coefficients as Python floats, for the CPU kernels (a CPU scalar read costs nothing)."""
        if gi not in self._host:
            self._host[gi] = tuple(float(x) for x in self._coef64(gi, group)) + (bool(self._ok),)
        return self._host[gi]

    # -- sweeps
    def _fast(self, p, lib) -> bool:
        return (lib is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
                and self._rng(p.device) == "counter")

    def _sweep(self, kind, k=0, carry=False):
        """One pass over the trainable tensors.  kind: "perturb" θ += k·ε·u; "restore" the same, or the stash;
        "update" the restore fused with the update (and, with carry, the next step's +ε·u': fused tensors only)."""
        self.sweeps += 1
        layout, every, devices, graphable = self._fused_layout()
        if devices:
            self._load_device_inputs(devices, kind == "update")
        if not (graphable and self._replay(layout, every, kind, k, carry)):
            self._sweep_tensors(kind, k, carry)

    def _sweep_tensors(self, kind, k, carry):
        lib = _kernels() if self._use_kernels else None
        first = kind == "perturb" and self._offset == 0
        jobs, writebacks, touched = [], [], []
        for index, gi, group, p in self._entries():
            if not p.requires_grad:
                continue  # frozen after construction: untouched, index kept so other directions don't shift
            contiguous = p.is_contiguous()
            flat = (p.detach() if contiguous else p.detach().contiguous()).view(-1)
            stash = self._stashes(p)
            if stash and first:
                buf = self._stash.get(p)
                if buf is None:
                    buf = self._stash[p] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
                buf.copy_(flat)
            if stash and kind == "restore":
                flat.copy_(self._stash[p])
            elif self._fused(p):
                self._fused_sweep(kind, k, index, gi, group, p, flat, stash, carry)
                if contiguous:
                    touched.append(p)
            else:
                fast = self._fast(p, lib)
                size = group["chunk_numel"] or group["noise_block"]
                for start in range(0, flat.numel(), size):
                    n = min(size, flat.numel() - start)
                    if fast:
                        jobs.append(self._fast_job(lib, kind, k, index, gi, group, p, flat, start, n, stash))
                    else:
                        self._generic(kind, k, index, gi, group, p, flat[start:start + n], start, stash)
                if fast and contiguous:
                    touched.append(p)
            if not contiguous:
                writebacks.append((p, flat))  # also keeps the copy alive until the kernels have run
        _run_jobs(jobs)
        for p, flat in writebacks:
            p.detach().copy_(flat.view_as(p))
        if touched:  # the kernels wrote through raw pointers: tell autograd the tensors changed
            torch.autograd.graph.increment_version(touched)
        if self.keep_direction:
            self._kept_ready = True

    def _fused(self, p) -> bool:
        """Whether this tensor's sweep runs as one fused Triton kernel (CUDA, counter noise, no kept direction)."""
        if not self._use_kernels or self.keep_direction or self._rng(p.device) != "counter":
            return False
        kernels = _triton()
        return kernels is not None and kernels.supports(p, self._state_dtype(p))

    def _fused_layout(self) -> tuple:
        """(layout key, the trainable tensors if every one is swept by a fused kernel else None, the devices of the
        fused ones, whether the sweeps can be captured as CUDA graphs: all fused, contiguous, on one CUDA device),
        cached per layout: which tensors are trainable, where and how they are stored, whether kernels are on."""
        layout = (self._use_kernels,
                  tuple((p.data_ptr(), p.device, p.requires_grad, p.is_contiguous()) for p in self._params()))
        if self._layout is None or self._layout[0] != layout:
            self._graphs.clear()  # captured for tensors that moved, froze or thawed
            trainable = tuple(p for p in self._params() if p.requires_grad)
            fused = [p for p in trainable if self._fused(p)]
            every = trainable if trainable and len(fused) == len(trainable) else None
            devices = tuple(dict.fromkeys(p.device for p in fused))
            graphable = (every is not None and len(devices) == 1 and devices[0].type == "cuda"
                         and all(p.is_contiguous() for p in every))
            self._layout = (layout, every, devices, graphable)
        return self._layout

    # -- the fused sweeps' per-step inputs, in device tensors at fixed addresses
    def _load_device_inputs(self, devices, update: bool):
        """Write this step's seeds, ZO-AdaMU values and (for an update) coefficients where the kernels read them.
        Host-to-device copies without synchronisation; skipped when the values did not change."""
        next_seed, next_amu = self._next or (0, None)
        seeds, amu = _triton().step_values(self._seed, next_seed, self._step_amu(), next_amu)
        if update:  # (neg, decay, sgn, ok) of each group, float64, wherever g lives
            coefficients = [torch.stack((*self._coef64(gi, group), self._ok.to(torch.float64)))
                            for gi, group in enumerate(self.param_groups)]
        for device in devices:
            inputs = self._device_inputs_of(device)
            if inputs["values"] != (seeds, amu):
                inputs["seeds"].copy_(_staged(seeds, torch.int64, device), non_blocking=True)
                inputs["amu"].copy_(_staged(amu, torch.float32, device), non_blocking=True)
                _triton().fill_keys(inputs["seeds"], inputs["keys"])
                inputs["values"] = (seeds, amu)
            if update:
                for row, values in zip(inputs["coef"], coefficients):
                    row.copy_(values)

    def _device_inputs_of(self, device) -> dict:
        inputs = self._device_inputs.get(device)
        tensors = sum(len(group["params"]) for group in self.param_groups)
        if inputs is None or inputs["coef"].shape[0] != len(self.param_groups) or len(inputs["keys"]) != tensors:
            self._graphs.clear()
            inputs = self._device_inputs[device] = dict(
                seeds=torch.zeros(2, dtype=torch.int64, device=device),
                keys=torch.zeros(tensors, 4, dtype=torch.int64, device=device),
                amu=torch.zeros(10, dtype=torch.float32, device=device),
                coef=torch.zeros(len(self.param_groups), 4, dtype=torch.float32, device=device), values=None)
        return inputs

    def _step_amu(self):
        """ZO-AdaMU's (√α, √(1-α), β1, 1-β1, β2, 1-β2) of this step; None for optimizers without them."""
        return None

    def _replay(self, layout, trainable, kind, k, carry) -> bool:
        """Run the sweep (of a graphable layout, see _fused_layout) as a CUDA graph of its kernel launches, if
        possible; False: run it eagerly.

        A sweep's launches depend only on the tensors and on constants (the sweep kind, k, the probe offset, each
        group's ε and direction); every per-step value is read from device memory.  So each distinct sweep runs
        eagerly once (which also compiles the kernels), is captured the second time, and is replayed from then on:
        one graph launch instead of one Python-side kernel launch per tensor."""
        if not self.cuda_graphs or torch.cuda.is_current_stream_capturing():
            return False
        key = (kind, k, carry, self._offset, layout, self._graph_constants(),
               tuple((g["eps"], g["direction"]) for g in self.param_groups))
        entry = self._graphs.get(key)
        if entry is None:
            self._graphs[key] = "seen"
            return False
        if entry == "seen":
            graph, calls = torch.cuda.CUDAGraph(), self.noise_calls
            try:
                with torch.cuda.graph(graph):
                    self._sweep_tensors(kind, k, carry)
            except Exception as error:  # never fail a run over an optimisation: fall back to eager launches
                logger.warning("CUDA graph capture of a ZO sweep failed (%s); sweeping with eager launches", error)
                self.cuda_graphs = False
                self._graphs.clear()
                self.noise_calls = calls
                return False
            entry = self._graphs[key] = (graph, self.noise_calls - calls)
            self.noise_calls = calls
        graph, calls = entry
        graph.replay()
        self.noise_calls += calls
        torch.autograd.graph.increment_version(list(trainable))
        return True

    def _graph_constants(self) -> tuple:
        """Optimizer attributes baked into the captured launches (subclasses)."""
        return ()

    def _fused_sweep(self, kind, k, index, gi, group, p, flat, stash, carry=False):
        """The sweep of one whole tensor by zo_triton.sweep (the same arithmetic as `_generic`)."""
        inputs = self._device_inputs[p.device]
        args = self._fused_args(index, group, p, inputs)
        self.noise_calls += self.streams * (2 if carry else 1)  # a carried update also draws the next direction
        if kind != "update":
            _triton().sweep(flat, perturb_scale=k * group["eps"], **args)
            return
        _triton().sweep(flat, update=True, offset_scale=self._offset * -group["eps"],
                        stash=self._stash[p] if stash else None, carry=carry,
                        perturb_scale=group["eps"] if carry else 0.0, coefficients=inputs["coef"][gi], **args)

    def _fused_args(self, index, group, p, inputs) -> dict:
        """The optimizer's own zo_triton.sweep arguments (noise keys, ZO-AdaMU's state)."""
        raise NotImplementedError

    @staticmethod
    def _write(x, y):
        if y is not x:
            x.copy_(y)  # the single rounding back to the storage dtype

    def _generic(self, kind, k, index, gi, group, p, x, start, stash):
        """One chunk in torch operations: the definition the kernels reproduce bit for bit."""
        n, cdt = x.numel(), _compute_dtype(p.dtype)
        if kind != "update":
            u, _ = self._dirs(index, p, group, start, n, cdt, False)
            y = x if x.dtype == cdt else x.to(cdt)
            self._write(x, y.add_(u * (k * group["eps"])))
            return
        u, w = self._dirs(index, p, group, start, n, cdt, True)
        neg, decay, sgn, ok = self._coef(gi, group, p.device, cdt)
        if stash:
            y = self._stash[p][start:start + n].to(cdt, copy=True)
        else:
            y = (x if x.dtype == cdt else x.to(cdt)).add_(u * (self._offset * -group["eps"]))
        self._write(x, y.mul_(decay).add_(w * neg))
        self._after_update(p, start, u, ok, sgn)

    def _fast_job(self, lib, kind, k, index, gi, group, p, flat, start, n, stash) -> list:
        """The kernel calls for one chunk (run later, possibly on a worker thread)."""
        raise NotImplementedError

    # -- protocol
    def _perturb(self, k):
        if k:
            self._sweep("perturb", k)
            self._offset += k

    @property
    def carried(self) -> bool:
        """Whether the parameters rest at θ+εu of the next step (carry_perturbation) and need settle()."""
        return self._n_probes == 0 and self._offset != 0

    @torch.no_grad()
    def settle(self) -> None:
        """Restore θ where a carried perturbation rests on the parameters; nothing to do otherwise."""
        if self._n_probes:
            raise RuntimeError("settle() between probe() and step(): finish the step first")
        if self._offset:
            self._sweep("restore", -self._offset)
            self._reset_step()

    def _begin_step(self):
        first = self.param_groups[0]
        self._seed = step_seed(first["seed"], self.step_count)
        self._on_step_begin(self.step_count)

    def _on_step_begin(self, t):
        pass

    @torch.no_grad()
    def probe(self, closure):
        """Evaluate closure() at θ+εu and θ-εu for this step's direction u; accumulate g=(ℓ+-ℓ-)/(2ε)."""
        if self._n_probes == 0:
            self._begin_step()
        eps = self.param_groups[0]["eps"]
        try:
            self._perturb(1 - self._offset)  # from θ (+1) or from θ-εu (+2)
            lp = torch.as_tensor(closure()).detach()
            self._perturb(-2)
            lm = torch.as_tensor(closure()).detach()
        except BaseException:
            self._abort()
            raise
        # low-precision losses are differenced in fp32 (at least); fp64 losses keep fp64
        lp, lm = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (lp, lm))
        g = (lp - lm) / (2 * eps)
        if self._n_probes == 0:
            self._g_sum, self._lp_sum, self._lm_sum = g, lp, lm
        else:
            self._g_sum, self._lp_sum, self._lm_sum = self._g_sum + g, self._lp_sum + lp, self._lm_sum + lm
        self._n_probes += 1
        return lp, lm

    def _abort(self):
        # the closure failed: put θ back so an exception never leaves the model perturbed
        if self._offset:
            self._sweep("restore", -self._offset)
        self._reset_step()

    @torch.no_grad()
    def step(self, closure=None):
        """Optional probe(closure), then the update fused with the restore.  Returns mean ℓ+."""
        if closure is not None:
            self.probe(closure)
        if self._n_probes == 0:
            raise RuntimeError("step() needs a closure or at least one probe() in this step")
        g = self._g_sum / self._n_probes
        self._g, self._ok = g, torch.isfinite(g)  # ok stays on device: no host sync on the torch path
        meta = self._meta()
        fuse_carry = self.carry_perturbation and self._fused_layout()[1] is not None
        if fuse_carry:
            self._next = self._carry_args(meta["zo_step"] + 1)
        self._sweep("update", carry=fuse_carry)

        meta["zo_skipped"] = meta["zo_skipped"] + (~self._ok).to(meta["zo_skipped"].device, torch.int64)
        meta["zo_step"] += 1
        self.last_projected_grad = g
        self.last_loss_plus, self.last_loss_minus = self._lp_sum / self._n_probes, self._lm_sum / self._n_probes
        self.last_schedule = self._schedule_now()
        self._reset_step()
        if self.carry_perturbation:
            self._begin_step()
            if fuse_carry:
                self._offset = 1
            else:
                self._perturb(1)
        return self.last_loss_plus

    def _schedule_now(self) -> dict:
        return {}

    def _carry_args(self, t: int) -> tuple:
        """(seed of step t, what the fused kernel needs of step t's direction besides the noise keys)."""
        return step_seed(self.param_groups[0]["seed"], t), None

    def _after_update(self, p, start, u, ok, sgn):
        pass


def _staged(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` in host memory a non-blocking copy to `device` can read without synchronising: pinned for CUDA
    (torch's pinned-memory cache keeps the block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" else host


def _ptr(t: torch.Tensor, start: int) -> int:
    return t.data_ptr() + start * t.element_size()


class MeZO(ZOOptimizer):
    """ZO-SGD: θ <- θ - lr·(g·z + λθ), z ~ N(0, I) (or ±1)."""

    kind = "mezo"
    streams = 1  # noise streams per tensor: z

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        z = self._noise(index, group, start, n, p.device, 0).to(cdt)
        return z, z

    def _kept_dtypes(self, cdt):
        return (torch.float32,)  # the noise itself, exact in any compute dtype

    def _fused_args(self, index, group, p, inputs):
        return dict(index=index, keys=inputs["keys"], gaussian=group["direction"] == "gaussian")

    def _fast_job(self, lib, kind, k, index, gi, group, p, flat, start, n, stash):
        tn, gn = _TORCH_TN[flat.dtype], "g" if group["direction"] == "gaussian" else "r"
        x, key, calls = _ptr(flat, start), self._key(index, 0), []
        if self.keep_direction:
            zp = _ptr(self._kept_buffers(p, flat.dtype)[0], start)
            if not self._kept_ready:
                self.noise_calls += self.streams
                calls.append(functools.partial(getattr(lib, f"zo_fill_{gn}"), zp, n, key, start))
        else:
            self.noise_calls += self.streams
        if kind != "update":
            a = k * group["eps"]
            if self.keep_direction:
                calls.append(functools.partial(getattr(lib, f"zo_axpyb_{tn}_f32"), x, zp, n, a))
            else:
                calls.append(functools.partial(getattr(lib, f"zo_axpy_{tn}_{gn}"), x, n, key, start, a))
            return calls
        neg, decay, _, _ = self._coef_host(gi, group)
        c = self._offset * -group["eps"]
        if self.keep_direction:
            calls.append(functools.partial(getattr(lib, f"zo_rupdb_{tn}_f32"), x, _ptr(self._stash[p], start), zp,
                                           n, decay, neg) if stash else
                         functools.partial(getattr(lib, f"zo_updb_{tn}_f32"), x, zp, zp, n, c, decay, neg))
        else:
            calls.append(functools.partial(getattr(lib, f"zo_rupd_{tn}_{gn}"), x, _ptr(self._stash[p], start), n,
                                           key, start, decay, neg) if stash else
                         functools.partial(getattr(lib, f"zo_upd_{tn}_{gn}"), x, n, key, start, c, decay, neg))
        return calls


class ZOAdaMU(ZOOptimizer):
    """ZO-AdaMU (zo-adamu.md §1.2 with the §1.4 fixes): u = β1·√α·n1 + (1-β1)·(m + √(1-α)·n2) is used for
    both probes and update; θ <- θ - lr·(g·u/√(v+σ) + λθ), v = β2·ż² + (1-β2)·z̈² rebuilt each step;
    m <- sign(g)·u (sign(0) = +1, so the centre never collapses) or m <- u if not signed_momentum.
    state_dtype (float32 / bfloat16 / float16, default: the parameter dtype) stores the momentum buffer."""

    kind = "zo_adamu"
    streams = 2  # noise streams per tensor: n1, n2
    _STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, params, lr=1e-4, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, schedule: AdaMUSchedule | None = None,
                 sigma=1e-8, signed_momentum=True, state_dtype=None, **kw):
        if state_dtype not in self._STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (choose from {self._STATE_DTYPES})")
        if not sigma > 0:
            raise ValueError(f"Invalid sigma: {sigma}")
        self.schedule = schedule if schedule is not None else AdaMUSchedule()
        self.sigma, self.signed_momentum, self.state_dtype = float(sigma), bool(signed_momentum), state_dtype
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    def _state_dtype(self, p):
        return self.state_dtype or p.dtype

    def _momentum(self, p):
        st = self.state[p]
        if "momentum" not in st:
            st["momentum"] = torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.contiguous_format)
        return st["momentum"].view(-1)

    def _on_step_begin(self, t):
        self._abc = self.schedule.values(t)  # once per step (fix of bug §1.4.3)
        self._amu = self._amu_of(self._abc)

    @staticmethod
    def _amu_of(abc) -> tuple:
        # (√α, √(1-α), β1, 1-β1, β2, 1-β2) in double; each is rounded once to the compute dtype where used
        alpha, b1, b2 = abc
        return math.sqrt(alpha), math.sqrt(1.0 - alpha), b1, 1.0 - b1, b2, 1.0 - b2

    def _schedule_now(self) -> dict:
        return dict(zip(("alpha", "beta1", "beta2"), self._abc))

    def _carry_args(self, t):
        return step_seed(self.param_groups[0]["seed"], t), self._amu_of(self.schedule.values(t))

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        sa, sb, b1, ob1, b2, ob2 = self._amu
        zd = self._noise(index, group, start, n, p.device, 0).to(cdt).mul_(sa)
        zdd = self._noise(index, group, start, n, p.device, 1).to(cdt).mul_(sb)
        zdd.add_(self._momentum(p)[start:start + n].to(cdt))
        u = (zd * b1).add_(zdd * ob1)
        if not need_w:
            return u, None
        v = (zd * zd).mul_(b2).add_((zdd * zdd).mul_(ob2)).add_(self.sigma)
        return u, u / _sqrt(v)

    def _kept_dtypes(self, cdt):
        return (cdt, cdt)

    def _fused_args(self, index, group, p, inputs):
        return dict(index=index, keys=inputs["keys"], gaussian=group["direction"] == "gaussian",
                    momentum=self._momentum(p), amu=inputs["amu"], sigma=self.sigma, signed=self.signed_momentum)

    def _step_amu(self):
        return self._amu

    def _graph_constants(self):
        return self.sigma, self.signed_momentum, self.state_dtype

    def _after_update(self, p, start, u, ok, sgn):
        m = self._momentum(p)[start:start + u.numel()]
        m.copy_(torch.where(ok, u * sgn if self.signed_momentum else u, m.to(u.dtype)))  # skipped: m kept

    def _fast(self, p, lib):
        if not super()._fast(p, lib):
            return False
        tn, mn = _TORCH_TN[p.dtype], _TORCH_TN.get(self._state_dtype(p))
        return (tn, mn) in _AMU_PAIRS and hasattr(lib, f"zo_amu_probe_{tn}_{mn}_g")

    def _fast_job(self, lib, kind, k, index, gi, group, p, flat, start, n, stash):
        m = self._momentum(p)
        tn, mn, gn = _TORCH_TN[flat.dtype], _TORCH_TN[m.dtype], "g" if group["direction"] == "gaussian" else "r"
        suf = f"{tn}_{mn}_{gn}"
        x, mp, calls = _ptr(flat, start), _ptr(m, start), []
        keys = (self._key(index, 0), self._key(index, 1))
        sa, sb, b1, ob1, b2, ob2 = self._amu
        head = (n, *keys, start, sa, sb, b1, ob1)
        if self.keep_direction:
            ub, wb = self._kept_buffers(p, flat.dtype)
            up, wp = _ptr(ub, start), _ptr(wb, start)
            if not self._kept_ready:
                self.noise_calls += self.streams
                calls.append(functools.partial(getattr(lib, f"zo_amu_dirs_{suf}"), up, wp, mp, *head,
                                               b2, ob2, self.sigma))
        else:
            self.noise_calls += self.streams
        if kind != "update":
            a = k * group["eps"]
            if self.keep_direction:
                calls.append(functools.partial(getattr(lib, f"zo_axpyb_{tn}_{tn}"), x, up, n, a))
            else:
                calls.append(functools.partial(getattr(lib, f"zo_amu_probe_{suf}"), x, mp, *head, a))
            return calls
        neg, decay, sgn, ok = self._coef_host(gi, group)
        sgn = sgn if self.signed_momentum else 1.0
        c = self._offset * -group["eps"]
        src = _ptr(self._stash[p], start) if stash else None
        if self.keep_direction:
            calls.append(functools.partial(getattr(lib, f"zo_rupdb_{tn}_{tn}"), x, src, wp, n, decay, neg) if stash
                         else functools.partial(getattr(lib, f"zo_updb_{tn}_{tn}"), x, up, wp, n, c, decay, neg))
            if ok:
                calls.append(functools.partial(getattr(lib, f"zo_mom_{tn}_{mn}"), mp, up, n, sgn))
        else:
            tail = (b2, ob2, self.sigma, decay, neg, sgn, int(ok))
            calls.append(functools.partial(getattr(lib, f"zo_amu_rupd_{suf}"), x, src, mp, *head, *tail) if stash
                         else functools.partial(getattr(lib, f"zo_amu_upd_{suf}"), x, mp, *head, *tail, c))
        return calls


# The optimizers --zo_optim offers, by name.
OPTIMIZERS = {cls.kind: cls for cls in (MeZO, ZOAdaMU)}
