"""The protocol of the zeroth-order optimizers (torch.optim.Optimizer subclasses) that every method shares.

An element-wise ZO method is one small class: its noise `streams`, its per-parameter state `buffers`, its per-step
scalars (`step_values`, known when the step begins; `update_values`, derived from the projected gradient g after the
probes) and one pure per-element `rule(noise, state, s) -> zo.rule.Rule(direction, step, state)`.  The class hands
these to the sweeps (zo.sweeps) as one frozen zo.rule.SweepSpec; the sweeps choose the backend (C kernels on CPU,
fused Triton kernels on CUDA, torch operations elsewhere: the reference the kernels equal bit for bit).  The noise is
defined in zo.noise.  `ZOOptimizer` is the protocol: probe / step / settle, skipped steps, the stash, the kept
direction, the carried perturbation, state and checkpoints.  probe_mode forward / onepass (zo.probe, attach(model)):
no perturb or restore sweep (the offset tells the forwards which sign to apply); the update sweeps θ itself.

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
  Without a stash the perturb/restore round trip is not bit-exact (x+εu rounds away the low bits of every
  |x| << ε|u|): up to one ulp of θ per step, ~1e-7 relative in fp32, ~4e-3 in bf16 (larger than typical ZO updates).
  Hence exact_restore=None (default) stashes a copy of θ at the first probe for tensors below fp32 only and restores
  those bit-exactly; True stashes every tensor, False none (MeZO memory).
  keep_direction=True (opt-in, small models) keeps the step's noise streams in float32 buffers (one per stream): one
  noise sweep per step instead of three.
  16-bit weights: last_rounded_away, the share of updates rounded to nothing; stochastic_rounding=True (opt-in) rounds
  them at random instead of to nearest, unbiased and reproducible from the seed (zo.sweeps).

Methods that are not one element-wise rule (candidate updates, a loss at θ, one-sided probes, low-rank directions)
use the public calls below, never the core's private members:
  center_loss(closure) / center()       the loss at θ this step (restores θ first) / its mean so far
  probe_one_sided(closure, q, center)   ℓ(θ+εu_q) and back to θ;  g = (ℓ+ - center)/ε
  measurements() / measured_directions() what was measured this step, per direction
  direction, probes, check_direction(q) the direction being swept, the probes made this step, the bound on q
  finite(g)                             whether an update may be applied (override to add a condition)
  apply_update(g) / restore()           the update sweep with g (from the stash where kept) / θ back
  finish_step(skipped, g)               the step's bookkeeping, for a method that applied its update itself
  noise(index, stream, start, count, ...) elements of a counter stream: noise for a tensor or a factor
  elementwise(p) / sweep_tensor(s)      which tensors the rule sweeps / the sweep of the others (zo.sweeps.TensorSweep)
  perturbed(p, k)                       θ+k·ε·u of one tensor, out of place (p is only read)

Arithmetic of a sweep (zo.rule.sweep), in the compute dtype T (fp64 for fp64 tensors, else fp32), one rounding per
operation: perturb x <- x + u·(k·ε); update y <- x + u·(-o·ε) (o = offset of the probes) or the stash,
x <- y·(1-lr·λ) + step.  Scalars are rounded once from double to T.
"""
from __future__ import annotations

from itertools import chain

import torch

import parallel
from zo import hparams
from zo import noise as zo_noise
from zo import probe as zo_probe
from zo import rule as zo_rule
from zo.groups import check_group, param_groups_for_model
from zo.noise import DIRECTIONS, NOISE_BLOCK, RNGS, direction_seed, sample_direction, step_seed
from zo.rule import Rule, SweepSpec
from zo.sweeps import Sweeper, SweepStep, TensorSweep, kernel_builds, kernels_available, triton_available

__all__ = ["NOISE_BLOCK", "DIRECTIONS", "RNGS", "step_seed", "direction_seed", "sample_direction",
           "param_groups_for_model", "ZOOptimizer", "Rule", "SweepSpec", "TensorSweep", "kernels_available",
           "triton_available", "kernel_builds"]

_GLOBAL_STATE = ("zo_kind", "zo_step", "zo_skipped")


# ---------------------------------------------------------------------------------------- optimizer
class ZOOptimizer(torch.optim.Optimizer):
    """The protocol of a ZO method (the module docstring has the arithmetic and the calls for structured methods).

    A method sets `name` (its --zo_optim value), `streams`, `buffers`, `step_values`, `update_values` and `rule`,
    computes its scalars in `values_at(t)` (host floats, at the step's begin) and `values_from_g(g, group)`
    (float64 0-dim tensors on g's device: no host synchronisation), and declares its hyper-parameters
    (`hyperparameters`, zo.hparams).  Each sweep goes tensor by tensor and, inside a tensor, chunk by chunk
    (`chunk_numel`, default `noise_block` elements), so no temporary is larger than a chunk."""

    name = "zo"
    title = "ZO"
    forwards = 2                      # forward passes per step (one probe)
    default_directions, min_directions = 1, 1   # directions a step unless told (--zo_num_directions), the fewest
    forwards_per_direction = 2        # what one more direction a step costs (a two-point probe)
    max_directions: int | None = None  # None: any number, unless the method keeps state (direction_bound)
    max_directions_why = ""            # and why not more, where a method sets it
    mode_defaults: dict = {}          # training mode (ft, lora, prefix) -> zo.hparams.ModeDefault (LR, ε, source)
    hyperparameters: tuple = ()       # the method's own zo.hparams.Hyper declarations (flags derive from them)
    streams: tuple[str, ...] = ()     # noise streams per tensor (stream i of tensor `index` is zo.noise's stream i)
    buffers: tuple[str, ...] = ()     # per-parameter state, one element per parameter element
    buffer_note = "in the parameter dtype"
    buffer_init: dict[str, float] = {}   # a buffer's first value where not 0 (HiZOO's Σ starts at 1)
    extra_state: tuple[str, ...] = ()    # further per-parameter state tensors a method keeps (any shape, its dtype)
    step_values: tuple[str, ...] = ()
    update_values: tuple[str, ...] = ()
    rule = None

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, keep_direction=False,
                 rng="auto", carry_perturbation=False, cuda_graphs=True, stochastic_rounding=False,
                 probe_mode="inplace", **hyperparameters):
        for keyword, value in hparams.take(self, hyperparameters).items():
            setattr(self, keyword, value)   # each declared hyper-parameter, default applied and range checked
        if hyperparameters:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(hyperparameters)} "
                            f"(its hyper-parameters: {', '.join(h.arg for h in hparams.declarations(type(self)))})")
        if rng not in RNGS:
            raise ValueError(f"Invalid rng: {rng!r} (choose from {RNGS})")
        if keep_direction and carry_perturbation:
            raise ValueError("keep_direction and carry_perturbation do not combine: a kept direction already costs "
                             "one noise sweep per step; choose one")
        if stochastic_rounding and self.stochastic_rounding_refused():
            raise ValueError(self.stochastic_rounding_refused())
        clash = set(self.step_values + self.update_values) & set(zo_rule.FRAMEWORK_SCALARS)
        if clash:
            raise TypeError(f"{type(self).__name__} names step values {sorted(clash)}, which the framework sets")
        self.rng, self.probe_mode = rng, zo_probe.check_mode(probe_mode, carry_perturbation, keep_direction)
        self.carry_perturbation, self.cuda_graphs = bool(carry_perturbation), bool(cuda_graphs)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, direction=direction,
                        chunk_numel=chunk_numel, noise_block=noise_block)
        super().__init__(params, defaults)
        self.exact_restore = None if exact_restore is None else bool(exact_restore)
        self.keep_direction = bool(keep_direction)
        self._sweeper = Sweeper(self.sweep_spec(), self, rng=rng, exact_restore=self.exact_restore,
                                keep_direction=self.keep_direction, cuda_graphs=self.cuda_graphs,
                                buffer_init=self.buffer_init, stochastic_rounding=stochastic_rounding)
        self._seed, self._step_values, self._forward = 0, {}, None
        self.last_projected_grad = self.last_loss_plus = self.last_loss_minus = self.last_rounded_away = None
        self.last_schedule: dict[str, float] = {}
        self._global_state()
        self._reset_step()

    # -- switches and diagnostics, held by the sweeps (not saved)
    fast_paths = property(lambda self: self._sweeper.fast_paths,
                          lambda self, on: setattr(self._sweeper, "fast_paths", bool(on)),
                          doc="False: every tensor takes the torch path (the reference the kernels must equal).")
    timings = property(lambda self: self._sweeper.timings, lambda self, value: setattr(self._sweeper, "timings", value),
                       doc="None, or a list to which each sweep appends (kind, seconds of host time) (benchmarks).")
    sweeps = property(lambda self: self._sweeper.count, doc="Sweeps run.")
    forward_probe = property(lambda self: self._forward, doc="The zo.probe.ForwardProbe of attach(model), or None.")
    perturbation = property(lambda self: self._offset, doc="k of θ + k·ε·u, where the parameters rest (in place) or "
                            "where the forwards see them (probe_mode forward).")
    noise_calls = property(lambda self: self._sweeper.noise_calls, doc="Noise draws (per tensor, stream and chunk).")
    sweeper = property(lambda self: self._sweeper, doc="The zo.sweeps.Sweeper (zo.offload defers its updates).")
    replays = property(lambda self: self._sweeper.replays, doc="Sweeps run as a replayed CUDA graph.")

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
    def sweeps_itself(cls) -> bool:
        """Whether it sweeps some tensors itself (sweep_tensor), outside the update sweep that zo.offload defers."""
        return cls.sweep_tensor is not ZOOptimizer.sweep_tensor

    @classmethod
    def stochastic_rounding_refused(cls) -> str:
        """Why the method cannot round its updates stochastically ('' where it can): it sweeps some tensors itself."""
        return "" if not cls.sweeps_itself() else (
            f"{cls.title} writes its low-rank updates itself, not through the element-wise update sweep that rounds "
            "stochastically: use a method with element-wise directions, or round to nearest")

    @classmethod
    def sweep_spec(cls) -> SweepSpec:
        """The method as the sweeps and the kernels see it: its rule and the names of what the rule reads."""
        return SweepSpec(cls.rule, tuple(cls.streams), tuple(cls.buffers), tuple(cls.step_values),
                         tuple(cls.update_values))

    @classmethod
    def memory(cls) -> str:
        """The memory this method adds to inference, for --help and the logs."""
        return (f"{cls.title}: +{len(cls.buffers)} x trainable params ({', '.join(cls.buffers)}, {cls.buffer_note})"
                if cls.buffers else f"{cls.title}: no memory beyond the model (inference memory)")

    @classmethod
    def compose(cls, parts: dict, *, max_steps: int) -> dict:
        """Constructor keywords built from hyper-parameters declared with `via` (flag values; a method whose values
        depend on the run's length, e.g. ZO-AdaMU's schedule, builds them here)."""
        if parts:
            raise TypeError(f"{cls.__name__} declares {sorted(parts)} with `via` but defines no compose()")
        return {}

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

    def elementwise(self, p) -> bool:
        """Whether the rule's sweeps (and their C / Triton kernels) handle p; a method with structured directions
        (low-rank factors) answers False for the tensors it sweeps itself in sweep_tensor."""
        return True

    def sweep_tensor(self, s: TensorSweep) -> None:
        """The sweep of one tensor that `elementwise` refuses (zo.sweeps.TensorSweep: the stash is handled)."""
        raise NotImplementedError(f"{type(self).__name__} refuses element-wise sweeps of some tensor but defines no "
                                  "sweep_tensor")

    def noise_offset(self, p: torch.Tensor) -> int:
        """The noise position of the first element this process holds of p: 0 for a whole tensor; for a shard of a
        DTensor (FSDP2 shards dimension 0 over the ranks) its offset in the flattened full tensor, so a sharded run
        draws exactly the unsharded run's directions."""
        return parallel.shard_offset(p) if isinstance(p, parallel.DTensor) else 0

    # -- validation / bookkeeping
    def add_param_group(self, group):
        super().add_param_group(group)
        check_group(self.param_groups[-1], self.param_groups[:-1])

    def _params(self):
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def _global_state(self) -> dict:
        # global bookkeeping lives in the state of the first parameter so torch/HF checkpointing carries it
        first = next(iter(self._params()))
        st = self.state[first]
        if "zo_kind" not in st:
            st.update(zo_kind=self.name, zo_step=0, zo_skipped=torch.zeros((), dtype=torch.int64, device=first.device))
        return st

    step_count = property(lambda self: self._global_state()["zo_step"], doc="Steps taken, skipped ones included.")
    skipped_steps = property(lambda self: self._global_state()["zo_skipped"],
                             doc="Steps skipped (g not finite), an int64 0-dim tensor on the device (no host sync).")

    def memory_buffers(self) -> dict[str, int]:
        """Elements held beside the model now: the state buffers, the exact-restore stash and the kept noise."""
        held = {name: sum(s[name].numel() for s in self.state.values() if torch.is_tensor(s.get(name)))
                for name in self.buffers + self.extra_state}
        held.update(self._sweeper.held())
        return {k: v for k, v in held.items() if v}

    def _reset_step(self):
        self._n_probes, self._offset, self._begun = 0, 0, False
        self._measured: dict[int, tuple] = {}   # direction -> (Σg, Σℓ+, Σℓ-, probes) of this step
        self._center = None                      # (Σℓ(θ), calls) of this step (center_loss)
        self._direction, self._restoring = 0, True
        self._sweeper.new_direction()
        self._g, self._ok, self._update_cache = None, None, {}
        self._next = None  # (seed, step values) of the next step, for an update that carries its perturbation

    def state_dict(self):
        if self._n_probes:
            raise RuntimeError("state_dict() between probe() and step(): parameters are perturbed")
        return super().state_dict()

    def load_state_dict(self, state_dict):
        if self.carried:
            raise RuntimeError("load_state_dict() while the next step's perturbation rests on the parameters: "
                               "call settle() first")
        saved = next((v for v in state_dict["state"].values() if isinstance(v, dict) and "zo_kind" in v), None)
        kind = saved["zo_kind"] if saved is not None else "<not a ZO optimizer>"
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
        self.state[first].update(zo_kind=kind, zo_step=int(saved["zo_step"]),
                                 zo_skipped=saved["zo_skipped"].to(first.device, torch.int64, copy=True))
        self._reset_step()

    # -- noise
    def noise(self, index: int, stream: int, start: int, count: int, *, group: dict, device,
              seed: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of the counter stream of tensor `index`, stream `stream`, float32: noise for
        a tensor or for a factor of one (low-rank methods), drawn for the direction being swept (or for `seed`, a
        step seed of zo.noise) in the group's distribution; by the C kernels on CPU where they are built."""
        key = zo_noise.counter_key(self._seed if seed is None else seed, index, stream)
        return self._sweeper.counter_noise(key, start, count, group["direction"], device)

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

    # -- sweeps
    def _sweep(self, kind, k=0, carry=False):
        """One pass over the trainable tensors (zo.sweeps): "perturb" θ += k·ε·u; "restore" the same, or the stash;
        "update" the restore fused with the update (and, with carry, the next step's +ε·u')."""
        forward = self._forward is not None   # forward-time probes: θ is never written, only updated
        if forward and kind != "update":
            return
        step = SweepStep(self._seed, 0 if forward else self._offset, self._step_values, self._update_values,
                         self._next, self._restoring and not forward)
        self._sweeper.run(kind, step, k=k, carry=carry)

    def perturbed(self, p: torch.Tensor, k: float = 1.0) -> torch.Tensor:
        """θ + k·ε·u of tensor p for the direction being swept, as a new tensor: p is only read, and the values are
        those an in-place perturbation of θ by k would write (the sweeps' out-of-place form)."""
        if not self._begun:
            self._begin_step()
        return self._sweeper.perturbed(SweepStep(self._seed, 0, self._step_values), p, k)

    def perturbed_rows(self, p: torch.Tensor, k: float, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of perturbed(p, k), p seen as (p.shape[0], -1), drawing only their noise (embeddings)."""
        if not self._begun:
            self._begin_step()
        return self._sweeper.perturbed_rows(SweepStep(self._seed, 0, self._step_values), p, k, rows)

    def attach(self, model) -> None:
        """probe_mode forward / onepass: zo.probe.ForwardProbe wraps the model's modules (refusing what it cannot
        handle) and makes the state buffers (`buffer(p, name)`) before any probe."""
        self._forward = zo_probe.ForwardProbe(model, self, self._sweeper.buffer)

    # -- protocol
    def _perturb(self, k):
        if k:
            self._sweep("perturb", k)
            self._offset += k

    @property
    def carried(self) -> bool:
        """Whether the parameters rest at θ+εu of the next step (carry_perturbation) and need settle()."""
        return self._n_probes == 0 and self._offset != 0

    @property
    def direction(self) -> int:
        """The direction of this step that the sweeps draw now."""
        return self._direction

    @property
    def probes(self) -> int:
        """Probes made in this step so far."""
        return self._n_probes

    @torch.no_grad()
    def settle(self) -> None:
        """Restore θ where a carried perturbation rests on the parameters; nothing to do otherwise."""
        if self._n_probes:
            raise RuntimeError("settle() between probe() and step(): finish the step first")
        if self._offset:
            self._sweep("restore", -self._offset)
            self._reset_step()

    @torch.no_grad()
    def restore(self) -> None:
        """θ back on the parameters: from the stash where one is kept (bit for bit), else by undoing the perturbation
        that rests on them."""
        self._sweep("restore", -self._offset)
        self._offset = 0

    def _begin_step(self):
        if self._forward is None and self.probe_mode != "inplace":
            raise RuntimeError(f"probe_mode {self.probe_mode!r}: call attach(model) before the first probe")
        t = self.step_count
        self._begun = True
        self._use_direction(0)
        self._step_values = self.values_at(t)
        missing = set(self.step_values) - set(self._step_values)
        if missing:
            raise ValueError(f"{type(self).__name__}.values_at gave no {sorted(missing)}")

    def _use_direction(self, q: int):
        """Make direction q of this step the one the sweeps draw (its seed: zo.noise.direction_seed)."""
        self._seed = zo_noise.direction_seed(self.param_groups[0]["seed"], self.step_count, q)
        if q != self._direction:
            self._sweeper.new_direction()  # a kept direction holds the noise of one direction only
        self._direction = q

    def check_direction(self, q: int):
        """Refuse direction q where the method takes fewer directions a step (direction_bound)."""
        limit, why = self.direction_bound()
        if limit is not None and q >= limit:
            raise ValueError(f"{self.title} takes {limit} direction(s) a step ({why}); direction {q} refused")

    def _to_direction(self, q: int):
        """Before probing direction q: return to θ from another direction's perturbation (one sweep)."""
        self.check_direction(q)
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
            self.abort()
            raise
        loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
        self._center = (loss, 1) if self._center is None else (self._center[0] + loss, self._center[1] + 1)
        return loss

    def center(self) -> torch.Tensor | None:
        """The mean of this step's center_loss() calls, or None where it measured none."""
        return None if self._center is None else self._center[0] / self._center[1]

    @torch.no_grad()
    def probe(self, closure, direction: int = 0):
        """Evaluate closure() at θ+εu and θ-εu for direction `direction` of this step (0: the step's own seed);
        accumulate g=(ℓ+-ℓ-)/(2ε) for it.  Probes of one direction average (gradient accumulation); step() applies
        each direction's mean (probe_directions probes several on one batch)."""
        self._to_direction(direction)
        eps = self.param_groups[0]["eps"]
        try:
            if self.probe_mode == "onepass":   # one forward of the doubled batch: (ℓ+, ℓ-)
                lp, lm = (torch.as_tensor(x).detach() for x in self._forward.both(closure))
            else:
                self._perturb(1 - self._offset)  # from θ (+1) or from θ-εu (+2)
                lp = torch.as_tensor(closure()).detach()
                self._perturb(-2)
                lm = torch.as_tensor(closure()).detach()
        except BaseException:
            self.abort()
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
            self.abort()
            raise
        lp = lp.to(torch.promote_types(lp.dtype, torch.float32))
        return self._record(direction, (lp - center) / self.param_groups[0]["eps"], lp, center)[0]

    @torch.no_grad()
    def probe_directions(self, closure, directions):
        """probe() each of these directions of this step on the closure's batch; returns the mean ℓ+."""
        return torch.stack([self.probe(closure, direction=q)[0] for q in directions]).mean()

    def record_direction(self, direction: int, projected_grad, loss_plus=float("nan"), loss_minus=float("nan"),
                         probes: int = 1):
        """Hand in direction `direction` of this step measured elsewhere (another rank, same batch and seed): sums
        over `probes` probes as `measurements` gives them, so step() applies it bit for bit as the probed one."""
        if direction in self._measured:
            raise ValueError(f"direction {direction} of this step was already measured here; record each direction "
                             "once (probe it or record it)")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes={probes!r}: the number of probes the sums cover, an int >= 1")
        self.check_direction(direction)
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

    def abort(self):
        """Give up this step (a closure failed): θ back, so an exception never leaves the model perturbed, and the
        step's measurements forgotten."""
        if self._offset:
            self._sweep("restore", -self._offset)
        self._reset_step()

    def finite(self, g) -> torch.Tensor:
        """Whether an update may be applied: g finite, and L(θ) too where the method measured it (on device)."""
        return torch.isfinite(g) if self._center is None else torch.isfinite(g) & torch.isfinite(self._center[0])

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
        t = self.step_count
        grads = self.measured_directions()
        if list(grads) == [self._direction]:
            g = grads[self._direction]
            self._g, self._ok = g, self.finite(g)  # ok stays on device: no host sync on the torch path
            fuse_carry = self.carry_perturbation and self._sweeper.fused_layout().every is not None
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
                self._g, self._ok, self._update_cache = g, self.finite(g), {}
                self._sweep("update")
                skipped = ~self._ok if skipped is None else skipped | ~self._ok
        self.finish_step(skipped, torch.stack(list(grads.values())).mean())
        if self.carry_perturbation:
            self._begin_step()
            if fuse_carry:
                self._offset = 1
            else:
                self._perturb(1)
        return self.last_loss_plus

    @torch.no_grad()
    def apply_update(self, g) -> torch.Tensor:
        """The update sweep of this step's direction with projected gradient g (from the stash where one is kept, so
        a repeated call starts from θ again; else from where the probes left θ); returns finite(g), on device.
        For a method that judges candidate updates (ZO-SGD-Cons) before it finishes the step itself."""
        self._g, self._ok, self._update_cache = g, self.finite(g), {}
        self._sweep("update")
        self._offset = 0
        return self._ok

    def finish_step(self, skipped, g):
        """The bookkeeping after the update (`skipped`: a bool tensor, `g` the logged projected gradient): step
        count, skips, the logged values; the next step starts clean."""
        state = self._global_state()
        t = state["zo_step"]
        state["zo_skipped"] = state["zo_skipped"] + skipped.to(state["zo_skipped"].device, torch.int64)
        state["zo_step"] = t + 1
        measured = self.measurements().values()  # in direction order, the same on every rank
        n = sum(m[3] for m in measured)
        self.last_projected_grad = g
        self.last_loss_plus = sum(m[1] for m in measured) / n
        self.last_loss_minus = sum(m[2] for m in measured) / n
        self.last_schedule, self.last_rounded_away = self.schedule_values(t), self._sweeper.rounded_away()
        self._reset_step()
