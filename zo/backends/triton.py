"""CUDA sweeps: one fused Triton kernel per tensor and sweep, emitted from a rule's expression graph (zo.rule).

The counter noise of zo.noise is generated in registers and applied in one pass over each tensor (read θ once, write
it once; state buffers likewise).  Every operation is the one the torch path performs, in the same order, each rounded
once in float32 (fused multiply-add off, IEEE division and square root), so a CUDA run draws the same directions as a
CPU run from the same seed and the kernels equal the torch path bit for bit (tests/test_zo_triton.py).

The sweep kernel of a rule is written as Python source into the kernel cache and imported (triton.jit reads the source
of what it compiles).  Scalars that change every step (the step seeds and the counter keys derived from them, the step
values, the update values, 1-lr·λ, whether g is finite) are read from device tensors that `DeviceSweeps` keeps at
fixed addresses: no host synchronisation, and one CUDA graph of a sweep's launches serves every step
(`DeviceSweeps.replay`).

Used only when Triton imports and a CUDA tensor is float32/bfloat16/float16; everything else takes the torch path.
With `TRITON_INTERPRET=1` set before the import and `allow_cpu = True`, the kernels run on CPU tensors in Triton's
interpreter: that is how the tests check them without a GPU.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from zo import noise as zo_noise
from zo import rule as zo_rule

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the C kernels and the torch path cover everything
    triton = tl = None

logger = logging.getLogger(__name__)

# Launch shape: Box–Muller pairs per program and warps per program (bench/zo_sweep.py measures the alternatives).
PAIRS = 512  # a multiple of 32: a block holds whole 64-element words of the Rademacher noise
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this (with TRITON_INTERPRET=1 before the import) to run the kernels on CPU tensors in Triton's interpreter.
allow_cpu = False
_CONSTANTS = dict(LN2=zo_noise.LN2, L0=zo_noise.LN[0], L1=zo_noise.LN[1], L2=zo_noise.LN[2], L3=zo_noise.LN[3],
                  S0=zo_noise.SIN[0], S1=zo_noise.SIN[1], S2=zo_noise.SIN[2], S3=zo_noise.SIN[3], K0=zo_noise.COS[0],
                  K1=zo_noise.COS[1], K2=zo_noise.COS[2], K3=zo_noise.COS[3], K4=zo_noise.COS[4])


def available() -> bool:
    return triton is not None


def supports(p: torch.Tensor, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels handle this parameter (and state dtype) where it lives."""
    if triton is None or p.dtype not in _DTYPES or (state_dtype is not None and state_dtype not in _DTYPES):
        return False
    return p.device.type == "cuda" or (p.device.type == "cpu" and allow_cpu)


if triton is not None:
    @triton.jit
    def _horner(x, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
                C4: tl.constexpr, DEGREE: tl.constexpr):
        # c0 + x(c1 + x(c2 + ...)), one rounding per operation, in zo_noise's order
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
    def _sround(y, r, DTYPE: tl.constexpr):
        """float32 y rounded stochastically to DTYPE with the element's 32 random bits r (uint32) and widened back:
        zo_noise.stochastic_round step by step, in integer operations and exact float32 ones."""
        u = y.to(tl.uint32, bitcast=True)
        if DTYPE == tl.bfloat16:
            bits = tl.where(y != y, 0x7FC0, (u + (r >> 16)) >> 16)   # NaN stays NaN
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True).to(tl.float32)
        elif DTYPE == tl.float16:
            sign = u & 0x80000000
            x = u ^ sign
            special = tl.where(x > 0x7F800000, 0x7E00, 0x7C00)
            normal = (x - 0x38000000 + (r >> 19)) >> 13          # rebias the exponent, 13 random bits, cut
            w = tl.where(x < 0x38800000, x, 0).to(tl.float32, bitcast=True) * 16777216.0   # subnormal: exact
            whole = w.to(tl.int32)
            up = ((r >> 8) ^ 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08 < w - whole.to(tl.float32)
            sub = whole.to(tl.uint32) + up.to(tl.uint32)
            bits = tl.where(x >= 0x47800000, special, tl.where(x < 0x38800000, sub, normal)) | (sign >> 16)
            return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            return y

    @triton.jit
    def _fmix(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    @triton.jit
    def _key(seed, index, stream):
        """zo_noise.counter_key(seed, index, stream) (uint64): splitmix64 chained over the three words."""
        h = _fmix(seed + 0x9E3779B97F4A7C15)
        h = _fmix((h ^ index) + 0x9E3779B97F4A7C15)
        return _fmix((h ^ stream) + 0x9E3779B97F4A7C15)

    @triton.jit
    def _hash(key, i):
        """h(i) = splitmix64 output i+1 of seed `key` (uint64 arithmetic wraps)."""
        return _fmix((i + 1) * 0x9E3779B97F4A7C15 + key)

    @triton.jit
    def _rounding_bits(seed_ptr, index, pairs, column, STREAM: tl.constexpr):
        """The 32 random bits of each element of a [pairs, 2] block (zo_noise.rounding_bits): the low half of the
        pair's hash for column 0, the high half for column 1, from this step's seed (seed_ptr[0])."""
        seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
        key = _key(seed, index.to(tl.uint64), tl.full((), STREAM, tl.uint64))
        h = _hash(key, pairs.to(tl.uint64))
        return tl.where(column[None, :] == 0, (h & 0xFFFFFFFF)[:, None], (h >> 32)[:, None]).to(tl.uint32)

    @triton.jit
    def _quadrant(q, swap, r, sine, cosine):
        # cos(qπ/2 + πt'/2) from the sine / cosine of the reduced angle
        v = tl.where(((swap.to(tl.int32) ^ q) & 1) == 1, sine, cosine)
        return r * tl.where((((q + 1) >> 1) & 1) == 1, -v, v)

    @triton.jit
    def _noise(key, pairs, word0, column, GAUSSIAN: tl.constexpr, LN2: tl.constexpr,
               L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
               S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
               K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr):
        """Elements 2·pairs + column (a [pairs, 2] block of consecutive pairs starting at a multiple of 32) of the
        counter stream `key` (uint64), float32: zo_noise.box_muller op by op, one hash and one Box–Muller transform
        per pair; Rademacher: one hash per 64 elements (word0 = the block's first word)."""
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
            # element j = 2p + c is bit j mod 64 = 2(p mod 32) + c of h(j div 64) = h(p div 32): one hash per
            # 64 elements, broadcast to the block's pairs
            per_block: tl.constexpr = pairs.shape[0] // 32
            h = _hash(key, (word0 + tl.arange(0, per_block)).to(tl.uint64))
            shift = (tl.arange(0, 32)[:, None] * 2 + column[None, :]).to(tl.uint64)
            bits = tl.reshape((h[:, None, None] >> shift[None, :, :]) & 1, (pairs.shape[0], 2))
            return tl.where(bits == 1, -1.0, 1.0).to(tl.float32)

    @triton.jit
    def _keys_kernel(seed_ptr, keys_ptr, count, STREAMS: tl.constexpr, BLOCK: tl.constexpr):
        """keys[i, step·STREAMS + s] = the counter key of tensor i, stream s, for this step (0) and the next (1)."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = index < count
        for step in tl.static_range(2):
            seed = tl.load(seed_ptr + step).to(tl.uint64, bitcast=True)
            for stream in tl.static_range(STREAMS):
                key = _key(seed, index.to(tl.uint64), stream)
                tl.store(keys_ptr + index * (2 * STREAMS) + (step * STREAMS + stream), key.to(tl.int64, bitcast=True),
                         mask=inside)


def fill_keys(seeds: torch.Tensor, keys: torch.Tensor) -> None:
    """keys (int64 [tensors, 2·streams]) <- the counter keys of every tensor for this step's and the next step's seed
    (int64 [2] on the same device): one launch per step, so the sweeps only load their tensor's keys."""
    count, streams = keys.shape[0], keys.shape[1] // 2
    _keys_kernel[(triton.cdiv(count, 256),)](seeds, keys, count, STREAMS=streams, BLOCK=256)


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ------------------------------------------------------------------------------------------ emission
_HEADER = '''# generated by zo.backends.triton from a zo.rule trace: do not edit (the cache name: the hash of this text)
import triton
import triton.language as tl
from zo.backends.triton import _noise, _round_to{imports}


@triton.jit(do_not_specialize=["index", "pos"])
def sweep_kernel(x_ptr, stash_ptr, {buffers}n, pos, index, keys_ptr, step_ptr, coef_ptr, a, c, {extra}
                 STREAMS: tl.constexpr, GAUSSIAN: tl.constexpr, PAIRS: tl.constexpr,
                 LN2: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                 S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, K0: tl.constexpr,
                 K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, K4: tl.constexpr):
    # the blocks cover whole pairs from a multiple of PAIRS, so a tensor (or shard) may start at any noise position
    first = (pos // 2) // PAIRS * PAIRS
    start = first + tl.program_id(0).to(tl.int64) * PAIRS
    pairs = start + tl.arange(0, PAIRS)
    word0 = start // 32
    column = tl.arange(0, 2)
    local = pairs[:, None] * 2 + column[None, :] - pos
    inside = (local >= 0) & (local < n)
    keys = keys_ptr + index * (2 * STREAMS)
'''


def _emit(graph, outputs, streams, buffers, step_values, update_values) -> str:
    lines, names = [], {}
    buffer_ptr = {name: f"b{i}_ptr" for i, name in enumerate(buffers)}
    consts = "GAUSSIAN, LN2, L0, L1, L2, L3, S0, S1, S2, S3, K0, K1, K2, K3, K4"
    for node in graph.order(outputs.values()):
        op, args, attr = graph.nodes[node]
        a = [names[i] for i in args]
        if op == "leaf":
            role, name, step = attr
            if role == "x" or role == "stash":
                expr = f"tl.load({role}_ptr + local, mask=inside, other=0.0).to(tl.float32)"
            elif role == "state":
                expr = f"tl.load({buffer_ptr[name]} + local, mask=inside, other=0.0).to(tl.float32)"
            elif role == "bits":
                expr = f"_rounding_bits(seed_ptr, index, pairs, column, {zo_noise.ROUNDING_STREAM})"
            elif role == "noise":
                key = f"tl.load(keys + {step * len(streams) + streams.index(name)}).to(tl.uint64, bitcast=True)"
                expr = f"_noise({key}, pairs, word0, column, {consts})"
            elif name == "perturb_scale":
                expr = "a"
            elif name == "restore_scale":
                expr = "c"
            elif name in step_values:
                expr = f"tl.load(step_ptr + {step * max(1, len(step_values)) + step_values.index(name)})"
            elif name in update_values:
                expr = f"tl.load(coef_ptr + {update_values.index(name)})"
            elif name == "decay":
                expr = f"tl.load(coef_ptr + {len(update_values)})"
            else:  # ok
                expr = f"tl.load(coef_ptr + {len(update_values) + 1}) != 0"
        elif op == "const":
            value = float(np.float32(graph.const_value(attr)))  # the float32 constant, exactly as the torch path
            if not math.isfinite(value):
                raise ValueError(f"the Triton emitter takes finite constants only, got {value}")
            expr = repr(value)
        elif op in ("add", "sub", "mul", "lt", "le", "gt", "ge"):
            expr = f"{a[0]} {dict(add='+', sub='-', mul='*', lt='<', le='<=', gt='>', ge='>=')[op]} {a[1]}"
        elif op == "div":
            expr = f"tl.math.div_rn({a[0]}, {a[1]})"
        elif op == "neg":
            expr = f"-{a[0]}"
        elif op == "sqrt":
            expr = f"tl.math.sqrt_rn({a[0]})"
        elif op == "abs":
            expr = f"tl.abs({a[0]})"
        elif op == "where":
            expr = f"tl.where({a[0]}, {a[1]}, {a[2]})"
        elif op == "round":
            ptr = "x_ptr" if attr == "x" else buffer_ptr[attr]
            expr = f"_round_to({a[0]}, {ptr}.dtype.element_ty).to(tl.float32)"
        elif op == "sround":
            expr = f"_sround({a[0]}, {a[1]}, x_ptr.dtype.element_ty)"
        else:
            raise ValueError(f"the Triton emitter has no operation {op!r}")
        names[node] = f"v{node}"
        lines.append(f"v{node} = {expr}")
    for out, value in outputs.items():
        if out == "rounded_away":
            # a histogram (a builtin: tl.sum is a jitted function, which Triton's interpreter cannot call when
            # triton was imported before TRITON_INTERPRET was set) of the block, then two atomic additions per
            # program: count_ptr[1] += elements rounded away (count_ptr[0] += the others)
            flat = f"tl.reshape(tl.where({names[value.node]} != 0, 1, 0), (2 * PAIRS,))"
            lines.append(f"tl.atomic_add(count_ptr + tl.arange(0, 2), tl.histogram({flat}, 2, "
                         "mask=tl.reshape(inside, (2 * PAIRS,))).to(tl.int64))")
            continue
        ptr = {"x": "x_ptr", "stash": "stash_ptr"}.get(out) or buffer_ptr[out]
        target = "x_ptr" if out == "stash" else ptr   # the stash holds weights: x's dtype
        lines.append(f"tl.store({ptr} + local, _round_to({names[value.node]}, {target}.dtype.element_ty), "
                     "mask=inside)")
    body = "".join(f"    {line}\n" for line in lines)
    stochastic = any(graph.nodes[n][0] == "sround" for n in names)
    extra = "seed_ptr, " * stochastic + "count_ptr, " * ("rounded_away" in outputs)
    return _HEADER.format(buffers="".join(f"{p}, " for p in buffer_ptr.values()), extra=extra,
                          imports=", _rounding_bits, _sround" * stochastic) + body


def _cache_dir() -> Path:
    base = os.environ.get("ZO_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "zo-adamu", "kernels")
    return Path(base).expanduser()


_GENERATED: dict[tuple, object] = {}


def _kernel(spec, kind, carry, stochastic=False, count=False):
    """The jitted sweep kernel of (a zo.rule.SweepSpec, sweep kind, carry, stochastic rounding, rounded-away count),
    generated on first use."""
    key = (spec, kind, carry, stochastic, count)
    if key not in _GENERATED:
        graph, outputs, _ = zo_rule.trace(kind, spec.rule, spec.streams, spec.buffers, spec.scalars, carry=carry,
                                          stochastic=stochastic, count=count)
        source = _emit(graph, outputs, spec.streams, spec.buffers, spec.step_values, spec.update_values)
        digest = hashlib.sha256(source.encode()).hexdigest()[:20]
        path = None
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"zo-adamu-kernels-{os.getuid()}"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"zo_triton_{digest}.py"
                if not path.is_file() or path.read_text() != source:
                    tmp = folder / f".{path.name}.{os.getpid()}"
                    tmp.write_text(source)
                    os.replace(tmp, path)  # atomic: concurrent writers agree on the content
                break
            except OSError:
                path = None
        if path is None:
            raise RuntimeError(f"no writable kernel cache for the generated Triton source (tried {_cache_dir()})")
        found = importlib.util.spec_from_file_location(f"zo_triton_generated_{digest}", path)
        module = importlib.util.module_from_spec(found)
        found.loader.exec_module(module)
        _GENERATED[key] = module.sweep_kernel
    return _GENERATED[key]


# ------------------------------------------------------------------------------------------ device state
class DeviceSweeps:
    """The fused sweeps of one rule on one device: the per-step inputs the kernels read (at fixed addresses), the
    launches, and the captured CUDA graphs."""

    def __init__(self, device, spec, *, tensors: int, groups: int):
        self.device = torch.device(device)
        self.spec = spec
        self.streams, self.buffers = tuple(spec.streams), tuple(spec.buffers)
        self.step_values, self.update_values = tuple(spec.step_values), tuple(spec.update_values)
        self.seeds = torch.zeros(2, dtype=torch.int64, device=device)
        self.keys = torch.zeros(tensors, 2 * max(1, len(self.streams)), dtype=torch.int64, device=device)
        self.values = torch.zeros(2, max(1, len(self.step_values)), dtype=torch.float32, device=device)
        self.coef = torch.zeros(groups, len(self.update_values) + 2, dtype=torch.float32, device=device)
        # updates of 16-bit weights, added by the kernels: [not rounded away, rounded away]
        self.away = torch.zeros(2, dtype=torch.int64, device=device)
        self._loaded = None
        self.graphs: dict[tuple, object] = {}   # sweep key -> "seen" (ran once, eagerly) or (CUDA graph, value)
        self._graph_layout = None
        self.enabled = True                      # False after a failed capture: eager launches from then on

    def load(self, seed: int, values: dict, next_seed: int, next_values: dict | None, groups: list | None):
        """Write this step's seeds (and keys), step values and, for an update, each group's update values (plus
        1-lr·λ and whether g is finite) where the kernels read them: copies without synchronisation, skipped when
        nothing changed."""
        row = [float(values[n]) for n in self.step_values] or [0.0]
        nxt = [float(next_values[n]) for n in self.step_values] if next_values else [0.0] * len(row)
        now = (seed, next_seed, tuple(row), tuple(nxt))
        if now != self._loaded:
            self.seeds.copy_(_staged([_signed64(seed), _signed64(next_seed)], torch.int64, self.device),
                             non_blocking=True)
            self.values.copy_(_staged([row, nxt], torch.float32, self.device), non_blocking=True)
            fill_keys(self.seeds, self.keys)
            self._loaded = now
        if groups is not None:
            for target, g in zip(self.coef, groups):
                ok = g["ok"]
                parts = [torch.as_tensor(g[n], dtype=torch.float64) for n in self.update_values]
                parts = [t.to(ok.device) for t in parts] + [torch.full((), g["decay"], dtype=torch.float64,
                                                                       device=ok.device), ok.to(torch.float64)]
                target.copy_(torch.stack(parts))   # each rounded once to float32

    def sweep(self, kind, flat, *, index, group_index, gaussian, perturb_scale, restore_scale, stash, buffers,
              carry, pos=0, stochastic=False, count=False):
        """One sweep of the contiguous flat tensor `flat` (tensor number `index`, noise positions pos ..); an update
        may round stochastically (16-bit weights) and add what rounded away to `self.away`."""
        n = flat.numel()
        if n == 0:
            return
        if not gaussian and PAIRS % 32:
            raise ValueError(f"zo.backends.triton.PAIRS = {PAIRS}: Rademacher blocks hold whole 64-element hash words, "
                             "so PAIRS must be a multiple of 32")
        kernel = _kernel(self.spec, kind, carry, stochastic, count)
        first = (pos // 2) // PAIRS * PAIRS
        grid = (triton.cdiv(pos + n - 2 * first, 2 * PAIRS),)
        extra = [self.seeds] * stochastic + [self.away] * count
        kernel[grid](flat, stash if stash is not None else flat, *buffers, n, pos, index, self.keys, self.values,
                     self.coef[group_index], float(perturb_scale), float(restore_scale), *extra,
                     STREAMS=max(1, len(self.streams)), GAUSSIAN=gaussian,
                     PAIRS=PAIRS, num_warps=NUM_WARPS, enable_fp_fusion=False, **_CONSTANTS)

    def replay(self, key, layout, capture, tensors):
        """Run a sweep as a CUDA graph of its launches, if possible: None means run it eagerly.

        Each distinct sweep runs eagerly once (which also compiles the kernels), is captured the second time by
        calling `capture()`, whose result is kept, and is replayed from then on (one graph launch instead of one
        launch per tensor); the kept result is returned.  A new `layout` (tensors moved, frozen, state replaced)
        drops every captured graph: they hold raw pointers."""
        if not self.enabled or torch.cuda.is_current_stream_capturing():
            return None
        if layout != self._graph_layout:
            self.graphs.clear()
            self._graph_layout = layout
        entry = self.graphs.get(key)
        if entry is None:
            self.graphs[key] = "seen"
            return None
        if entry == "seen":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    result = capture()
            except Exception as err:  # never fail a run over an optimisation: fall back to eager launches
                logger.warning("CUDA graph capture of a ZO sweep failed (%s); sweeping with eager launches", err)
                self.enabled = False
                self.graphs.clear()
                return None
            entry = self.graphs[key] = (graph, result)
        graph, result = entry
        graph.replay()
        torch.autograd.graph.increment_version(list(tensors))
        return result


def _staged(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` in host memory a non-blocking copy to `device` can read without synchronising: pinned for CUDA
    (torch's pinned-memory cache keeps the block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" else host
