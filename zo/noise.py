"""The noise of the zeroth-order optimizers: what a seed means.  Imports only torch and numpy.

Everything else (the optimizers, the C and Triton sweeps) may change without changing the directions; this module is
the definition they reproduce bit for bit.

  * step seed  = step_seed(seed, t), t = 0-based count of completed steps.  A pure function, so no RNG state is saved
    and a resumed run replays the same directions.
  * direction seed = direction_seed(seed, t, q) for a step that probes several directions q = 0, 1, ...;
    direction 0 is the step seed itself.
  * tensor `index` = position of the parameter in the optimizer (groups in order, then params).
  * stream = which of a method's noise streams (a method declares how many it draws per tensor).
  * rng="counter" (the default on CPU, and on CUDA where Triton is installed): a counter-based stream, a pure function
    of (step seed, index, stream, element position j of the flattened tensor).  key = counter_key(step seed, index,
    stream) = mix(step seed, index, stream); h(i) = splitmix64 output number i+1 of seed `key`
    = fmix64(key + (i+1)·0x9E3779B97F4A7C15).
      gaussian:   elements 2p and 2p+1 are the Box–Muller pair of h(p): u1 = (h>>40 + 1)/2^24 ∈ (0, 1],
                  u2 = (h>>16 & 0xFFFFFF)/2^24, r = sqrt(-2 ln u1), z(2p) = r·cos 2πu2, z(2p+1) = r·sin 2πu2,
                  with ln / cos / sin evaluated by fixed float32 polynomials (LN, SIN, COS below) after exact range
                  reduction (box_muller spells out every operation).  Every step is one IEEE-754 float32 operation
                  (no fused multiply-add, no library transcendental), so compiled kernels and this torch reference
                  give bit-identical noise on any machine.  |z| <= 5.77 (24-bit u1).
      rademacher: z(j) = -1 if bit (j mod 64) of h(j div 64) is set, else +1: one hash gives 64 signs.
    Because the noise is a function of the element position, any chunking, and any shard of a tensor that knows the
    global position of its first element, draws the same noise.
  * rng="torch" (the default for other devices, and for CUDA without Triton): the flat tensor is cut into blocks of
    `noise_block` elements; block b of stream s is `normal_()` (or ±1) of a float32 vector of that block's size, drawn
    by a torch.Generator on the parameter's device seeded with mix(step seed, index, b, s).
  * stochastic rounding of 16-bit weights (opt-in): element j of tensor `index` takes 32 random bits from the counter
    stream counter_key(seed, index, ROUNDING_STREAM) whatever `rng` says: the low half of h(j div 2) for even j, the
    high half for odd j (one hash per pair, as the Gaussian noise); stochastic_round spells out how they round.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

__all__ = ["NOISE_BLOCK", "DIRECTIONS", "RNGS", "GOLDEN", "FMIX1", "FMIX2", "LN", "LN2", "SIN", "COS", "step_seed",
           "direction_seed", "mix", "counter_key", "resolve_rng", "sqrt_rn", "splitmix", "box_muller", "counter_noise",
           "block_noise", "sample_direction", "ROUNDING_STREAM", "rounding_bits", "stochastic_round"]

NOISE_BLOCK = 1 << 20
DIRECTIONS = ("gaussian", "rademacher")
RNGS = ("auto", "counter", "torch")
M64 = (1 << 64) - 1
# the stream number of the rounding bits: far above any method's stream numbers (0, 1, ...), so the bits that round
# an update are independent of the direction that made it
ROUNDING_STREAM = 0x524F554E44
GOLDEN, FMIX1, FMIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _f32(x: float) -> float:
    return float(np.float32(x))


LN2 = _f32(math.log(2.0))
# ln f = s·(2 + s²·(L3 + s²·(L5 + s²·L7))), s = (f-1)/(f+1), f ∈ (√½, √2]   (fit, rel. error 1.5e-9)
LN = tuple(map(_f32, (2.0, 0.6666678190231323, 0.3997836709022522, 0.2983228266239166)))
# sin(πt/2) = t·(S1 + t²·(S3 + t²·(S5 + t²·S7))), cos(πt/2) = 1 + t²·(C2 + t²·(C4 + t²·(C6 + t²·C8))), t ∈ [0, ½]
SIN = tuple(map(_f32, (1.5707963705062866, -0.6459635496139526, 0.07968097180128098, -0.004603920038789511)))
COS = tuple(map(_f32, (1.0, -1.2337005138397217, 0.25366926193237305, -0.020860355347394943,
                       0.0009041568846441805)))


def step_seed(base_seed: int, step: int) -> int:
    """64-bit seed of step `step`: a pure function of (base_seed, step)."""
    return int(np.random.SeedSequence([int(base_seed), int(step)]).generate_state(1, np.uint64)[0])


def direction_seed(base_seed: int, step: int, direction: int = 0) -> int:
    """64-bit seed of direction `direction` of step `step`.  Direction 0 is step_seed(base_seed, step), so a method
    that probes one direction per step draws the same noise as before directions had numbers; direction q > 0
    draws from the entropy (base_seed, step, q), a stream independent of every step seed."""
    if isinstance(direction, bool) or not isinstance(direction, int) or direction < 0:
        raise ValueError(f"direction must be a non-negative int (0 = the step's first direction), got {direction!r}")
    if direction == 0:
        return step_seed(base_seed, step)
    return int(np.random.SeedSequence([int(base_seed), int(step), direction]).generate_state(1, np.uint64)[0])


def mix(*words: int) -> int:
    """splitmix64 chained over the words (cheap enough to run once per tensor or noise block in Python)."""
    h = 0
    for w in words:
        h = ((h ^ (w & M64)) + GOLDEN) & M64
        h = ((h ^ (h >> 30)) * FMIX1) & M64
        h = ((h ^ (h >> 27)) * FMIX2) & M64
        h ^= h >> 31
    return h


def counter_key(seed: int, index: int, stream: int) -> int:
    """The key of the counter stream of tensor `index`, noise stream `stream`, for step seed `seed`."""
    return mix(seed, index, stream)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_rng(rng: str, device) -> str:
    """"counter" or "torch" for `rng` on `device` ("auto": counter where a fast path draws it)."""
    if rng not in RNGS:
        raise ValueError(f"Invalid rng: {rng!r} (choose from {RNGS})")
    if rng == "auto":
        kind = torch.device(device).type
        return "counter" if kind == "cpu" or (kind == "cuda" and triton_installed()) else "torch"
    return rng


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root (IEEE-754).  torch's CPU sqrt goes through vectorised math libraries that are
    off by one ulp for ~20 % of float32 inputs; numpy's is the hardware instruction."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return x.sqrt()


def _s64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical shift of an int64 tensor


def splitmix(key: int, i: torch.Tensor) -> torch.Tensor:
    """h(i) for an int64 tensor of positions (int64 arithmetic wraps like uint64)."""
    z = (i + 1) * _s64(GOLDEN) + _s64(key)
    z = (z ^ _lsr(z, 30)) * _s64(FMIX1)
    z = (z ^ _lsr(z, 27)) * _s64(FMIX2)
    return z ^ _lsr(z, 31)


def _horner(x: torch.Tensor, coefficients) -> torch.Tensor:
    """c0 + x(c1 + x(c2 + ...)), one rounding per operation in the same order as the kernels."""
    p = x * coefficients[-1]
    for c in coefficients[-2:0:-1]:
        p = (p + c) * x
    return p + coefficients[0]


def box_muller(h: torch.Tensor):
    """(z(2p), z(2p+1)) of the hashes h(p), operation by operation as every kernel computes them."""
    i32, f32 = torch.int32, torch.float32
    m = (_lsr(h, 40) + 1).to(i32)                      # 1 .. 2^24
    k = (_lsr(h, 16) & 0xFFFFFF).to(i32)               # 0 .. 2^24-1
    b = m.to(f32).view(i32)                            # exact
    mant = (b & 0x7FFFFF) | 0x3F800000                 # f ∈ [1, 2)
    big = (mant > 0x3FB504F3).to(i32)                  # f > √2: halve it
    e = (b >> 23) - 127 + big - 24
    f = (mant - (big << 23)).view(f32)
    s = (f - 1.0) / (f + 1.0)
    ln_f = s * _horner(s * s, LN)
    ln_u1 = e.to(f32) * LN2
    ln_u1 = ln_u1 + ln_f
    r = sqrt_rn(ln_u1 * -2.0)
    q, j = k >> 22, k & 0x3FFFFF                       # quadrant, position in it
    swap = j > 0x200000
    t = torch.where(swap, 0x400000 - j, j).to(f32) * 2.0 ** -22   # exact, ∈ [0, ½]
    t2 = t * t
    S = _horner(t2, SIN) * t
    C = _horner(t2, COS)

    def quadrant(q):  # cos(qπ/2 + πt'/2) from the sine / cosine of the reduced angle
        v = torch.where(((swap.to(i32) ^ q) & 1).bool(), S, C)
        return r * torch.where((((q + 1) >> 1) & 1).bool(), -v, v)
    return quadrant(q), quadrant((q + 3) & 3)


def counter_noise(key: int, start: int, n: int, direction: str, device) -> torch.Tensor:
    """Elements [start, start+n) of the counter stream `key`, float32, in torch operations (any device): the
    bit-exact reference of every kernel."""
    if n <= 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    if direction == "rademacher":  # element j: bit j mod 64 of h(j div 64)
        w0, w1 = start >> 6, (start + n - 1) >> 6
        h = splitmix(key, torch.arange(w0, w1 + 1, dtype=torch.int64, device=device))
        bits = (h[:, None] >> torch.arange(64, device=device)) & 1   # arithmetic shift: bit b is still bit b
        one = torch.ones((), dtype=torch.float32, device=device)
        off = start - 64 * w0
        return torch.where(bits.view(-1)[off:off + n].bool(), -one, one)
    p0, p1 = start >> 1, (start + n - 1) >> 1
    z0, z1 = box_muller(splitmix(key, torch.arange(p0, p1 + 1, dtype=torch.int64, device=device)))
    off = start - 2 * p0
    return torch.stack([z0, z1], -1).view(-1)[off:off + n].contiguous()


def counter_noise_at(key: int, positions: torch.Tensor, direction: str) -> torch.Tensor:
    """The elements of the counter stream `key` at arbitrary positions (an int64 tensor of any shape), float32:
    element j equals counter_noise(key, j, 1) bit for bit, since every element is a function of its position (the
    rows of an embedding gathered by a forward-time probe draw exactly their slice of the full tensor's noise)."""
    if direction == "rademacher":  # element j: bit j mod 64 of h(j div 64)
        bit = (splitmix(key, positions >> 6) >> (positions & 63)) & 1   # arithmetic shift: bit b lands on bit 0
        return torch.where(bit.bool(), -1.0, 1.0).to(torch.float32)
    z0, z1 = box_muller(splitmix(key, positions >> 1))   # element 2p+1 is the sine of pair p
    return torch.where((positions & 1).bool(), z1, z0)


def block_noise(out: torch.Tensor, generator: torch.Generator, seed: int, index: int, start: int, stream: int,
                direction: str, block: int) -> torch.Tensor:
    """rng="torch": elements [start, start+len(out)) of the noise of tensor `index` into float32 `out` (`start` a
    multiple of `block`)."""
    b = start // block
    for off in range(0, out.numel(), block):
        generator.manual_seed(mix(seed, index, b, stream))
        piece = out[off:off + block]
        if direction == "gaussian":
            piece.normal_(generator=generator)
        else:
            piece.random_(0, 2, generator=generator).mul_(2).sub_(1)
        b += 1
    return out


def sample_direction(seed: int, index: int, numel: int, *, stream: int = 0, direction: str = "gaussian",
                     noise_block: int = NOISE_BLOCK, device="cpu", rng: str = "auto") -> torch.Tensor:
    """The whole flat float32 noise of tensor `index` for step seed `seed` (for references and tests)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"Invalid direction: {direction!r} (choose from {DIRECTIONS})")
    if resolve_rng(rng, device) == "counter":
        return counter_noise(counter_key(seed, index, stream), 0, numel, direction, device)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return block_noise(out, torch.Generator(device=device), seed, index, 0, stream, direction, noise_block)


def rounding_bits(key: int, start: int, n: int, device) -> torch.Tensor:
    """The 32 random bits of elements [start, start+n) of counter stream `key`, as int64 in [0, 2^32): element j is
    the low half of h(j div 2) for even j, the high half for odd j."""
    if n <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    p0, p1 = start >> 1, (start + n - 1) >> 1
    h = splitmix(key, torch.arange(p0, p1 + 1, dtype=torch.int64, device=device))
    off = start - 2 * p0
    return torch.stack([h & 0xFFFFFFFF, _lsr(h, 32)], -1).view(-1)[off:off + n].contiguous()


def stochastic_round(v: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `v` rounded to bfloat16 / float16 up (in magnitude) with probability (|v| - lo) / (hi - lo) between
    the two neighbours lo <= |v| <= hi, from the 32 random bits of each element (`rounding_bits`); integer steps and
    exact float operations only, which every kernel repeats bit for bit.  Unbiased, E[result] = v, except: NaN stays
    NaN, beyond the largest finite value it may round to inf, and float16 inputs below 2^-25 (all far below half the
    smallest subnormal) overstate the probability of rounding up by less than 2^-24.
      bfloat16: the bits of v plus the top 16 random bits, cut to the top 16 (a carry is the round up).
      float16, |v| >= 2^-14: the same with the exponent rebiased and 13 random bits; |v| < 2^-14 (subnormal): w =
      |v|·2^24 (exact), up where (2^24-1 - top 24 random bits)·2^-24 < w - trunc(w) (both exact; so that
      all-zero bits truncate and all-one bits round up in every case, like the carry above)."""
    u = v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if dtype == torch.bfloat16:
        out = torch.where(v.isnan(), 0x7FC0, (u + (bits >> 16)) >> 16)
    elif dtype == torch.float16:
        a, sign = u & 0x7FFFFFFF, (u >> 16) & 0x8000
        normal = ((a + 0xC8000000 + (bits >> 19)) & 0xFFFFFFFF) >> 13
        w = v.abs() * 16777216.0
        whole = w.to(torch.int32)
        up = ((bits >> 8) ^ 0xFFFFFF).to(torch.float32) * 2.0 ** -24 < w - whole.to(torch.float32)
        out = torch.where(a < 0x38800000, whole.to(torch.int64) + up.to(torch.int64), normal)
        out = torch.where(a >= 0x47800000, torch.where(a > 0x7F800000, 0x7E00, 0x7C00), out) | sign
    else:
        raise ValueError(f"stochastic rounding is to bfloat16 or float16, not {dtype}")
    return out.to(torch.int32).to(torch.int16).view(dtype)
