"""The core of the zeroth-order optimizers (torch.optim.Optimizer subclasses): the protocol every method shares.

An element-wise ZO method is one small class: its noise `streams`, its per-parameter state `buffers`, its per-step
scalars (`step_values`, known when the step begins; `update_values`, derived from the projected gradient g after the
probes) and one pure per-element `rule(noise, state, s) -> zo_rule.Rule(direction, step, state)`.  Everything else is
generic and lives in `ZOOptimizer`: the sweeps, the probe / step / settle protocol, skipped steps, the stash, the kept
direction, the carried perturbation, checkpoints.  The torch path evaluates the rule on tensors chunk by chunk (the
reference); zo_cpu (C) and zo_triton (CUDA) emit their kernels from the same rule, traced (zo_rule), and equal the torch
path bit for bit.  The noise is defined in zo_noise.

Step protocol (sweep = one pass over the trainable tensors regenerating the noise):
  probe(closure): first probe of a step +εu, -2εu (2 sweeps); later probes +2εu, -2εu (2 sweeps);
                  parameters rest at θ-εu between probes.
  step():         restore and update fused in one sweep: y = θ-εu + εu (or the stash), θ <- y·(1-lr·λ) + step,
                  state <- the rule's new state; where g is not finite, θ <- y and the state is kept (a skipped step).
  carry_perturbation=True (opt-in) also applies the next step's +εu' in the update sweep, so a step costs 2 sweeps
  instead of 3 where one fused kernel does both (CUDA + Triton); elsewhere the update and the perturbation stay two
  sweeps with the same result.  The parameters then rest at θ+εu' between steps: whoever reads them (evaluation,
  checkpoints, the end of training) calls settle() first, which restores θ (one sweep; `carried` says whether one is
  due).  The results equal the uncarried run's bit for bit up to the first settle(); each settle() without a stash adds
  the ≤1-ulp perturb/restore round-trip error described below (with a stash, none).
  Without a stash the perturb/restore round trip is not bit-exact, and no memory-free scheme can be: x+εu rounds away
  the low bits of every |x| << ε|u|, so distinct x collide.  The error is up to about one ulp of θ per step, for a
  large share of the elements: ~1e-7 relative in fp32 (negligible next to updates), ~4e-3 relative in bf16 (larger than
  typical ZO updates, and it random-walks).  Hence exact_restore=None (default) stashes a copy of θ at the first probe
  only for tensors below fp32 and restores those bit-exactly; True stashes every tensor, False none (MeZO memory).
  keep_direction=True (opt-in, small models) keeps the step's noise streams in float32 buffers (one per stream): one
  noise sweep per step instead of three.

Arithmetic of a sweep (zo_rule.sweep), in the compute dtype T (fp64 for fp64 tensors, else fp32), one rounding per
operation: perturb x <- x + u·(k·ε); update y <- x + u·(-o·ε) (o = offset of the probes) or the stash,
x <- y·(1-lr·λ) + step.  Scalars are rounded once from double to T.
Speed: on CPU, float32/float64 tensors with the counter noise go through C kernels emitted from the rule (zo_cpu:
compiled once per rule, cached, checked at load); on CUDA, float32/bfloat16/float16 tensors go through one Triton
kernel per tensor and sweep, also emitted from the rule (zo_triton), whose launches are captured once per kind of sweep
as a CUDA graph and replayed (cuda_graphs=True).  Everything else runs the same arithmetic as torch operations.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from itertools import chain
from typing import NamedTuple

import torch
from torch import nn

import parallel
import zo_noise
import zo_rule
from parallel import local_part
from zo_noise import DIRECTIONS, NOISE_BLOCK, RNGS, direction_seed, sample_direction, step_seed
from zo_rule import Rule

__all__ = ["NOISE_BLOCK", "DIRECTIONS", "RNGS", "step_seed", "direction_seed", "sample_direction",
           "param_groups_for_model", "ZOOptimizer", "Rule", "kernels_available", "triton_available", "kernel_builds"]

logger = logging.getLogger(__name__)

_GLOBAL_STATE = ("zo_kind", "zo_step", "zo_skipped")


# ------------------------------------------------------------------------------------------ backends (lazy)
@functools.cache
def _cpu():
    import zo_cpu
    return zo_cpu


@functools.cache
def _triton():
    """The fused Triton sweeps (zo_triton), or None where Triton is not installed."""
    import zo_triton
    return zo_triton if zo_triton.available() else None


def kernels_available() -> bool:
    """Whether the fast CPU kernels are in use (the noise library is built on the first call)."""
    return _cpu().available()


def triton_available() -> bool:
    """Whether CUDA tensors get the fused Triton sweeps (zo_triton) and, by default, the counter noise."""
    return _triton() is not None


def kernel_builds() -> list[dict]:
    """The C kernel libraries loaded in this process: {"library", "seconds", "cached"} (compile time, reported
    apart from the steps)."""
    return list(_cpu().BUILDS)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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
class ZOOptimizer(torch.optim.Optimizer):
    """The protocol and the generic sweeps of an element-wise ZO method (the module docstring has the arithmetic).

    A method sets `name` (its --zo_optim value), `streams`, `buffers`, `step_values`, `update_values` and `rule`,
    and computes its scalars in `values_at(t)` (host floats, at the step's begin) and `values_from_g(g, group)`
    (float64 0-dim tensors on g's device: no host synchronisation).  Each sweep goes tensor by tensor and, inside a
    tensor, chunk by chunk (`chunk_numel`, default `noise_block` elements), so no temporary is larger than a chunk."""

    name = "zo"
    title = "ZO"
    forwards = 2                      # forward passes per step (one probe)
    default_directions, min_directions = 1, 1   # directions a step unless told (--zo_num_directions), the fewest
    forwards_per_direction = 2        # what one more direction a step costs (a two-point probe)
    max_directions: int | None = None  # None: any number, unless the method keeps state (direction_bound)
    max_directions_why = ""            # and why not more, where a method sets it
    mode_defaults: dict = {}          # training mode (ft, lora, prefix) -> zo_family.ModeDefault (LR, ε, source)
    streams: tuple[str, ...] = ()     # noise streams per tensor (stream i of tensor `index` is zo_noise's stream i)
    buffers: tuple[str, ...] = ()     # per-parameter state, one element per parameter element
    buffer_note = "in the parameter dtype"
    buffer_init: dict[str, float] = {}   # a buffer's first value where not 0 (HiZOO's Σ starts at 1)
    extra_state: tuple[str, ...] = ()    # further per-parameter state tensors a method keeps (any shape, its dtype)
    step_values: tuple[str, ...] = ()
    update_values: tuple[str, ...] = ()
    rule = None

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, keep_direction=False,
                 rng="auto", carry_perturbation=False, cuda_graphs=True):
        if rng not in RNGS:
            raise ValueError(f"Invalid rng: {rng!r} (choose from {RNGS})")
        if keep_direction and carry_perturbation:
            raise ValueError("keep_direction and carry_perturbation do not combine: a kept direction already costs "
                             "one noise sweep per step; choose one")
        clash = set(self.step_values + self.update_values) & set(zo_rule.FRAMEWORK_SCALARS)
        if clash:
            raise TypeError(f"{type(self).__name__} names step values {sorted(clash)}, which the framework sets")
        self.rng = rng
        self.carry_perturbation = bool(carry_perturbation)
        self.cuda_graphs = bool(cuda_graphs)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, direction=direction,
                        chunk_numel=chunk_numel, noise_block=noise_block)
        super().__init__(params, defaults)
        self.exact_restore = None if exact_restore is None else bool(exact_restore)
        self.keep_direction = bool(keep_direction)
        self.fast_paths = True  # False: every tensor takes the torch path (the reference the kernels must equal)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._stash: dict[torch.Tensor, torch.Tensor] = {}
        self._kept: dict[torch.Tensor, list[torch.Tensor]] = {}
        self._triton_sweeps: dict[torch.device, object] = {}
        self._layout = None
        self._seed, self._step_values = 0, {}
        self.sweeps = self.noise_calls = self.replays = 0  # diagnostics, not saved (replays: CUDA graph sweeps)
        self.timings: list | None = None    # a list: each sweep appends (kind, seconds of host time) (benchmarks)
        self.last_projected_grad = self.last_loss_plus = self.last_loss_minus = None
        self.last_schedule: dict[str, float] = {}
        self._global_state()
        self._reset_step()

    # -- what a method declares
    @classmethod
    def direction_bound(cls) -> tuple[int | None, str]:
        """The most directions a step (None: any) and why.  Q directions apply one after another, which averages Q
        estimates only for a method without state: one with state would advance it Q times a step (and probe direction
        q with the state before the step, but update it from what direction q-1 wrote), so it takes one."""
        if cls.max_directions is not None:
            return cls.max_directions, cls.max_directions_why
        state = cls.buffers + cls.extra_state
        if state:
            return 1, (f"its direction or update reads its optimizer state ({', '.join(state)}), which several "
                       "directions a step would advance once per direction")
        return None, ""

    @classmethod
    def memory(cls) -> str:
        """The memory this method adds to inference, for --help and the logs."""
        if not cls.buffers:
            return f"{cls.title}: no memory beyond the model (inference memory)"
        return (f"{cls.title}: +{len(cls.buffers)} x trainable params ({', '.join(cls.buffers)}, "
                f"{cls.buffer_note})")

    def values_at(self, t: int) -> dict[str, float]:
        """The step values of step t (known before the probes), as Python floats."""
        return {}

    def values_from_g(self, g: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The update values from the projected gradient g (float64 0-dim, on its device) for one param group."""
        raise NotImplementedError(f"{type(self).__name__} must define values_from_g(g, group)")

    def schedule_values(self, t: int) -> dict[str, float]:
        """Values logged with each step (last_schedule)."""
        return {}

    def buffer_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of p's state buffers."""
        return p.dtype

    def _elementwise(self, p) -> bool:
        """Whether the generic sweeps (the rule, its C / Triton kernels) handle p; a method with structured directions
        (low-rank factors) answers False for the tensors it sweeps itself in _sweep_structured."""
        return True

    def _sweep_structured(self, kind, k, carry) -> None:
        """The sweep of the tensors _elementwise refuses (after the element-wise ones): nothing by default."""

    def noise_offset(self, p: torch.Tensor) -> int:
        """The noise position of the first element this process holds of p: 0 for a whole tensor; for a shard of a
        DTensor (FSDP2 shards dimension 0 over the ranks) its offset in the flattened full tensor, so a sharded run
        draws exactly the unsharded run's directions."""
        if not isinstance(p, parallel.DTensor):
            return 0
        return parallel.shard_offset(p)

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
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                yield index, group_index, group, p
                index += 1

    def _global_state(self) -> dict:
        # global bookkeeping lives in the state of the first parameter so torch/HF checkpointing carries it
        first = next(iter(self._params()))
        st = self.state[first]
        if "zo_kind" not in st:
            st.update(zo_kind=self.name, zo_step=0,
                      zo_skipped=torch.zeros((), dtype=torch.int64, device=first.device))
        return st

    @property
    def step_count(self) -> int:
        return self._global_state()["zo_step"]

    @property
    def skipped_steps(self) -> torch.Tensor:
        return self._global_state()["zo_skipped"]

    def memory_buffers(self) -> dict[str, int]:
        """Elements held beside the model now: the state buffers, the exact-restore stash and the kept noise."""
        held = {name: sum(s[name].numel() for s in self.state.values() if torch.is_tensor(s.get(name)))
                for name in self.buffers + self.extra_state}
        held["stash"] = sum(t.numel() for t in self._stash.values())
        held["kept noise"] = sum(t.numel() for kept in self._kept.values() for t in kept)
        return {k: v for k, v in held.items() if v}

    def _reset_step(self):
        self._n_probes, self._offset, self._begun = 0, 0, False
        self._measured: dict[int, tuple] = {}   # direction -> (Σg, Σℓ+, Σℓ-, probes) of this step
        self._center = None                      # (Σℓ(θ), calls) of this step (center_loss)
        self._direction, self._restoring = 0, True
        self._kept_ready = False
        self._g = self._ok = None
        self._update_cache: dict = {}
        self._next = None  # (seed, step values) of the next step, for an update that carries its perturbation

    def state_dict(self):
        if self._n_probes:
            raise RuntimeError("state_dict() between probe() and step(): parameters are perturbed")
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self.carried:
            raise RuntimeError("load_state_dict() while the next step's perturbation rests on the parameters: "
                               "call settle() first")
        glob = next((v for v in state_dict["state"].values() if isinstance(v, dict) and "zo_kind" in v), None)
        kind = glob["zo_kind"] if glob is not None else "<not a ZO optimizer>"
        if kind != self.name:
            raise ValueError(f"checkpoint was made with optimizer {kind}, this run uses {self.name}; "
                             "their states are not interchangeable: resume with the same optimizer "
                             "or start from the model weights with a fresh optimizer")
        # torch's loader would cast our tensors to the parameter dtype (and mangle strings): keep them out
        own = _GLOBAL_STATE + self.buffers + self.extra_state
        stripped = {k: {kk: vv for kk, vv in v.items() if kk not in own} for k, v in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": stripped})
        params = list(self._params())
        for k, v in state_dict["state"].items():
            p = params[k]
            for name in self.buffers:
                if name in v:
                    self.state[p][name] = v[name].to(p.device, self.buffer_dtype(p), copy=True,
                                                     memory_format=torch.contiguous_format)
            for name in self.extra_state:
                if name in v:
                    self.state[p][name] = v[name].to(p.device, copy=True) if torch.is_tensor(v[name]) else v[name]
        first = params[0]
        self.state[first].update(zo_kind=kind, zo_step=int(glob["zo_step"]),
                                 zo_skipped=glob["zo_skipped"].to(first.device, torch.int64, copy=True))
        self._reset_step()

    def _stashes(self, p) -> bool:
        if self.exact_restore is None:
            return p.dtype not in (torch.float32, torch.float64)
        return self.exact_restore

    def _buffer(self, p, name) -> torch.Tensor:
        """p's state buffer `name`, flat, created as zeros on first use."""
        st = self.state[p]
        if name not in st:
            st[name] = torch.full_like(local_part(p), self.buffer_init.get(name, 0.0), dtype=self.buffer_dtype(p),
                                       memory_format=torch.contiguous_format)
        return st[name].view(-1)

    # -- noise
    def _rng(self, device) -> str:
        return zo_noise.resolve_rng(self.rng, device)

    def _noise(self, index, group, p, start, n, stream):
        """float32 noise of elements [start, start+n) of tensor `index`, stream `stream` (torch path)."""
        if self.keep_direction:
            kept = self._kept_noise(p)[stream][start:start + n]
            if self._kept_ready:
                return kept
            out = kept
        else:
            out = torch.empty(n, dtype=torch.float32, device=p.device)
        self.noise_calls += 1
        if self._rng(p.device) == "counter":
            key, pos = zo_noise.counter_key(self._seed, index, stream), self.noise_offset(p) + start
            if self.fast_paths and p.device.type == "cpu" and _cpu().available():
                return _cpu().fill(out, key, pos, group["direction"])
            return out.copy_(zo_noise.counter_noise(key, pos, n, group["direction"], p.device))
        generator = self._generators.get(p.device)
        if generator is None:
            generator = self._generators[p.device] = torch.Generator(device=p.device)
        return zo_noise.block_noise(out, generator, self._seed, index, self.noise_offset(p) + start, stream,
                                    group["direction"], group["noise_block"])

    def _kept_noise(self, p) -> list[torch.Tensor]:
        kept = self._kept.get(p)
        if kept is None:
            kept = self._kept[p] = [torch.empty(local_part(p).numel(), dtype=torch.float32, device=p.device)
                                    for _ in self.streams]
        return kept

    # -- per-step scalars
    def _update_values(self, group_index, group) -> dict:
        """The method's update values of this group plus the framework's decay and ok, once per step, float64."""
        if group_index not in self._update_cache:
            g64 = self._g.to(torch.float64)
            weight = self._direction_weight()
            group = group if weight == 1.0 else {**group, "lr": group["lr"] * weight}  # one of Q directions
            values = dict(self.values_from_g(g64, group))
            missing = set(self.update_values) - set(values)
            if missing:
                raise ValueError(f"{type(self).__name__}.values_from_g gave no {sorted(missing)}")
            values.update(decay=1.0 - group["lr"] * group["weight_decay"], ok=self._ok)
            self._update_cache[group_index] = values
        return self._update_cache[group_index]

    def _sweep_values(self, kind, k, group_index, group) -> dict:
        """Every scalar of one sweep of one group: the step values, the update values (after the probes) and the
        framework's scales."""
        values = dict(self._step_values, perturb_scale=k * group["eps"], restore_scale=self._offset * -group["eps"])
        if kind == "update":
            values.update(self._update_values(group_index, group))
        return values

    def _torch_values(self, values, device, dtype) -> zo_rule.Values:
        """The scalars as 0-dim tensors of the compute dtype: each rounded once from double, filled on the device
        (torch.full does not synchronise); the update values before the probes end are NaN (unused)."""
        out = {}
        for name in self.step_values + self.update_values + zo_rule.FRAMEWORK_SCALARS:
            v = values.get(name, float("nan"))
            if name == "ok":
                out[name] = v.to(device) if torch.is_tensor(v) else torch.ones((), dtype=torch.bool, device=device)
            elif torch.is_tensor(v):
                out[name] = v.to(device, dtype)
            else:
                out[name] = torch.full((), float(v), dtype=dtype, device=device)
        return zo_rule.Values("the step values", out)

    # -- sweeps
    def _sweep(self, kind, k=0, carry=False):
        """One pass over the trainable tensors.  kind: "perturb" θ += k·ε·u; "restore" the same, or the stash;
        "update" the restore fused with the update (and, with carry, the next step's +ε·u': fused tensors only)."""
        self.sweeps += 1
        if self.timings is None:
            return self._sweep_now(kind, k, carry)
        begin = time.perf_counter()
        self._sweep_now(kind, k, carry)
        self.timings.append((kind, time.perf_counter() - begin))

    def _sweep_now(self, kind, k, carry):
        layout = self._triton_layout()
        for sweeps in self._triton_devices(layout):
            sweeps.load(*self._triton_inputs(kind == "update"))
        if layout.graphable and self.cuda_graphs:
            # a sweep's launches depend only on the tensors and on constants (the kind, k, the probe offset, each
            # group's ε and direction); every per-step value is read from device memory, so one captured graph
            # serves every step.  The graph stores how many noise draws its capture counted.
            def capture():
                before = self.noise_calls
                self._sweep_tensors(kind, k, carry)
                drawn, self.noise_calls = self.noise_calls - before, before
                return drawn
            key = (kind, k, carry, self._offset, tuple((g["eps"], g["direction"]) for g in self.param_groups))
            drawn = self._triton_sweeps[layout.devices[0]].replay(key, layout.key, capture, layout.every)
            if drawn is not None:
                self.noise_calls += drawn
                self.replays += 1
                return
        self._sweep_tensors(kind, k, carry)

    def _sweep_tensors(self, kind, k, carry):
        kernels = self._cpu_kernels() if self.fast_paths else None
        first = kind == "perturb" and self._offset == 0
        jobs, writebacks, touched, arrays = [], [], [], {}
        for index, group_index, group, p in self._entries():
            if not p.requires_grad:
                continue  # frozen after construction: untouched, index kept so other directions don't shift
            data = local_part(p).detach()
            contiguous = data.is_contiguous()
            flat = (data if contiguous else data.contiguous()).view(-1)
            if not self._elementwise(p):
                continue  # swept by the method itself (_sweep_structured)
            stash = self._stashes(p) and (kind != "update" or self._restoring)
            if stash and first:
                buf = self._stash.get(p)
                if buf is None:
                    buf = self._stash[p] = torch.empty(flat.numel(), dtype=p.dtype, device=p.device)
                buf.copy_(flat)
            if stash and kind == "restore":
                flat.copy_(self._stash[p])
            elif self._triton_path(p):
                self._triton_sweep(kind, k, index, group_index, group, p, flat, stash, carry)
                touched += [data] if contiguous else []
            else:
                rule_kind = "perturb" if kind != "update" else "update_stash" if stash else "update"
                fast = kernels is not None and self._cpu_path(p, kernels)
                if fast:
                    key = (kind, group_index)
                    if key not in arrays:
                        arrays[key] = kernels.values_array(self._sweep_values(kind, k, group_index, group))
                    keys = kernels.keys_array([zo_noise.counter_key(self._seed, index, s)
                                               for s in range(len(self.streams))])
                    bufs = [self._buffer(p, name) for name in self.buffers]
                    mode = self._noise_mode(kind, group)
                    kept = self._kept_noise(p) if self.keep_direction else []
                size = group["chunk_numel"] or group["noise_block"]
                for start in range(0, flat.numel(), size):
                    n = min(size, flat.numel() - start)
                    if fast:
                        jobs.append(kernels.job(rule_kind, mode, flat, self._stash.get(p) if stash else None, bufs,
                                                kept, start, n, self.noise_offset(p) + start, keys, arrays[key]))
                        self.noise_calls += len(self.streams) if mode != "k" else 0
                    else:
                        self._torch_chunk(rule_kind, k, index, group_index, group, p, flat, start, n, stash)
                touched += [data] if fast and contiguous else []
            if not contiguous:
                writebacks.append((data, flat))  # also keeps the copy alive until the kernels have run
        _cpu().run(jobs) if jobs else None
        self._sweep_structured(kind, k, carry)
        for data, flat in writebacks:
            data.copy_(flat.view_as(data))
        if touched:  # the kernels wrote through raw pointers: tell autograd the tensors changed
            torch.autograd.graph.increment_version(touched)
        if self.keep_direction:
            self._kept_ready = True

    def _noise_mode(self, kind, group) -> str:
        gen = "g" if group["direction"] == "gaussian" else "r"
        if not self.keep_direction:
            return gen
        if self._kept_ready:
            return "k"
        return gen + "s" if kind != "update" else gen

    def _torch_chunk(self, rule_kind, k, index, group_index, group, p, flat, start, n, stash):
        """One chunk in torch operations: the definition the kernels reproduce bit for bit."""
        dtype = _compute_dtype(p.dtype)
        x = flat[start:start + n]
        noise = zo_rule.Values("the noise", {name: self._noise(index, group, p, start, n, i).to(dtype)
                                             for i, name in enumerate(self.streams)})
        state = {name: self._buffer(p, name)[start:start + n].to(dtype) for name in self.buffers}
        kind = "perturb" if rule_kind == "perturb" else "update"
        values = self._torch_values(self._sweep_values(kind, k, group_index, group), p.device, dtype)
        held = self._stash[p][start:start + n].to(dtype) if rule_kind == "update_stash" else None
        out = zo_rule.sweep(rule_kind, self.rule, x.to(dtype), noise, state, values, stash=held)
        x.copy_(out["x"])  # the single rounding back to the storage dtype
        for name in self.buffers:
            if name in out:
                self._buffer(p, name)[start:start + n].copy_(out[name])

    def _cpu_kernels(self):
        if not any(p.device.type == "cpu" for p in self._params()):
            return None
        return _cpu().kernels_for(self.rule, self.streams, self.buffers, self.step_values + self.update_values)

    def _cpu_path(self, p, kernels) -> bool:
        return (p.device.type == "cpu" and self._rng(p.device) == "counter"
                and kernels.supports(p.dtype, self.buffer_dtype(p) if self.buffers else None))

    # -- the fused CUDA sweeps (zo_triton)
    def _triton_path(self, p) -> bool:
        """Whether this tensor's sweep runs as one fused Triton kernel (CUDA, counter noise, no kept direction)."""
        if not self.fast_paths or self.keep_direction or self._rng(p.device) != "counter" or not self._elementwise(p):
            return False
        kernels = _triton()
        return kernels is not None and kernels.supports(p, self.buffer_dtype(p) if self.buffers else None)

    def _triton_layout(self):
        """Which tensors the fused kernels sweep and whether the sweeps can be captured as CUDA graphs (all fused,
        contiguous, on one CUDA device), cached per layout: which tensors are trainable, where and how they and
        their state buffers are stored, whether fast paths are on."""
        key = (self.fast_paths, tuple((local_part(p).data_ptr(), p.device, p.requires_grad, local_part(p).is_contiguous(),
                                       tuple(self.state[p][b].data_ptr() for b in self.buffers
                                             if b in self.state.get(p, {}))) for p in self._params()))
        if self._layout is None or self._layout.key != key:
            trainable = tuple(p for p in self._params() if p.requires_grad)
            fused = [p for p in trainable if self._triton_path(p)]
            every = trainable if trainable and len(fused) == len(trainable) else None
            devices = tuple(dict.fromkeys(p.device for p in fused))
            graphable = (every is not None and len(devices) == 1 and devices[0].type == "cuda"
                         and all(local_part(p).is_contiguous() for p in every))
            self._layout = _Layout(key, every, devices, graphable)
        return self._layout

    def _triton_devices(self, layout):
        for device in layout.devices:
            sweeps = self._triton_sweeps.get(device)
            if sweeps is None:
                sweeps = self._triton_sweeps[device] = _triton().DeviceSweeps(
                    device, self.rule, self.streams, self.buffers, self.step_values, self.update_values,
                    sum(len(g["params"]) for g in self.param_groups), len(self.param_groups))
            yield sweeps

    def _triton_inputs(self, update: bool) -> tuple:
        """What the fused kernels read from the device: (seed, step values, next seed, next step values, the update
        values of each group or None)."""
        next_seed, next_values = self._next or (0, None)
        groups = [self._update_values(i, g) for i, g in enumerate(self.param_groups)] if update else None
        return self._seed, self._step_values, next_seed, next_values, groups

    def _triton_sweep(self, kind, k, index, group_index, group, p, flat, stash, carry=False):
        """The sweep of one whole tensor by one fused kernel (the same arithmetic as the torch path)."""
        self.noise_calls += len(self.streams) * (2 if carry else 1)  # a carried update also draws the next direction
        rule_kind = "perturb" if kind != "update" else "update_stash" if stash else "update"
        self._triton_sweeps[p.device].sweep(
            rule_kind, flat, index=index, group_index=group_index, gaussian=group["direction"] == "gaussian",
            perturb_scale=(k if kind != "update" else 1) * group["eps"], restore_scale=self._offset * -group["eps"],
            stash=self._stash[p] if stash else None, buffers=[self._buffer(p, b) for b in self.buffers],
            carry=carry, pos=self.noise_offset(p))

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
        t = self.step_count
        self._begun = True
        self._use_direction(0)
        self._step_values = self.values_at(t)
        missing = set(self.step_values) - set(self._step_values)
        if missing:
            raise ValueError(f"{type(self).__name__}.values_at gave no {sorted(missing)}")

    def _use_direction(self, q: int):
        """Make direction q of this step the one the sweeps draw (its seed: zo_noise.direction_seed)."""
        self._seed = zo_noise.direction_seed(self.param_groups[0]["seed"], self.step_count, q)
        if q != self._direction:
            self._kept_ready = False  # a kept direction holds the noise of one direction only
        self._direction = q

    def _check_direction(self, q: int):
        limit, why = self.direction_bound()
        if limit is not None and q >= limit:
            raise ValueError(f"{self.title} takes {limit} direction(s) a step ({why}); direction {q} refused")

    def _to_direction(self, q: int):
        """Before probing direction q: return to θ from another direction's perturbation (one sweep)."""
        self._check_direction(q)
        if not self._begun:
            self._begin_step()
        if q != self._direction:
            if self.carry_perturbation:
                raise ValueError("carry_perturbation carries the perturbation of one direction into the next step; "
                                 "it does not combine with several directions per step: drop one of them")
            if self._offset:
                self._sweep("restore", -self._offset)
                self._offset = 0
            self._use_direction(q)

    def _record(self, q: int, g, lp, lm):
        # low-precision losses are differenced in fp32 (at least); fp64 losses keep fp64
        g, lp, lm = (torch.as_tensor(x).detach() for x in (g, lp, lm))
        g, lp, lm = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (g, lp, lm))
        old = self._measured.get(q)
        self._measured[q] = (g, lp, lm, 1) if old is None else (old[0] + g, old[1] + lp, old[2] + lm, old[3] + 1)
        self._n_probes += 1
        return lp, lm

    def center_loss(self, closure):
        """closure() at θ itself (HiZOO's ℓ0, ZO-SGD-Cons's L(θ), FZOO's l0), before or between probes: restores θ
        first where a perturbation rests on the parameters.  Accumulated like the probes (mean over the calls)."""
        if not self._begun:
            self._begin_step()
        if self._offset:
            self._sweep("restore", -self._offset)
            self._offset = 0
        try:
            loss = torch.as_tensor(closure()).detach()
        except BaseException:
            self._abort()
            raise
        loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
        self._center = (loss, 1) if self._center is None else (self._center[0] + loss, self._center[1] + 1)
        return loss

    @torch.no_grad()
    def probe(self, closure, direction: int = 0):
        """Evaluate closure() at θ+εu and θ-εu for direction `direction` of this step (0: the step's own seed);
        accumulate g=(ℓ+-ℓ-)/(2ε) for it.  Probes of one direction average (gradient accumulation); step() applies
        each direction's mean (probe_directions probes several on one batch)."""
        self._to_direction(direction)
        eps = self.param_groups[0]["eps"]
        try:
            self._perturb(1 - self._offset)  # from θ (+1) or from θ-εu (+2)
            lp = torch.as_tensor(closure()).detach()
            self._perturb(-2)
            lm = torch.as_tensor(closure()).detach()
        except BaseException:
            self._abort()
            raise
        lp, lm = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (lp, lm))
        return self._record(direction, (lp - lm) / (2 * eps), lp, lm)

    @torch.no_grad()
    def probe_one_sided(self, closure, direction: int, center):
        """closure() at θ+εu for direction `direction`, then back to θ; g = (ℓ+ - center)/ε (FZOO's estimate, with
        center = ℓ(θ) from center_loss)."""
        self._to_direction(direction)
        try:
            self._perturb(1 - self._offset)
            lp = torch.as_tensor(closure()).detach()
            self._sweep("restore", -self._offset)  # from the stash if any: the next direction starts at θ exactly
            self._offset = 0
        except BaseException:
            self._abort()
            raise
        lp = lp.to(torch.promote_types(lp.dtype, torch.float32))
        return self._record(direction, (lp - center) / self.param_groups[0]["eps"], lp, center)[0]

    @torch.no_grad()
    def probe_directions(self, closure, directions):
        """probe() each of these directions of this step on the closure's batch; returns the mean ℓ+."""
        losses = [self.probe(closure, direction=q)[0] for q in directions]
        return torch.stack(losses).mean()

    def record_direction(self, direction: int, projected_grad, loss_plus=float("nan"), loss_minus=float("nan"),
                         probes: int = 1):
        """Hand in direction `direction` of this step measured elsewhere (another rank, same batch and seed): sums
        over `probes` probes as `measurements` gives them, so step() applies it bit for bit as the probed one."""
        if direction in self._measured:
            raise ValueError(f"direction {direction} of this step was already measured here; record each direction "
                             "once (probe it or record it)")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes={probes!r}: the number of probes the sums cover, an int >= 1")
        self._check_direction(direction)
        if not self._begun:
            self._begin_step()
        self._record(direction, projected_grad, loss_plus, loss_minus)
        self._measured[direction] = (*self._measured[direction][:3], probes)
        self._n_probes += probes - 1

    def measurements(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """{direction: (sum of g, sum of ℓ+, sum of ℓ-, probes)} of this step so far: what record_direction takes."""
        return dict(sorted(self._measured.items()))

    def measured_directions(self) -> dict[int, torch.Tensor]:
        """{direction: projected gradient} of this step so far (the mean over its probes)."""
        return {q: g / n for q, (g, _, _, n) in self.measurements().items()}

    def _abort(self):
        # the closure failed: put θ back so an exception never leaves the model perturbed
        if self._offset:
            self._sweep("restore", -self._offset)
        self._reset_step()

    def _finite(self, g) -> torch.Tensor:
        """Whether an update may be applied: g finite, and L(θ) too where the method measured it (on device)."""
        ok = torch.isfinite(g)
        return ok if self._center is None else ok & torch.isfinite(self._center[0])

    def _direction_weight(self) -> float:
        """Each direction's update takes lr·weight: 1/Q over Q directions, the average of their estimates."""
        return 1.0 / max(len(self._measured), 1)

    @torch.no_grad()
    def step(self, closure=None):
        """Optional probe(closure), then the update.  One direction: the update fused with the restore (one sweep).
        Several: back to θ, then direction by direction in increasing order, the method's update of that direction
        with its g and lr/Q (weight decay λ·lr/Q), so MeZO's Q-direction step is θ - lr·mean_q(g_q·u_q) (only methods
        without state take several: direction_bound).  Returns mean ℓ+."""
        if closure is not None:
            self.probe(closure)
        if not self._measured:
            raise RuntimeError("step() needs a closure or at least one probe() in this step")
        glob = self._global_state()
        t = glob["zo_step"]
        grads = self.measured_directions()
        if list(grads) == [self._direction]:
            g = grads[self._direction]
            self._g, self._ok = g, self._finite(g)  # ok stays on device: no host sync on the torch path
            fuse_carry = self.carry_perturbation and self._triton_layout().every is not None
            if fuse_carry:
                self._next = (step_seed(self.param_groups[0]["seed"], t + 1), self.values_at(t + 1))
            self._sweep("update", carry=fuse_carry)
            skipped = ~self._ok
        else:
            fuse_carry = False
            if self._offset:
                self._sweep("restore", -self._offset)
                self._offset = 0
            self._restoring, skipped = False, None  # θ itself now: no stash, no restore inside the updates
            for q, g in grads.items():
                self._use_direction(q)
                self._g, self._ok, self._update_cache = g, self._finite(g), {}
                self._sweep("update")
                skipped = ~self._ok if skipped is None else skipped | ~self._ok
        self._finish_step(t, skipped, torch.stack(list(grads.values())).mean())
        if self.carry_perturbation:
            self._begin_step()
            if fuse_carry:
                self._offset = 1
            else:
                self._perturb(1)
        return self.last_loss_plus

    def _finish_step(self, t, skipped, g):
        """The bookkeeping after the update: step count, skips, the logged values; the next step starts clean."""
        glob = self._global_state()
        glob["zo_skipped"] = glob["zo_skipped"] + skipped.to(glob["zo_skipped"].device, torch.int64)
        glob["zo_step"] = t + 1
        measured = self.measurements().values()  # in direction order, the same on every rank
        n = sum(m[3] for m in measured)
        self.last_projected_grad = g
        self.last_loss_plus = sum(m[1] for m in measured) / n
        self.last_loss_minus = sum(m[2] for m in measured) / n
        self.last_schedule = self.schedule_values(t)
        self._reset_step()


class _Layout(NamedTuple):
    key: tuple
    every: tuple | None       # the trainable tensors if every one is swept by a fused kernel
    devices: tuple            # the devices of the fused tensors
    graphable: bool           # all fused, contiguous, on one CUDA device
