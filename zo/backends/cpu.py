"""CPU sweeps: C kernels emitted from a rule's expression graph, compiled once with the system C compiler.

For each rule (zo.rule) this module traces the three sweep kinds, keeps what each output needs, and writes one C
function per (sweep kind, parameter dtype, state dtype, noise mode): the counter noise of zo.noise generated in
registers (cpu_prelude.c), the rule's arithmetic one statement per graph node, no temporaries, one pass over memory.
Each statement is one IEEE-754 operation in the compute dtype (-ffp-contract=off: no fused multiply-add; sqrt is the
correctly rounded instruction), in the order of the torch evaluation, so the kernels equal the torch path bit for bit.

The library of a rule is compiled once per process and cached on disk under the hash of its source
($ZO_KERNEL_CACHE, else ~/.cache/zo-adamu/kernels, else a temp folder); `BUILDS` records each build and its seconds.
A library is checked against zo.noise's torch definition when it loads.  Without a C compiler, with
ZO_NO_CKERNEL=1, or for dtypes without kernels, callers take the torch path, which computes the same numbers.

Where a sweep's noise comes from (`job(noise_source=...)`): "draw" generates it (Gaussian or Rademacher, as
`direction` says), "draw_and_keep" also writes it to float32 buffers (the first sweep of a step with a kept
direction), "kept" reads those buffers.  Each (direction, source) is one C function, named by a short suffix.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from zo import noise as zo_noise
from zo import rule as zo_rule

__all__ = ["available", "error", "fill", "convert", "kernels_for", "Kernels", "run", "BUILDS", "NOISE_SOURCES",
           "STATE_DTYPES"]

logger = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
_C_TYPE = {"f32": "float", "f64": "double", "bf16": "uint16_t", "f16": "uint16_t"}
_LOAD = {"f32": "{}", "f64": "{}", "bf16": "zo_bf2f({})", "f16": "zo_h2f({})"}
_STORE = {"f32": "{}", "f64": "{}", "bf16": "zo_f2bf({})", "f16": "zo_f2h({})"}
# parameter dtype -> state dtypes with kernels; the compute dtype is float64 for float64 weights, else float32 (16-bit
# weights and state are widened exactly and rounded once when stored, as the torch path's copy_)
STATE_DTYPES = {"f32": ("f32", "bf16", "f16"), "f64": ("f64",), "bf16": ("bf16", "f32", "f16"),
                "f16": ("f16", "f32", "bf16")}
_COMPUTE = {"f32": "float", "f64": "double", "bf16": "float", "f16": "float"}
# stochastic rounding of an updated 16-bit weight (zo_noise.stochastic_round), back to float32: exact
_SROUND = {"bf16": "zo_bf2f(zo_sr_bf16({}, {}))", "f16": "zo_h2f(zo_sr_f16({}, {}))"}
_HALF = ("bf16", "f16")
NOISE_SOURCES = ("draw", "draw_and_keep", "kept")
# (direction, noise source) -> the suffix of its C functions; an update never keeps (its noise is the step's last use)
_SUFFIX = {("gaussian", "draw"): "g", ("rademacher", "draw"): "r", ("gaussian", "draw_and_keep"): "gs",
           ("rademacher", "draw_and_keep"): "rs", ("gaussian", "kept"): "k", ("rademacher", "kept"): "k"}
_SUFFIXES = {"perturb": ("g", "r", "gs", "rs", "k"), "update": ("g", "r", "k"), "update_stash": ("g", "r", "k")}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=gnu11")
_PRELUDE = Path(__file__).with_name("cpu_prelude.c")

BUILDS: list[dict] = []   # {"library", "seconds", "cached"} of every library loaded in this process


def _constants() -> str:
    names = dict(ZO_LN0=zo_noise.LN[0], ZO_LN1=zo_noise.LN[1], ZO_LN2=zo_noise.LN[2], ZO_LN3=zo_noise.LN[3],
                 ZO_LNTWO=zo_noise.LN2, ZO_SN0=zo_noise.SIN[0], ZO_SN1=zo_noise.SIN[1], ZO_SN2=zo_noise.SIN[2],
                 ZO_SN3=zo_noise.SIN[3], ZO_CS0=zo_noise.COS[0], ZO_CS1=zo_noise.COS[1], ZO_CS2=zo_noise.COS[2],
                 ZO_CS3=zo_noise.COS[3], ZO_CS4=zo_noise.COS[4])
    return "".join(f"#define {k} ({float(v).hex()}f)\n" for k, v in names.items())


# ------------------------------------------------------------------------------------------ emission
def _emit(fname: str, graph, outputs: dict, leaves: dict, tn: str, mn: str, mode: str, streams, buffers,
          scalars) -> str:
    """One C sweep function: `fname(ptrs, n, pos, keys, vals)` with ptrs = [x, stash, buffers..., kept noise...,
    rounded-away count] (chunk pointers; the count an int64 the sweep adds to, for an update of 16-bit weights),
    pos = the noise position of the chunk's first element, keys = the streams' counter keys (then the rounding
    bits' key, for a stochastic update), vals = the scalars in the order of `scalars`."""
    T, X, M = _COMPUTE[tn], _C_TYPE[tn], _C_TYPE[mn]
    storage = {"x": tn, **{b: mn for b in buffers}}
    names = {}
    lines = []
    for node in graph.order(outputs.values()):
        op, args, attr = graph.nodes[node]
        a = [names[i] for i in args]
        if op == "leaf":
            role, name, step = attr
            if step:
                raise ValueError("the CPU kernels apply a carried perturbation as a second sweep, not fused")
            if role == "scalar":
                # ok is a loop constant of the body: a select on a run-time int made the update sweeps twice as
                # slow (gcc 12, AVX2), so each loop below is compiled for one value of it
                names[node] = "OK" if name == "ok" else f"s{scalars.index(name)}"
                continue
            expr = {"x": lambda: _LOAD[tn].format("x[J]"), "stash": lambda: _LOAD[tn].format("src[J]"),
                    "state": lambda: _LOAD[mn].format(f"m{buffers.index(name)}[J]"),
                    "noise": lambda: (f"({T})nz{streams.index(name)}[J]" if mode == "k"
                                      else f"({T})z{streams.index(name)}[S]"),
                    "bits": lambda: "zo_rbits(kr, (uint64_t)(pos + (J)))"}[role]()
        elif op == "const":
            expr = f"(({T}){graph.const_value(attr).hex()})" if graph.const_value(attr) == graph.const_value(attr) \
                else f"(({T})NAN)"
        elif op in _BINARY:
            expr = f"{a[0]} {_BINARY[op]} {a[1]}"
        elif op == "neg":
            expr = f"-{a[0]}"
        elif op == "sqrt":
            expr = f"{'sqrtf' if T == 'float' else 'sqrt'}({a[0]})"
        elif op == "abs":
            expr = f"{'fabsf' if T == 'float' else 'fabs'}({a[0]})"
        elif op == "where":
            expr = f"{a[0]} ? {a[1]} : {a[2]}"
        elif op == "round":
            dt = storage[attr]
            expr = a[0] if dt not in _HALF else _LOAD[dt].format(_STORE[dt].format(a[0]))
        elif op == "sround":
            expr = _SROUND[storage[attr]].format(*a) if storage[attr] in _HALF else a[0]
        else:
            raise ValueError(f"the C emitter has no operation {op!r}")
        names[node] = f"v{node}"
        lines.append(f"{dict(bool='int', bits='uint32_t').get(graph.kinds[node], T)} v{node} = {expr};")
    for out, value in outputs.items():
        if out == "rounded_away":
            lines.append(f"away_ += {names[value.node]} != 0;")
            continue
        target = "x[J]" if out == "x" else f"m{buffers.index(out)}[J]"
        lines.append(f"{target} = {(_STORE[tn] if out == 'x' else _STORE[mn]).format(names[value.node])};")
    if mode in ("gs", "rs"):  # keep every stream for the later sweeps of the step
        lines += [f"nz{i}[J] = z{i}[S];" for i in range(len(streams))]
    body = " \\\n    ".join(lines)
    gen = "zo_gauss2" if mode[0] == "g" else "zo_rad2"
    draw = " ".join(f"float z{i}[2]; {gen}(k{i}, p, z{i});" for i in range(len(streams)))
    counting, stochastic = "rounded_away" in outputs, any(r.role == "bits" for r in leaves.values())
    params = ([f"{X}* restrict x", f"const {X}* restrict src"] + [f"{M}* restrict m{i}" for i in range(len(buffers))]
              + [f"float* restrict nz{i}" for i in range(len(streams))] + ["int64_t n", "int64_t pos"]
              + [f"uint64_t k{i}" for i in range(len(streams))] + ["uint64_t kr"] * stochastic
              + ["int64_t* restrict count"] * counting
              + [("int " if s == "ok" else f"{T} ") + f"s{i}" for i, s in enumerate(scalars)])
    casts = ([f"({X}*)(uintptr_t)ptrs[0]", f"(const {X}*)(uintptr_t)ptrs[1]"]
             + [f"({M}*)(uintptr_t)ptrs[{2 + i}]" for i in range(len(buffers))]
             + [f"(float*)(uintptr_t)ptrs[{2 + len(buffers) + i}]" for i in range(len(streams))] + ["n", "pos"]
             + [f"keys[{i}]" for i in range(len(streams))] + [f"keys[{len(streams)}]"] * stochastic
             + [f"(int64_t*)(uintptr_t)ptrs[{2 + len(buffers) + len(streams)}]"] * counting
             + [("vals[%d] != 0.0" % i) if s == "ok" else f"({T})vals[{i}]" for i, s in enumerate(scalars)])
    ok = f"s{scalars.index('ok')}"

    def one_loop(value):
        if mode == "k":
            return f"for (int64_t j_ = 0; j_ < n; j_++) BODY{value}(j_, 0)"
        return f"ZO_PAIR_LOOP(GEN, BODY{value});"
    # a perturb sweep does not read ok: one loop (a second copy would only double the compile time)
    loop = f"if ({ok}) {one_loop(1)}\n    else {one_loop(0)}" if "OK" in names.values() else one_loop(1)
    if mode != "k":
        loop = f"#define GEN(p) {draw}\n    {loop}\n#undef GEN"
    if counting:   # a local sum the loops can vectorise, added to the job's count once
        loop = f"int64_t away_ = 0;\n    {loop}\n    *count += away_;"
    return (f"#define BODY(J, S, OK) {{ \\\n    {body} }}\n#define BODY1(J, S) BODY(J, S, 1)\n"
            f"#define BODY0(J, S) BODY(J, S, 0)\n"
            f"static void {fname}_body({', '.join(params)}) {{\n    (void)src; (void)pos; (void){ok};\n    {loop}\n}}\n"
            "#undef BODY\n#undef BODY0\n#undef BODY1\n"
            f"void {fname}(const uint64_t* ptrs, int64_t n, int64_t pos, const uint64_t* keys, const double* vals) "
            f"{{\n    {fname}_body({', '.join(casts)});\n}}\n")


def _source(rule, streams, buffers, scalars, tn: str, mn: str) -> tuple[str, list[str]]:
    """The C source of every sweep function of a rule for parameter dtype tn and state dtype mn, and their names."""
    parts, names = [], []
    for kind, modes in _SUFFIXES.items():
        # updates of 16-bit weights count what rounds away, to nearest or (suffix _sr) stochastically
        half = tn in _HALF and kind != "perturb"
        for rounding in ("", "_sr") if half else ("",):
            graph, outputs, leaves = zo_rule.trace(kind, rule, streams, buffers, scalars, count=half,
                                                   stochastic=rounding == "_sr")
            for mode in modes:
                name = f"zo_{kind}_{tn}_{mn}_{mode}{rounding}"
                parts.append(_emit(name, graph, outputs, leaves, tn, mn, mode, tuple(streams), tuple(buffers),
                                   tuple(scalars) + zo_rule.FRAMEWORK_SCALARS))
                names.append(name)
    return "".join(parts), names


# ------------------------------------------------------------------------------------------ compilation
def _cache_dirs() -> list[Path]:
    if os.environ.get("ZO_KERNEL_CACHE"):
        first = Path(os.environ["ZO_KERNEL_CACHE"]).expanduser()
    else:
        first = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zo-adamu" / "kernels"
    return [first, Path(tempfile.gettempdir()) / f"zo-adamu-kernels-{os.getuid()}"]


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _compile(kernels_source: str, label: str, signatures: dict) -> ctypes.CDLL:
    """Compile (or load from the cache) the prelude plus `kernels_source`; check its noise against zo_noise."""
    if os.environ.get("ZO_NO_CKERNEL", "") not in ("", "0"):
        raise RuntimeError("disabled by ZO_NO_CKERNEL")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found: install gcc or clang, or set CC")
    source = _constants() + _PRELUDE.read_text() + kernels_source
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    errors = []
    begin = time.perf_counter()
    for arch in (("-march=native",), ()):
        flags = _CFLAGS + arch
        tag = hashlib.sha256("\0".join((source, cc, version, _cpu_tag()) + flags).encode()).hexdigest()[:20]
        for cache in _cache_dirs():
            path = cache / f"zo_kernels_{tag}.so"
            cached = path.is_file()
            try:
                if not cached:
                    cache.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(dir=cache) as tmp:
                        c_file, so_file = Path(tmp) / "zo_kernels.c", Path(tmp) / "zo_kernels.so"
                        c_file.write_text(source)
                        done = subprocess.run([cc, *flags, str(c_file), "-o", str(so_file), "-lm"],
                                              capture_output=True, text=True, timeout=900)
                        if done.returncode:
                            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-800:]}")
                            break
                        os.replace(so_file, path)  # atomic: concurrent builders agree on the content
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                errors.append(f"{path}: {err}")
                continue
            for name, argtypes in signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, None
            _self_test(lib)
            seconds = time.perf_counter() - begin
            BUILDS.append({"library": label, "seconds": round(seconds, 3), "cached": cached})
            logger.info("zo: C kernels for %s %s in %.1f s (%s)", label, "loaded" if cached else "compiled",
                        seconds, path)
            return lib
    raise RuntimeError("; ".join(errors) or "build failed")


P, I64, U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
_BASE_SIGNATURES = {"zo_fill_g": [P, I64, U64, I64], "zo_fill_r": [P, I64, U64, I64],
                    **{f: [P, P, I64] for f in ("zo_bf16_to_f32", "zo_f32_to_bf16", "zo_f16_to_f32", "zo_f32_to_f16")}}
_SWEEP_SIGNATURE = [P, I64, I64, P, P]


def _self_test(lib):
    """The library must reproduce zo_noise bit for bit (guards against a compiler that contracts multiply-adds or
    approximates anyway)."""
    for direction, fn in (("gaussian", lib.zo_fill_g), ("rademacher", lib.zo_fill_r)):
        for pos, n in ((0, 4099), (12345, 777), (1, 2)):
            key = zo_noise.mix(pos, n, 7)
            out = torch.empty(n, dtype=torch.float32)
            fn(out.data_ptr(), n, key, pos)
            if not torch.equal(out, zo_noise.counter_noise(key, pos, n, direction, "cpu")):
                raise RuntimeError(f"the compiled kernel disagrees with zo_noise's {direction} noise: the compiler "
                                   "does not keep IEEE float32 semantics (set CC to gcc or clang)")


class _Base:
    lock = threading.Lock()
    lib = None
    error: str | None = None
    tried = False


def _base():
    """The noise-only library (fill, conversions), or None with the reason in error()."""
    if not _Base.tried:
        with _Base.lock:
            if not _Base.tried:
                try:
                    _Base.lib = _compile("", "noise", _BASE_SIGNATURES)
                except Exception as err:  # any failure: the torch path computes the same numbers
                    _Base.error = f"{type(err).__name__}: {err}"
                    logger.warning("zo: C kernels unavailable (%s); the torch path computes the same noise and "
                                   "arithmetic (identical results, slower CPU steps)", _Base.error)
                _Base.tried = True
    return _Base.lib


def available() -> bool:
    """Whether C kernels can be built here (the first call builds the noise library)."""
    return _base() is not None


def error() -> str | None:
    """Why no C kernels are in use, or None."""
    _base()
    return _Base.error


def fill(out: torch.Tensor, key: int, pos: int, direction: str) -> torch.Tensor:
    """Elements [pos, pos+len(out)) of counter stream `key` into contiguous float32 CPU `out`, by the C kernel."""
    lib = _base()
    if lib is None:
        raise RuntimeError(f"no C kernels: {_Base.error}")
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"fill() writes a contiguous float32 CPU tensor, got {out.dtype} on {out.device}")
    (lib.zo_fill_g if direction == "gaussian" else lib.zo_fill_r)(out.data_ptr(), out.numel(), key, pos)
    return out


def convert(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The kernels' own 16-bit <-> float32 conversions (the ones they use for 16-bit state), for tests."""
    names = {torch.bfloat16: "bf16", torch.float16: "f16"}
    half = names.get(src.dtype) or names.get(out.dtype)
    if half is None or torch.float32 not in (src.dtype, out.dtype) or src.numel() != out.numel():
        raise ValueError(f"convert() goes between float32 and bfloat16/float16 of one size, got {src.dtype} "
                         f"[{src.numel()}] -> {out.dtype} [{out.numel()}]")
    lib = _base()
    fn = getattr(lib, f"zo_{half}_to_f32" if src.dtype != torch.float32 else f"zo_f32_to_{half}")
    fn(src.contiguous().data_ptr(), out.data_ptr(), src.numel())
    return out


# ------------------------------------------------------------------------------------------ per-rule kernels
class Kernels:
    """The compiled sweeps of one rule (a zo.rule.SweepSpec), one library per (parameter dtype, state dtype) built on
    first use (most runs need one pair: compiling all of them up front took ~4x longer).  `scalars`: the order of the
    values array; `calls`: kernel calls made."""

    def __init__(self, spec):
        self.rule, self.streams, self.buffers = spec.rule, tuple(spec.streams), tuple(spec.buffers)
        self.method_scalars = tuple(spec.scalars)
        self.scalars = self.method_scalars + zo_rule.FRAMEWORK_SCALARS
        self.n_streams, self.n_buffers = len(self.streams), len(self.buffers)
        self.calls = 0
        self._functions: dict[tuple, dict | None] = {}
        self._lock = threading.Lock()

    def _library(self, tn: str, mn: str) -> dict | None:
        if (tn, mn) not in self._functions:
            with self._lock:
                if (tn, mn) not in self._functions:
                    source, names = _source(self.rule, self.streams, self.buffers, self.method_scalars, tn, mn)
                    label = f"{getattr(self.rule, '__qualname__', repr(self.rule))} [{tn}, state {mn}]"
                    try:
                        lib = _compile(source, label, {**_BASE_SIGNATURES, **{n: _SWEEP_SIGNATURE for n in names}})
                        self._functions[(tn, mn)] = {name: getattr(lib, name) for name in names}
                    except Exception as err:
                        logger.warning("zo: C kernels for %s unavailable (%s: %s); the torch path runs instead",
                                       label, type(err).__name__, err)
                        self._functions[(tn, mn)] = None
        return self._functions[(tn, mn)]

    def supports(self, x_dtype: torch.dtype, state_dtype: torch.dtype | None) -> bool:
        """Whether kernels exist for these dtypes (building them on first call)."""
        tn = DTYPE_NAMES.get(x_dtype)
        mn = DTYPE_NAMES.get(state_dtype) if self.n_buffers else tn
        if tn not in STATE_DTYPES or mn not in STATE_DTYPES[tn]:
            return False
        return self._library(tn, mn) is not None

    def job(self, kind: str, *, direction: str, noise_source: str, x: torch.Tensor, stash, buffers: list, kept: list,
            start: int, count: int, position: int, keys, values, stochastic: bool = False, away: list | None = None):
        """A call sweeping elements [start, start+count) of the flat tensors (run later, maybe on a worker thread):
        `kind` one of zo.rule.SWEEP_KINDS, `direction` gaussian / rademacher, `noise_source` one of NOISE_SOURCES,
        `kept` the float32 noise buffers (one per stream) for a kept direction; `position` is the noise position of
        element `start`; keys / values: ctypes arrays from keys_array / values_array.  An update of 16-bit weights
        rounds stochastically where `stochastic` (keys then end with the rounding bits' key) and counts what rounds
        away into a ctypes int64 it appends to `away` (required then)."""
        tn = DTYPE_NAMES[x.dtype]
        mn = DTYPE_NAMES[buffers[0].dtype] if buffers else tn
        half = tn in _HALF and kind != "perturb"
        suffix = _SUFFIX[direction, noise_source] + ("_sr" if half and stochastic else "")
        fn = self._library(tn, mn)[f"zo_{kind}_{tn}_{mn}_{suffix}"]
        slot = ctypes.c_int64(0)
        if half:
            away.append(slot)
        ptrs = (ctypes.c_uint64 * (3 + len(buffers) + self.n_streams))(
            _ptr(x, start), _ptr(stash, start) if stash is not None else 0, *(_ptr(b, start) for b in buffers),
            *(_ptr(k, start) for k in kept), *([0] * (self.n_streams - len(kept))), ctypes.addressof(slot))
        self.calls += 1
        return functools.partial(fn, ptrs, count, position, keys, values)

    @staticmethod
    def keys_array(keys) -> ctypes.Array:
        return (ctypes.c_uint64 * len(keys))(*keys)

    def values_array(self, values: dict) -> ctypes.Array:
        """The scalars in kernel order; a name without a value (e.g. the update's before the probes) is NaN."""
        return (ctypes.c_double * len(self.scalars))(*(float(values.get(n, float("nan"))) for n in self.scalars))


def _ptr(t: torch.Tensor, start: int) -> int:
    return t.data_ptr() + start * t.element_size()


_RULES: dict[tuple, Kernels | None] = {}
_RULES_LOCK = threading.Lock()


def kernels_for(spec) -> Kernels | None:
    """The sweeps of a zo.rule.SweepSpec (its rule, noise streams, state buffers, step and update values), compiled
    per dtype pair on first use; None where no C kernels can be built (the torch path then runs)."""
    key = (spec.rule, tuple(spec.streams), tuple(spec.buffers), tuple(spec.scalars))
    if key not in _RULES:
        with _RULES_LOCK:
            if key not in _RULES:
                _RULES[key] = Kernels(spec) if _base() is not None else None
    return _RULES[key]


# ------------------------------------------------------------------------------------------ worker threads
_POOLS: dict[int, ThreadPoolExecutor] = {}


def run(jobs: list) -> None:
    """Run kernel calls (they release the GIL); jobs touch disjoint memory, so any order gives the same result.
    Dynamic scheduling over torch.get_num_threads() threads tolerates a busy core."""
    workers = min(torch.get_num_threads(), len(jobs), 32)
    if workers <= 1:
        for job in jobs:
            job()
        return
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS.setdefault(workers, ThreadPoolExecutor(workers, thread_name_prefix="zo-sweep"))
    for _ in pool.map(lambda job: job(), jobs):
        pass
