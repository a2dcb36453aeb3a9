"""The ZO sweeps as fused Triton kernels, for CUDA tensors: the counter-based noise of `zo` generated in registers and
applied in one pass over each tensor (read θ once, write it once; ZO-AdaMU also reads and writes its momentum).

Every operation is the one `zo.ZOOptimizer._generic` performs on the torch path, in the same order, each rounded once
in float32 (fused multiply-add off, IEEE division and square root), so a CUDA run draws the same directions as a CPU
run from the same seed and the kernels equal the torch path bit for bit (tests/test_zo_triton.py). Scalars that change
every step (-lr·g, 1-lr·λ, sign(g), whether g is finite) are read from device tensors: no host synchronisation.

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
PAIRS = 512
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
    def _hash(key, i):
        """h(i) = splitmix64 output i+1 of seed `key` (uint64 arithmetic wraps)."""
        z = (i + 1) * 0x9E3779B97F4A7C15 + key
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

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
        """Elements j = 2·pairs + column (a [pairs, 2] block) of the counter stream `key` (uint64), float32:
        zo._box_muller_torch op by op, one hash and one Box–Muller transform per pair."""
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
            h = _hash(key, j.to(tl.uint64))
            return tl.where((h >> 63) == 1, -1.0, 1.0).to(tl.float32)

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

    @triton.jit(do_not_specialize=["key0", "key1", "next0", "next1"])
    def _sweep_kernel(x_ptr, stash_ptr, m_ptr, n, key0, key1, a, c, neg_ptr, decay_ptr, sgn_ptr, ok_ptr,
                      sa, sb, b1, ob1, b2, ob2, sigma, next0, next1, nsa, nsb, nb1, nob1,
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
        k0 = key0.to(tl.int64).to(tl.uint64, bitcast=True)
        if ADAMU:
            mom = tl.load(m_ptr + j, mask=inside, other=0.0).to(tl.float32)
            u, zd, zdd = _adamu_direction(k0, key1.to(tl.int64).to(tl.uint64, bitcast=True), mom, pairs, j, column,
                                          sa, sb, b1, ob1, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3,
                                          K0, K1, K2, K3, K4)
        else:
            u = _noise(k0, pairs, j, column, GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3, K0, K1, K2, K3, K4)
        x = tl.load(x_ptr + j, mask=inside, other=0.0)
        if UPDATE:
            if ADAMU:
                v = (zd * zd) * b2 + (zdd * zdd) * ob2
                v = v + sigma
                w = tl.math.div_rn(u, tl.math.sqrt_rn(v))
            else:
                w = u
            if STASH:
                y = tl.load(stash_ptr + j, mask=inside, other=0.0).to(tl.float32)
            else:
                y = x.to(tl.float32) + u * c
            y = y * tl.load(decay_ptr)
            y = y + w * tl.load(neg_ptr)
            x_new = _round_to(y, x_ptr.dtype.element_ty)
            if ADAMU:
                ok = tl.load(ok_ptr) != 0
                if SIGNED:
                    new = u * tl.load(sgn_ptr)
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
                n0 = next0.to(tl.int64).to(tl.uint64, bitcast=True)
                if ADAMU:  # built from the momentum this update just stored
                    u_next, _, _ = _adamu_direction(n0, next1.to(tl.int64).to(tl.uint64, bitcast=True), mom, pairs,
                                                    j, column, nsa, nsb, nb1, nob1, GAUSSIAN, LN2, L0, L1, L2, L3,
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


def _signed64(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def sweep(flat: torch.Tensor, *, keys: tuple[int, int], gaussian: bool, perturb_scale: float = 0.0,
          update: bool = False, offset_scale: float = 0.0, coefficients=None, stash: torch.Tensor | None = None,
          momentum: torch.Tensor | None = None, amu: tuple | None = None, sigma: float = 0.0,
          signed: bool = True, carry: tuple | None = None) -> None:
    """One sweep over the contiguous flat parameter `flat`, in place.

    perturb: flat += perturb_scale·u.  update: y = stash or flat + offset_scale·u; flat = y·decay + neg·w, and for
    ZO-AdaMU (momentum given) momentum = sign(g)·u (or u) where g is finite. coefficients = (neg, decay, sgn, ok),
    0-dim float32/bool tensors on flat's device; amu = (√α, √(1-α), β1, 1-β1, β2, 1-β2).
    carry = (next keys, next amu or None, ε), update only: then flat += ε·u' with the next step's direction u'
    (built from the updated momentum), and a stash takes the updated weights.
    """
    n = flat.numel()
    if n == 0:
        return
    adamu = momentum is not None
    dummy = flat
    if coefficients is None:
        neg = decay = sgn = ok = dummy
    else:
        neg, decay, sgn, ok = coefficients
    sa, sb, b1, ob1, b2, ob2 = amu if adamu else (0.0,) * 6
    if carry is not None:
        if not update:
            raise ValueError("carry fuses the next perturbation into an update sweep: pass update=True")
        next_keys, next_amu, perturb_scale = carry
        nsa, nsb, nb1, nob1 = next_amu[:4] if adamu else (0.0,) * 4
    else:
        next_keys, nsa, nsb, nb1, nob1 = (0, 0), 0.0, 0.0, 0.0, 0.0
    _sweep_kernel[(triton.cdiv(n, 2 * PAIRS),)](
        flat, stash if stash is not None else dummy, momentum if adamu else dummy, n,
        _signed64(keys[0]), _signed64(keys[1]), float(perturb_scale), float(offset_scale), neg, decay, sgn, ok,
        float(sa), float(sb), float(b1), float(ob1), float(b2), float(ob2), float(sigma),
        _signed64(next_keys[0]), _signed64(next_keys[1]), float(nsa), float(nsb), float(nb1), float(nob1),
        ADAMU=adamu, UPDATE=update, STASH=stash is not None, GAUSSIAN=gaussian, SIGNED=signed,
        CARRY=carry is not None, PAIRS=PAIRS, num_warps=NUM_WARPS, enable_fp_fusion=False, **_CONSTANTS)
