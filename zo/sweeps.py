"""The sweeps of a ZO optimizer: one pass over its trainable tensors that regenerates the noise and applies a rule.

The optimizer (zo.core) decides *what* a sweep does (perturb θ by k·ε·u, restore it, or update it); this module
decides *how*, tensor by tensor, as torch keeps `_fused_adamw` out of the `AdamW` class:
  * the C kernels (zo.backends.cpu) for float32/float64 CPU tensors with the counter noise,
  * one fused Triton kernel per tensor (zo.backends.triton) for CUDA tensors, whose launches are captured once per
    kind of sweep as a CUDA graph and replayed,
  * torch operations chunk by chunk everywhere else: the reference the kernels equal bit for bit.
It owns what those paths keep between sweeps: the exact-restore stash, the kept direction, the torch generators,
the Triton device buffers and graphs, and the diagnostics (sweeps, noise draws, graph replays, timings).

16-bit weights (bfloat16, float16): an update sweep computes the new value in float32 and rounds it once to the
weight's dtype, to nearest, or with stochastic_rounding at random from bits of the counter stream ROUNDING_STREAM of
the direction's seed (zo.noise.stochastic_round: reproducible, the same on every path, unbiased); every path also
counts the elements whose update rounded to nothing (zo.rule.sweep's "rounded_away"), read by `rounded_away()`.
Weights of 32 or 64 bits are neither counted (their updates round away only below ~1e-7 relative) nor rounded
stochastically.

A method describes itself once, as a frozen `zo.rule.SweepSpec` (rule, streams, buffers, step and update value
names); each sweep gets a frozen `SweepStep` (the direction's seed, where the parameters rest, the step's values).
Tensors a method sweeps itself (low-rank directions: `host.elementwise(p)` is False) get the stash handling here and
their arithmetic from `host.sweep_tensor(TensorSweep)`.  The backends are imported on first use.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import torch

from zo import noise as zo_noise
from zo import rule as zo_rule
from parallel import local_part

__all__ = ["Sweeper", "SweepStep", "TensorSweep", "cpu_backend", "triton_backend", "compute_dtype",
           "kernels_available", "triton_available", "kernel_builds", "ROUNDED_DTYPES"]

ROUNDED_DTYPES = (torch.bfloat16, torch.float16)   # weights whose updates are counted and may round stochastically


@functools.cache
def cpu_backend():
    """The C kernels (zo.backends.cpu), imported on first use."""
    from zo.backends import cpu
    return cpu


@functools.cache
def triton_backend():
    """The fused Triton sweeps (zo.backends.triton), or None where Triton is not installed."""
    from zo.backends import triton
    return triton if triton.available() else None


def kernels_available() -> bool:
    """Whether the fast CPU kernels are in use (the noise library is built on the first call)."""
    return cpu_backend().available()


def triton_available() -> bool:
    """Whether CUDA tensors get the fused Triton sweeps (zo.backends.triton) and, by default, the counter noise."""
    return triton_backend() is not None


def kernel_builds() -> list[dict]:
    """The C kernel libraries loaded in this process: {"library", "seconds", "cached"} (compile time, reported
    apart from the steps)."""
    return list(cpu_backend().BUILDS)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sweep computes in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SweepStep(NamedTuple):
    """What one sweep needs to know of the step it belongs to (built by the optimizer for each sweep)."""
    seed: int                      # the seed of the direction drawn (zo.noise.direction_seed)
    offset: int                    # the parameters rest at θ + offset·ε·u
    values: dict                   # the step values (host floats)
    update_values: Callable[[int, dict], dict] | None = None   # (group index, group) -> update values, decay, ok
    next: tuple | None = None      # (seed, step values) of the next step: an update that carries its perturbation
    restoring: bool = True         # whether an update starts from the stash where one is kept


class TensorSweep(NamedTuple):
    """One tensor that the method sweeps itself (host.sweep_tensor), with the stash already handled:
    perturb: x += scale·d;  update: x += restore_scale·d (0 when x was just restored from the stash), then the
    method's update with `values` (its update values plus decay and ok)."""
    kind: str                      # "perturb" (a probe or a restore) or "update"
    index: int                     # the tensor's noise index
    group_index: int
    group: dict
    p: torch.Tensor                # the parameter
    x: torch.Tensor                # its local data, flat and contiguous (written back after the call)
    scale: float = 0.0
    restore_scale: float = 0.0
    values: dict | None = None


class _Layout(NamedTuple):
    key: tuple
    every: tuple | None       # the trainable tensors if every one is swept by a fused kernel
    devices: tuple            # the devices of the fused tensors
    graphable: bool           # all fused, contiguous, on one CUDA device


class Sweeper:
    """The sweeps of one optimizer (`host`, a zo.core.ZOOptimizer: its param_groups, state and the per-tensor
    answers noise_offset, buffer_dtype, elementwise, sweep_tensor)."""

    def __init__(self, spec: zo_rule.SweepSpec, host, *, rng: str, exact_restore: bool | None,
                 keep_direction: bool, cuda_graphs: bool, buffer_init: dict | None = None,
                 stochastic_rounding: bool = False):
        self.spec, self.host = spec, host
        self.stochastic_rounding = bool(stochastic_rounding)
        self._away: dict[torch.device, torch.Tensor] = {}   # rounded-away updates per device (int64, on the device)
        self._counted = 0                                    # 16-bit elements updated since rounded_away()
        self.rng, self.exact_restore = rng, exact_restore
        self.keep_direction, self.cuda_graphs = keep_direction, cuda_graphs
        self.buffer_init = dict(buffer_init or {})
        self.fast_paths = True   # False: every tensor takes the torch path (the reference the kernels must equal)
        self.stash: dict[torch.Tensor, torch.Tensor] = {}
        self.kept: dict[torch.Tensor, list[torch.Tensor]] = {}
        self.kept_ready = False  # the kept buffers hold the noise of the direction being swept
        self._generators: dict[torch.device, torch.Generator] = {}
        self._device_sweeps: dict[torch.device, Any] = {}
        self._layout = None
        self.count = self.noise_calls = self.replays = 0   # diagnostics, not saved (replays: CUDA graph sweeps)
        self.timings: list | None = None   # a list: each sweep appends (kind, seconds of host time) (benchmarks)
        # zo.offload: `only` (ids) limits the sweeps to the resident tensors; `hold` takes each update step, its values
        # frozen, for the streamed ones, which `apply` updates when they next reach the device
        self.only: set[int] | None = None
        self.hold: Callable[[SweepStep], None] | None = None

    # -- the optimizer's tensors
    def entries(self):
        """(index, group index, group, param) in the optimizer's order; `index` names the tensor's noise."""
        index = 0
        for group_index, group in enumerate(self.host.param_groups):
            for p in group["params"]:
                yield index, group_index, group, p
                index += 1

    def params(self):
        return (p for group in self.host.param_groups for p in group["params"])

    def stashes(self, p) -> bool:
        """Whether p is restored from a copy (exact_restore None: the tensors below fp32 only)."""
        if self.exact_restore is None:
            return p.dtype not in (torch.float32, torch.float64)
        return self.exact_restore

    def buffer(self, p, name) -> torch.Tensor:
        """p's state buffer `name`, flat, created on first use (0, or the method's buffer_init)."""
        st = self.host.state[p]
        if name not in st:
            st[name] = torch.full_like(local_part(p), self.buffer_init.get(name, 0.0),
                                       dtype=self.host.buffer_dtype(p), memory_format=torch.contiguous_format)
        return st[name].view(-1)

    def held(self) -> dict[str, int]:
        """Elements held by the sweeps: the exact-restore stash and the kept noise."""
        return {"stash": sum(t.numel() for t in self.stash.values()),
                "kept noise": sum(t.numel() for kept in self.kept.values() for t in kept)}

    def rounded_away(self) -> torch.Tensor | None:
        """The share of the 16-bit elements updated since the last call whose update rounded to nothing (float64
        0-dim on the first parameter's device; no host synchronisation), or None where none was updated."""
        if not self._counted:
            return None
        for device, sweeps in self._device_sweeps.items():   # the fused kernels' count, at a fixed address
            self._add_away(device, sweeps.away[1].clone(), 0)
            sweeps.away.zero_()
        devices = list(self._away)
        away = sum((self._away[d].to(devices[0]) for d in devices[1:]), self._away[devices[0]])
        share = away.to(torch.float64) / self._counted
        self._away, self._counted = {}, 0
        return share

    def _add_away(self, device, away, counted: int):
        """Count `away` rounded-away elements (an int64 tensor on `device`, or an int) out of `counted`."""
        device = torch.device(device)
        held = self._away.get(device)
        if held is None:
            held = self._away[device] = torch.zeros((), dtype=torch.int64, device=device)
        held.add_(away)
        self._counted += counted

    def rounding(self, p, rule_kind: str) -> tuple[bool, bool]:
        """(stochastic, count) for a sweep of p: only updates of 16-bit weights round stochastically (when asked)
        and are counted."""
        if rule_kind == "perturb" or p.dtype not in ROUNDED_DTYPES:
            return False, False
        return self.stochastic_rounding, True

    def new_direction(self):
        """The kept noise (keep_direction) no longer holds the direction about to be swept."""
        self.kept_ready = False

    # -- noise
    def resolved_rng(self, device) -> str:
        return zo_noise.resolve_rng(self.rng, device)

    def counter_noise(self, key: int, start: int, count: int, direction: str, device) -> torch.Tensor:
        """Elements [start, start+count) of the counter stream `key`, float32 (the C fill on CPU where it is built)."""
        device = torch.device(device)
        if device.type == "cpu" and self.fast_paths and cpu_backend().available():
            return cpu_backend().fill(torch.empty(count, dtype=torch.float32), key, start, direction)
        return zo_noise.counter_noise(key, start, count, direction, device)

    def _noise(self, seed, index, group, p, start, n, stream):
        """float32 noise of elements [start, start+n) of tensor `index`, stream `stream` (torch path)."""
        if self.keep_direction:
            kept = self._kept_noise(p)[stream][start:start + n]
            if self.kept_ready:
                return kept
            out = kept
        else:
            out = torch.empty(n, dtype=torch.float32, device=p.device)
        self.noise_calls += 1
        if self.resolved_rng(p.device) == "counter":
            key, pos = zo_noise.counter_key(seed, index, stream), self.host.noise_offset(p) + start
            if self.fast_paths and p.device.type == "cpu" and cpu_backend().available():
                return cpu_backend().fill(out, key, pos, group["direction"])
            return out.copy_(zo_noise.counter_noise(key, pos, n, group["direction"], p.device))
        generator = self._generators.get(p.device)
        if generator is None:
            generator = self._generators[p.device] = torch.Generator(device=p.device)
        return zo_noise.block_noise(out, generator, seed, index, self.host.noise_offset(p) + start, stream,
                                    group["direction"], group["noise_block"])

    def _kept_noise(self, p) -> list[torch.Tensor]:
        kept = self.kept.get(p)
        if kept is None:
            kept = self.kept[p] = [torch.empty(local_part(p).numel(), dtype=torch.float32, device=p.device)
                                   for _ in self.spec.streams]
        return kept

    # -- scalars
    def _values(self, step: SweepStep, kind, k, group_index, group) -> dict:
        """Every scalar of one sweep of one group: the step values, the update values (after the probes) and the
        framework's scales."""
        values = dict(step.values, perturb_scale=k * group["eps"], restore_scale=step.offset * -group["eps"])
        if kind == "update":
            values.update(step.update_values(group_index, group))
        return values

    def _torch_values(self, values, device, dtype) -> zo_rule.Values:
        """The scalars as 0-dim tensors of the compute dtype: each rounded once from double, filled on the device
        (torch.full does not synchronise); the update values before the probes end are NaN (unused)."""
        out = {}
        for name in self.spec.scalars + zo_rule.FRAMEWORK_SCALARS:
            v = values.get(name, float("nan"))
            if name == "ok":
                out[name] = v.to(device) if torch.is_tensor(v) else torch.ones((), dtype=torch.bool, device=device)
            elif torch.is_tensor(v):
                out[name] = v.to(device, dtype)
            else:
                out[name] = torch.full((), float(v), dtype=dtype, device=device)
        return zo_rule.Values("the step values", out)

    # -- one sweep
    def run(self, kind: str, step: SweepStep, *, k: float = 0, carry: bool = False) -> None:
        """One pass over the trainable tensors.  kind: "perturb" θ += k·ε·u; "restore" the same, or the stash;
        "update" the restore fused with the update (and, with carry, the next step's +ε·u': fused tensors only)."""
        self.count += 1
        if kind == "update" and self.hold is not None:
            step = self.frozen(step)
            self.hold(step)
        if self.timings is None:
            return self._dispatch(kind, step, k, carry)
        begin = time.perf_counter()
        self._dispatch(kind, step, k, carry)
        self.timings.append((kind, time.perf_counter() - begin))

    def frozen(self, step: SweepStep) -> SweepStep:
        """The step with every group's update values computed now: they read the optimizer's projected gradient, which
        the next step replaces (an update deferred to a later sweep must keep this step's)."""
        values = [step.update_values(i, group) for i, group in enumerate(self.host.param_groups)]
        return step._replace(update_values=lambda group_index, group: values[group_index])

    def apply(self, step: SweepStep, tensors) -> None:
        """The update sweep of a frozen `step` over `tensors` alone (zo.offload: a streamed block when it arrives): per
        tensor the arithmetic of the whole sweep, so the same bits."""
        only, self.only = self.only, {id(p) for p in tensors}
        try:
            self._dispatch("update", step, 0, False)
        finally:
            self.only = only

    def _dispatch(self, kind, step, k, carry):
        """A replay of the sweep's captured CUDA graph where one serves, else the sweep tensor by tensor."""
        layout = self.fused_layout()
        for device_sweeps in self._devices(layout):
            next_seed, next_values = step.next or (0, None)
            groups = ([step.update_values(i, g) for i, g in enumerate(self.host.param_groups)]
                      if kind == "update" else None)
            device_sweeps.load(step.seed, step.values, next_seed, next_values, groups)
        if layout.graphable and self.cuda_graphs and self.only is None:   # a graph replays every tensor
            # a sweep's launches depend only on the tensors and on constants (the kind, k, the probe offset, each
            # group's ε and direction); every per-step value is read from device memory, so one captured graph
            # serves every step.  The graph stores how many noise draws its capture counted.
            def capture():
                before, counted = self.noise_calls, self._counted
                self._sweep_tensors(kind, step, k, carry)
                drawn, self.noise_calls = self.noise_calls - before, before
                counted, self._counted = self._counted - counted, counted
                return drawn, counted
            key = (kind, k, carry, step.offset, tuple((g["eps"], g["direction"]) for g in self.host.param_groups))
            done = self._device_sweeps[layout.devices[0]].replay(key, layout.key, capture, layout.every)
            if done is not None:
                self.noise_calls += done[0]
                self._counted += done[1]   # the replayed kernels add what rounded away to the device's count
                self.replays += 1
                return
        self._sweep_tensors(kind, step, k, carry)

    def _sweep_tensors(self, kind, step: SweepStep, k, carry):
        kernels = self._cpu_kernels() if self.fast_paths else None
        first = kind == "perturb" and step.offset == 0
        jobs, writebacks, touched, arrays, structured = [], [], [], {}, []
        slots, counted = [], 0   # the C updates' rounded-away counts (one slot a job) and the elements they cover
        for index, group_index, group, p in self.entries():
            if not p.requires_grad or (self.only is not None and id(p) not in self.only):
                continue  # frozen after construction: untouched, index kept so other directions don't shift
            data = local_part(p).detach()
            contiguous = data.is_contiguous()
            if not self.host.elementwise(p):
                structured.append((index, group_index, group, p))   # after the element-wise tensors, as always
                continue
            flat = (data if contiguous else data.contiguous()).view(-1)
            stash = self.stashes(p) and (kind != "update" or step.restoring)
            if stash and first:
                buf = self.stash.get(p)
                if buf is None:
                    buf = self.stash[p] = torch.empty(flat.numel(), dtype=p.dtype, device=p.device)
                buf.copy_(flat)
            if stash and kind == "restore":
                flat.copy_(self.stash[p])
            elif kind == "restore" and k == 0:
                pass   # nothing rests on a tensor without a stash
            elif self._triton_path(p):
                self._triton_sweep(kind, step, k, index, group_index, group, p, flat, stash, carry)
                touched += [data] if contiguous else []
            else:
                rule_kind = "perturb" if kind != "update" else "update_stash" if stash else "update"
                fast = kernels is not None and self._cpu_path(p, kernels)
                if fast:
                    key = (kind, group_index)
                    if key not in arrays:
                        arrays[key] = kernels.values_array(self._values(step, kind, k, group_index, group))
                    stochastic, count = self.rounding(p, rule_kind)
                    streams = range(len(self.spec.streams)) if not stochastic else \
                        [*range(len(self.spec.streams)), zo_noise.ROUNDING_STREAM]
                    keys = kernels.keys_array([zo_noise.counter_key(step.seed, index, s) for s in streams])
                    buffers = [self.buffer(p, name) for name in self.spec.buffers]
                    source = self._noise_source(kind)
                    kept = self._kept_noise(p) if self.keep_direction else []
                size = group["chunk_numel"] or group["noise_block"]
                for start in range(0, flat.numel(), size):
                    n = min(size, flat.numel() - start)
                    if fast:
                        jobs.append(kernels.job(
                            rule_kind, direction=group["direction"], noise_source=source, x=flat,
                            stash=self.stash.get(p) if stash else None, buffers=buffers, kept=kept, start=start,
                            count=n, position=self.host.noise_offset(p) + start, keys=keys, values=arrays[key],
                            stochastic=stochastic, away=slots if count else None))
                        self.noise_calls += len(self.spec.streams) if source != "kept" else 0
                        counted += n if count else 0
                    else:
                        self._torch_chunk(rule_kind, step, k, index, group_index, group, p, flat, start, n, stash)
                touched += [data] if fast and contiguous else []
            if not contiguous:
                writebacks.append((data, flat))  # also keeps the copy alive until the kernels have run
        cpu_backend().run(jobs) if jobs else None
        if counted:
            self._add_away("cpu", sum(slot.value for slot in slots), counted)
        for index, group_index, group, p in structured:
            self._sweep_structured(kind, step, k, first, index, group_index, group, p)
        for data, flat in writebacks:
            data.copy_(flat.view_as(data))
        if touched:  # the kernels wrote through raw pointers: tell autograd the tensors changed
            torch.autograd.graph.increment_version(touched)
        if self.keep_direction:
            self.kept_ready = True

    def _noise_source(self, kind) -> str:
        """Where a C sweep's noise comes from: drawn, drawn and kept for the step's later sweeps, or the kept copy."""
        if not self.keep_direction:
            return "draw"
        if self.kept_ready:
            return "kept"
        return "draw_and_keep" if kind != "update" else "draw"

    def _torch_chunk(self, rule_kind, step, k, index, group_index, group, p, flat, start, n, stash):
        """One chunk in torch operations: the definition the kernels reproduce bit for bit."""
        dtype = compute_dtype(p.dtype)
        x = flat[start:start + n]
        noise = zo_rule.Values("the noise", {name: self._noise(step.seed, index, group, p, start, n, i).to(dtype)
                                             for i, name in enumerate(self.spec.streams)})
        state = {name: self.buffer(p, name)[start:start + n].to(dtype) for name in self.spec.buffers}
        kind = "perturb" if rule_kind == "perturb" else "update"
        values = self._torch_values(self._values(step, kind, k, group_index, group), p.device, dtype)
        held = self.stash[p][start:start + n].to(dtype) if rule_kind == "update_stash" else None
        stochastic, count = self.rounding(p, rule_kind)
        kw = {}
        if stochastic:
            key = zo_noise.counter_key(step.seed, index, zo_noise.ROUNDING_STREAM)
            bits = zo_noise.rounding_bits(key, self.host.noise_offset(p) + start, n, p.device)
            kw["stochastic"] = lambda value: zo_noise.stochastic_round(value, bits, p.dtype).to(dtype)
        storage = {"x": p.dtype, **{name: self.host.buffer_dtype(p) for name in self.spec.buffers}}
        out = zo_rule.sweep(rule_kind, self.spec.rule, x.to(dtype), noise, state, values, stash=held, count=count,
                            rounded=lambda name, value: value.to(storage[name]).to(dtype), **kw)
        x.copy_(out["x"])  # the single rounding back to the storage dtype (exact after a stochastic one)
        if count:
            self._add_away(p.device, (out["rounded_away"] != 0).sum(), n)
        for name in self.spec.buffers:
            if name in out:
                self.buffer(p, name)[start:start + n].copy_(out[name])

    def _sweep_structured(self, kind, step, k, first, index, group_index, group, p):
        """A tensor the method sweeps itself: the stash here, the arithmetic in host.sweep_tensor."""
        data = local_part(p).detach()
        x = (data if data.is_contiguous() else data.contiguous()).view(-1)
        stash = self.stashes(p) and (kind != "update" or step.restoring)
        if stash and first:
            self.stash[p] = x.clone() if p not in self.stash else self.stash[p].copy_(x)
        if stash and kind == "restore":
            x.copy_(self.stash[p])
        elif kind == "restore" and k == 0:
            return
        elif kind != "update":
            self.host.sweep_tensor(TensorSweep("perturb", index, group_index, group, p, x, scale=k * group["eps"]))
        else:
            if stash:
                x.copy_(self.stash[p])
            self.host.sweep_tensor(TensorSweep(
                "update", index, group_index, group, p, x, restore_scale=0.0 if stash else step.offset * -group["eps"],
                values=step.update_values(group_index, group)))
        if x.data_ptr() != data.data_ptr():
            data.copy_(x.view_as(data))

    # -- out of place
    @torch.no_grad()
    def perturbed(self, step: SweepStep, p: torch.Tensor, k: float = 1.0) -> torch.Tensor:
        """θ + k·ε·u of one element-wise tensor as a new tensor (p is only read): the values an in-place perturbation
        of θ by k would write, bit for bit (the same rule, the same single rounding to p's dtype)."""
        for index, group_index, group, q in self.entries():
            if q is p:
                break
        else:
            raise ValueError("perturbed(): not a parameter of this optimizer")
        out = local_part(p).detach().reshape(-1).clone()
        if not self.host.elementwise(p):   # the method's own perturbation, applied to the copy
            self.host.sweep_tensor(TensorSweep("perturb", index, group_index, group, p, out, scale=k * group["eps"]))
            return out.view_as(local_part(p))
        kernels = self._cpu_kernels() if self.fast_paths else None
        if kernels is not None and self._cpu_path(p, kernels):   # the C perturb sweep on the copy
            values = kernels.values_array(self._values(step, "perturb", k, group_index, group))
            keys = kernels.keys_array([zo_noise.counter_key(step.seed, index, s)
                                       for s in range(len(self.spec.streams))])
            size = group["chunk_numel"] or group["noise_block"]
            cpu_backend().run([kernels.job(
                "perturb", direction=group["direction"], noise_source="draw", x=out, stash=None,
                buffers=[self.buffer(p, name) for name in self.spec.buffers], kept=[], start=start,
                count=min(size, out.numel() - start), position=self.host.noise_offset(p) + start, keys=keys,
                values=values) for start in range(0, out.numel(), size)])
        else:
            keep, self.keep_direction = self.keep_direction, False   # a temporary draws, never fills the kept copy
            try:
                size = group["chunk_numel"] or group["noise_block"]
                for start in range(0, out.numel(), size):
                    self._torch_chunk("perturb", step, k, index, group_index, group, p, out, start,
                                      min(size, out.numel() - start), False)
            finally:
                self.keep_direction = keep
        return out.view_as(local_part(p))

    @torch.no_grad()
    def perturbed_rows(self, step: SweepStep, p: torch.Tensor, k: float, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (int64) of θ + k·ε·u, p seen as (p.shape[0], -1): perturbed(step, p, k)[rows] bit for bit,
        drawing only those rows' noise and state (counter noise is a function of the element position), so an
        embedding probe costs its gathered rows, not the vocabulary.  Elsewhere (rng="torch", a structured
        direction) it gathers from the whole perturbed tensor."""
        data = local_part(p).detach()
        if (not self.host.elementwise(p) or self.resolved_rng(p.device) != "counter"
                or self.host.noise_offset(p) or data.numel() != p.numel()):
            return self.perturbed(step, p, k).reshape(p.shape[0], -1)[rows]
        index, group_index, group = next((i, gi, g) for i, gi, g, q in self.entries() if q is p)
        width = p[0].numel()
        positions = (rows[:, None] * width + torch.arange(width, device=p.device)).view(-1)
        dtype = compute_dtype(p.dtype)
        noise = zo_rule.Values("the noise", {
            name: zo_noise.counter_noise_at(zo_noise.counter_key(step.seed, index, i), positions,
                                            group["direction"]).to(dtype)
            for i, name in enumerate(self.spec.streams)})
        state = {name: self.buffer(p, name)[positions].to(dtype) for name in self.spec.buffers}
        values = self._torch_values(self._values(step, "perturb", k, group_index, group), p.device, dtype)
        x = data.reshape(p.shape[0], -1)[rows].view(-1).to(dtype)
        out = zo_rule.sweep("perturb", self.spec.rule, x, noise, state, values)["x"]
        return out.to(p.dtype).view(len(rows), width)

    # -- the C kernels
    def _cpu_kernels(self):
        if not any(p.device.type == "cpu" for p in self.params()):
            return None
        return cpu_backend().kernels_for(self.spec)

    def _cpu_path(self, p, kernels) -> bool:
        return (p.device.type == "cpu" and self.resolved_rng(p.device) == "counter"
                and kernels.supports(p.dtype, self.host.buffer_dtype(p) if self.spec.buffers else None))

    # -- the fused CUDA sweeps
    def _triton_path(self, p) -> bool:
        """Whether this tensor's sweep runs as one fused Triton kernel (CUDA, counter noise, no kept direction)."""
        if (not self.fast_paths or self.keep_direction or self.resolved_rng(p.device) != "counter"
                or not self.host.elementwise(p)):
            return False
        kernels = triton_backend()
        return kernels is not None and kernels.supports(p, self.host.buffer_dtype(p) if self.spec.buffers else None)

    def fused_layout(self) -> _Layout:
        """Which tensors the fused kernels sweep and whether the sweeps can be captured as CUDA graphs (all fused,
        contiguous, on one CUDA device), cached per layout: which tensors are trainable, where and how they and
        their state buffers are stored, whether fast paths are on."""
        state = self.host.state
        key = (self.fast_paths, tuple((local_part(p).data_ptr(), p.device, p.requires_grad,
                                       local_part(p).is_contiguous(),
                                       tuple(state[p][b].data_ptr() for b in self.spec.buffers
                                             if b in state.get(p, {}))) for p in self.params()))
        if self._layout is None or self._layout.key != key:
            trainable = tuple(p for p in self.params() if p.requires_grad)
            fused = [p for p in trainable if self._triton_path(p)]
            every = trainable if trainable and len(fused) == len(trainable) else None
            devices = tuple(dict.fromkeys(p.device for p in fused))
            graphable = (every is not None and len(devices) == 1 and devices[0].type == "cuda"
                         and all(local_part(p).is_contiguous() for p in every))
            self._layout = _Layout(key, every, devices, graphable)
        return self._layout

    def _devices(self, layout):
        for device in layout.devices:
            sweeps = self._device_sweeps.get(device)
            if sweeps is None:
                sweeps = self._device_sweeps[device] = triton_backend().DeviceSweeps(
                    device, self.spec, tensors=sum(len(g["params"]) for g in self.host.param_groups),
                    groups=len(self.host.param_groups))
            yield sweeps

    def _triton_sweep(self, kind, step, k, index, group_index, group, p, flat, stash, carry=False):
        """The sweep of one whole tensor by one fused kernel (the same arithmetic as the torch path)."""
        self.noise_calls += len(self.spec.streams) * (2 if carry else 1)  # a carried update draws the next one too
        rule_kind = "perturb" if kind != "update" else "update_stash" if stash else "update"
        stochastic, count = self.rounding(p, rule_kind)
        self._counted += flat.numel() if count else 0
        self._device_sweeps[p.device].sweep(
            rule_kind, flat, index=index, group_index=group_index, gaussian=group["direction"] == "gaussian",
            perturb_scale=(k if kind != "update" else 1) * group["eps"], restore_scale=step.offset * -group["eps"],
            stash=self.stash[p] if stash else None, buffers=[self.buffer(p, b) for b in self.spec.buffers],
            carry=carry, pos=self.host.noise_offset(p), stochastic=stochastic, count=count)
