"""The ZO sweeps as fused Triton kernels, for CUDA tensors: the counter-based noise of `zo` generated in registers and
applied in one pass over each tensor (read θ once, write it once; ZO-AdaMU also reads and writes its momentum).

Every operation is the one `zo.ZOOptimizer._generic` performs on the torch path, in the same order, each rounded once
in float32 (fused multiply-add off, IEEE division and square root), so a CUDA run draws the same directions as a CPU
run from the same seed and the kernels equal the torch path bit for bit (tests/test_zo_triton.py). Scalars that change
every step (the step seeds, ZO-AdaMU's schedule values, -lr·g, 1-lr·λ, sign(g), whether g is finite) are read from
device tensors: no host synchronisation, and one CUDA graph of a sweep's launches serves every step (zo.ZOOptimizer
captures and replays them).

Used only when Triton imports and a CUDA tensor is float32/bfloat16/float16; everything else takes the torch path.
With `TRITON_INTERPRET=1` set before the import and `allow_cpu = True`, the kernels run on CPU tensors in Triton's
interpreter: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the C kernels and the torch path cover everything
    triton = tl = None

# the float32 constants of zo's counter noise (zo._LN, _SIN, _COS, _LN2), kept in one place there
from zo import _COS, _LN, _LN2, _SIN  # noqa: E402

# Launch shape: Box–Muller pairs per program and warps per program (bench/zo_sweep.py measures the alternatives).
PAIRS = 512  # a multiple of 32: a block holds whole 64-element words of the Rademacher noise
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this (with TRITON_INTERPRET=1 before the import) to run the kernels on CPU tensors in Triton's interpreter.
allow_cpu = False


def available() -> bool:
    return triton is not None


def supports(p: torch.Tensor, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels handle this parameter (and momentum dtype) where it lives."""
    if triton is None or p.dtype not in _DTYPES or (state_dtype is not None and state_dtype not in _DTYPES):
        return False
    return p.device.type == "cuda" or (p.device.type == "cpu" and allow_cpu)


if triton is not None:
    @triton.jit
    def _horner(x, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                C4: tl.constexpr, DEGREE: tl.constexpr):
        # c0 + x(c1 + x(c2 + ...)), one rounding per operation, in zo._horner's order
        if DEGREE == 4:
            p = x * C4
            p = (p + C3) * x
        else:
            p = x * C3
        p = (p + C2) * x
        p = (p + C1) * x
        return p + C0

    @triton.jit
    def _round_to(y, DTYPE: tl.constexpr):
        """float32 -> DTYPE, round to nearest even. bfloat16 is rounded with integer operations, which every Triton
        backend (the interpreter included) executes identically."""
        if DTYPE == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            bits = tl.where(y != y, 0x7FC0, bits)   # NaN stays NaN
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(DTYPE)

    @triton.jit
    def _fmix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _key(seed, index, STREAM: tl.constexpr):
        """zo._counter_key(seed, index, STREAM) (uint64): splitmix64 chained over the three words."""
        h = _fmix(seed + 0x9E3779B97F4A7C15)
        h = _fmix((h ^ index) + 0x9E3779B97F4A7C15)
        return _fmix((h ^ STREAM) + 0x9E3779B97F4A7C15)

    @triton.jit
    def _hash(key, i):
        """h(i) = splitmix64 output i+1 of seed `key` (uint64 arithmetic wraps)."""
        return _fmix((i + 1) * 0x9E3779B97F4A7C15 + key)

    @triton.jit
    def _quadrant(q, swap, r, sine, cosine):
        # cos(qπ/2 + πt'/2) from the sine / cosine of the reduced angle
        v = tl.where(((swap.to(tl.int32) ^ q) & 1) == 1, sine, cosine)
        return r * tl.where((((q + 1) >> 1) & 1) == 1, -v, v)

    @triton.jit
    def _noise(key, pairs, j, column, GAUSSIAN: tl.constexpr, LN2: tl.constexpr,
               L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
               S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr):
        """Elements j = 2·pairs + column (a [pairs, 2] block; pairs = program_id·P + [0, P)) of the counter stream
        `key` (uint64), float32: zo._box_muller_torch op by op, one hash and one Box–Muller transform per pair;
        Rademacher: one hash per 64 elements."""
        if GAUSSIAN:
            h = _hash(key, pairs.to(tl.uint64))
            m = ((h >> 40) + 1).to(tl.int32)
            k = ((h >> 16) & 0xFFFFFF).to(tl.int32)
            b = m.to(tl.float32).to(tl.int32, bitcast=True)
            mant = (b & 0x7FFFFF) | 0x3F800000
            big = (mant > 0x3FB504F3).to(tl.int32)
            e = (b >> 23) - 127 + big - 24
            f = (mant - (big << 23)).to(tl.float32, bitcast=True)
            s = tl.math.div_rn(f - 1.0, f + 1.0)
            ln_f = s * _horner(s * s, L0, L1, L2, L3, 0.0, 3)
            ln_u1 = e.to(tl.float32) * LN2
            ln_u1 = ln_u1 + ln_f
            r = tl.math.sqrt_rn(ln_u1 * -2.0)
            q = k >> 22
            jj = k & 0x3FFFFF
            swap = jj > 0x200000
            t = tl.where(swap, 0x400000 - jj, jj).to(tl.float32) * 2.384185791015625e-07   # 2^-22, exact
            t2 = t * t
            sine = _horner(t2, S0, S1, S2, S3, 0.0, 3) * t
            cosine = _horner(t2, K0, K1, K2, K3, K4, 4)
            even = _quadrant(q, swap, r, sine, cosine)
            odd = _quadrant((q + 3) & 3, swap, r, sine, cosine)
            return tl.where(column[None, :] == 0, even[:, None], odd[:, None])
        else:
            # element j = 2p + c is bit j mod 64 = 2(p mod 32) + c of h(j div 64) = h(p div 32).  The block's pairs
            # are program_id·P + [0, P) with P a multiple of 32, so its words are program_id·P/32 + [0, P/32):
            # one hash per 64 elements, broadcast to the pairs
            per_block: tl.constexpr = pairs.shape[0] // 32
            words = tl.program_id(0).to(tl.int64) * per_block + tl.arange(0, per_block)
            h = _hash(key, words.to(tl.uint64))
            shift = (tl.arange(0, 32)[:, None] * 2 + column[None, :]).to(tl.uint64)
            bits = tl.reshape((h[:, None, None] >> shift[None, :, :]) & 1, (pairs.shape[0], 2))
            return tl.where(bits == 1, -1.0, 1.0).to(tl.float32)

    @triton.jit
    def _adamu_direction(k0, k1, mom, pairs, j, column, sa, sb, b1, ob1, GAUSSIAN: tl.constexpr, LN2: tl.constexpr,
                         L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                         S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                         K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr):
        """(u, ż, z̈) of ZO-AdaMU: ż = √α·n1, z̈ = √(1-α)·n2 + m, u = β1·ż + (1-β1)·z̈ (zo.ZOAdaMU._chunk_dirs)."""
        zd = _noise(k0, pairs, j, column, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3, K0, K1, K2, K3, K4) * sa
        zdd = _noise(k1, pairs, j, column, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3, K0, K1, K2, K3, K4) * sb
        zdd = zdd + mom
        return zd * b1 + zdd * ob1, zd, zdd

    @triton.jit
    def _keys_kernel(seed_ptr, keys_ptr, count, BLOCK: tl.constexpr):
        """keys[i] = the counter keys of tensor i: (this step's stream 0, stream 1, the next step's stream 0, 1)."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = index < count
        for step in tl.static_range(2):
            seed = tl.load(seed_ptr + step).to(tl.uint64, bitcast=True)
            for stream in tl.static_range(2):
                key = _key(seed, index.to(tl.uint64), stream)
                tl.store(keys_ptr + index * 4 + (step * 2 + stream), key.to(tl.int64, bitcast=True), mask=inside)

    @triton.jit(do_not_specialize=["index"])
    def _sweep_kernel(x_ptr, stash_ptr, m_ptr, n, index, keys_ptr, amu_ptr, a, c, coef_ptr, sigma,
                      ADAMU: tl.constexpr, UPDATE: tl.constexpr, STASH: tl.constexpr, GAUSSIAN: tl.constexpr,
                      SIGNED: tl.constexpr, CARRY: tl.constexpr, LN2: tl.constexpr,
                      L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                      S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                      K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr,
                      PAIRS: tl.constexpr):
        pairs = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
        column = tl.arange(0, 2)
        j = pairs[:, None] * 2 + column[None, :]
        inside = j < n
        # the noise keys are read from the device (written once per step by _keys_kernel), so that one captured
        # CUDA graph of a sweep serves every step
        keys = keys_ptr + index * 4
        k0 = tl.load(keys).to(tl.uint64, bitcast=True)
        if ADAMU:
            mom = tl.load(m_ptr + j, mask=inside, other=0.0).to(tl.float32)
            sa, sb, b1, ob1 = tl.load(amu_ptr), tl.load(amu_ptr + 1), tl.load(amu_ptr + 2), tl.load(amu_ptr + 3)
            u, zd, zdd = _adamu_direction(k0, tl.load(keys + 1).to(tl.uint64, bitcast=True), mom, pairs, j, column,
                                          sa, sb, b1, ob1, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3,
                                          K0, K1, K2, K3, K4)
        else:
            u = _noise(k0, pairs, j, column, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3, K0, K1, K2, K3, K4)
        x = tl.load(x_ptr + j, mask=inside, other=0.0)
        if UPDATE:
            if ADAMU:
                v = (zd * zd) * tl.load(amu_ptr + 4) + (zdd * zdd) * tl.load(amu_ptr + 5)
                v = v + sigma
                w = tl.math.div_rn(u, tl.math.sqrt_rn(v))
            else:
                w = u
            if STASH:
                y = tl.load(stash_ptr + j, mask=inside, other=0.0).to(tl.float32)
            else:
                y = x.to(tl.float32) + u * c
            y = y * tl.load(coef_ptr + 1)
            y = y + w * tl.load(coef_ptr)
            x_new = _round_to(y, x_ptr.dtype.element_ty)
            if ADAMU:
                ok = tl.load(coef_ptr + 3) != 0
                if SIGNED:
                    new = u * tl.load(coef_ptr + 2)
                else:
                    new = u
                # a skipped step (non-finite g) keeps m: rewriting the loaded value is exact
                mom = tl.where(ok, _round_to(new, m_ptr.dtype.element_ty).to(tl.float32), mom)
                tl.store(m_ptr + j, _round_to(mom, m_ptr.dtype.element_ty), mask=inside)
            if CARRY:
                # the next step's first perturbation θ' + ε·u', applied to θ' as stored (rounded), so the result
                # equals an update sweep followed by a perturb sweep; the stash becomes θ'
                if STASH:
                    tl.store(stash_ptr + j, x_new, mask=inside)
                n0 = tl.load(keys + 2).to(tl.uint64, bitcast=True)
                if ADAMU:  # built from the momentum this update just stored
                    u_next, _, _ = _adamu_direction(n0, tl.load(keys + 3).to(tl.uint64, bitcast=True), mom, pairs,
                                                    j, column,
                                                    tl.load(amu_ptr + 6), tl.load(amu_ptr + 7), tl.load(amu_ptr + 8),
                                                    tl.load(amu_ptr + 9), GAUSSIAN, LN2, L0, L1, L2, L3,
                                                    S0, S1, S2, S3, K0, K1, K2, K3, K4)
                else:
                    u_next = _noise(n0, pairs, j, column, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3,
                                    K0, K1, K2, K3, K4)
                x_new = _round_to(x_new.to(tl.float32) + u_next * a, x_ptr.dtype.element_ty)
            tl.store(x_ptr + j, x_new, mask=inside)
        else:
            y = x.to(tl.float32) + u * a
            tl.store(x_ptr + j, _round_to(y, x_ptr.dtype.element_ty), mask=inside)


_CONSTANTS = dict(LN2=_LN2, L0=_LN[0], L1=_LN[1], L2=_LN[2], L3=_LN[3], S0=_SIN[0], S1=_SIN[1], S2=_SIN[2],
                  S3=_SIN[3], K0=_COS[0], K1=_COS[1], K2=_COS[2], K3=_COS[3], K4=_COS[4])


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def step_values(seed: int, next_seed: int = 0, amu=None, next_amu=None) -> tuple[list[int], list[float]]:
    """What the sweep kernels read from the device each step: the step seeds as signed 64-bit integers (this step's,
    the next step's for a carried update) and ZO-AdaMU's (√α, √(1-α), β1, 1-β1, β2, 1-β2) of this step followed by
    the first four of the next step (zeros where unused)."""
    amu = list(amu or (0.0,) * 6) + list((next_amu or (0.0,) * 4)[:4])
    return [_signed64(seed), _signed64(next_seed)], [float(x) for x in amu]


def fill_keys(seeds: torch.Tensor, keys: torch.Tensor) -> None:
    """keys (int64 [tensors, 4]) <- the counter keys zo._counter_key(seed, i, stream) of every tensor i for this
    step's and the next step's seed (int64 [2] on the same device), streams 0 and 1: one launch per step, so the
    sweeps only load their tensor's keys."""
    count = keys.shape[0]
    _keys_kernel[(triton.cdiv(count, 256),)](seeds, keys, count, BLOCK=256)


def step_tensors(device, seed: int, next_seed: int = 0, amu=None, next_amu=None,
                 tensors: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keys` (int64 [tensors, 4]) and `amu` (float32 [10]) of sweep() for one step, as fresh device tensors."""
    seeds, values = step_values(seed, next_seed, amu, next_amu)
    keys = torch.empty(tensors, 4, dtype=torch.int64, device=device)
    fill_keys(torch.tensor(seeds, dtype=torch.int64, device=device), keys)
    return keys, torch.tensor(values, dtype=torch.float32, device=device)


def sweep(flat: torch.Tensor, *, index: int, keys: torch.Tensor, gaussian: bool, perturb_scale: float = 0.0,
          update: bool = False, offset_scale: float = 0.0, coefficients: torch.Tensor | None = None,
          stash: torch.Tensor | None = None, momentum: torch.Tensor | None = None, amu: torch.Tensor | None = None,
          sigma: float = 0.0, signed: bool = True, carry: bool = False) -> None:
    """One sweep over the contiguous flat parameter `flat` (tensor number `index` of the optimizer), in place.

    keys, amu: the device tensors of step_tensors (amu only for ZO-AdaMU, whose momentum is given).
    perturb: flat += perturb_scale·u.  update: y = stash or flat + offset_scale·u; flat = y·decay + neg·w, and for
    ZO-AdaMU momentum = sign(g)·u (or u) where g is finite.  coefficients: float32 [4] on flat's device,
    (neg, decay, sgn, ok) = (-lr·g, 1-lr·λ, sign(g), 1 where g is finite else 0).
    carry (update only): then flat += perturb_scale·u' with the next step's direction u' (built from the updated
    momentum), and a stash takes the updated weights.
    Every per-step value is read from device memory, so the launches can be captured in a CUDA graph once and
    replayed for every later step.
    """
    n = flat.numel()
    if n == 0:
        return
    adamu = momentum is not None
    if adamu and amu is None:
        raise ValueError("ZO-AdaMU sweeps need the step's amu tensor")
    if carry and not update:
        raise ValueError("carry fuses the next perturbation into an update sweep: pass update=True")
    if update and coefficients is None:
        raise ValueError("an update sweep needs the step's coefficients")
    if not gaussian and PAIRS % 32:
        raise ValueError(f"zo_triton.PAIRS = {PAIRS}: Rademacher blocks hold whole 64-element hash words, so PAIRS "
                         "must be a multiple of 32")
    dummy = flat
    _sweep_kernel[(triton.cdiv(n, 2 * PAIRS),)](
        flat, stash if stash is not None else dummy, momentum if adamu else dummy, n, index, keys,
        amu if adamu else keys, float(perturb_scale), float(offset_scale),
        coefficients if coefficients is not None else dummy, float(sigma),
        ADAMU=adamu, UPDATE=update, STASH=stash is not None, GAUSSIAN=gaussian, SIGNED=signed,
        CARRY=bool(carry), PAIRS=PAIRS, num_warps=NUM_WARPS, enable_fp_fusion=False, **_CONSTANTS)
