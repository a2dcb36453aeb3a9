"""Zeroth-order optimizers: MeZO (ZO-SGD) and ZO-AdaMU, as torch.optim.Optimizer subclasses.

Noise definition (what a seed means; everything else may change without changing the directions):
  * step seed  = step_seed(seed, t), t = 0-based count of completed steps.  A pure function, so no RNG
    state is saved and a resumed run replays the same directions.
  * tensor `index` = position of the parameter in the optimizer (groups in order, then params).
  * the flattened tensor is cut into blocks of `noise_block` elements; block b of stream s is
    `normal_()` (or ±1) of a float32 vector of that block's size, drawn by a dedicated torch.Generator
    on the parameter's device seeded with mix(step seed, index, b, s).  MeZO uses stream 0; ZO-AdaMU
    uses stream 0 for n1 and stream 1 for n2.  Processing chunks (`chunk_numel`) are whole numbers of
    blocks, so the chunk size bounds temporaries without changing the noise.  The noise depends on the
    device type (mt19937 on CPU, Philox on CUDA) and, on CPU, torch keeps only 32 bits of each seed.

Step protocol (sweep = one pass over the trainable tensors regenerating the noise):
  probe(closure): first probe of a step +εu, -2εu (2 sweeps); later probes +2εu, -2εu (2 sweeps);
                  parameters rest at θ-εu between probes.
  step():         restore and update fused in one sweep, θ <- θ + εu - lr·(update).
  Without a stash the perturb/restore round trip is not bit-exact, and no memory-free scheme can be:
  x+εu rounds away the low bits of every |x| << ε|u|, so distinct x collide.  The error is up to
  about one ulp of θ per step, for a large share of the elements: ~1e-7 relative in fp32 (negligible
  next to updates), ~4e-3 relative in bf16 (larger than typical ZO updates, and it random-walks).  Hence
  exact_restore=None (default) stashes a copy of θ at the first probe only for tensors below fp32 and
  restores those bit-exactly; True stashes every tensor (bit-exact fp32 too), False none (MeZO memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import nn

__all__ = ["NOISE_BLOCK", "DIRECTIONS", "step_seed", "sample_direction", "anneal", "AdaMUSchedule",
           "param_groups_for_model", "ZOOptimizer", "MeZO", "ZOAdaMU"]

NOISE_BLOCK = 1 << 20
DIRECTIONS = ("gaussian", "rademacher")
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


def _fill_noise(out, gen, seed, index, start, stream, direction, block):
    """Write elements [start, start+len(out)) of the noise of tensor `index` into float32 `out`."""
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


def sample_direction(seed: int, index: int, numel: int, *, stream: int = 0, direction: str = "gaussian",
                     noise_block: int = NOISE_BLOCK, device="cpu") -> torch.Tensor:
    """The whole flat float32 noise of tensor `index` for step seed `seed` (for references and tests)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
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
    Subclasses define the direction u, the update direction w (update = g·w + λθ) and post-update state."""

    kind = "zo"

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, keep_direction=False):
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, direction=direction,
                        chunk_numel=chunk_numel, noise_block=noise_block)
        super().__init__(params, defaults)
        self.exact_restore = None if exact_restore is None else bool(exact_restore)
        self.keep_direction = bool(keep_direction)
        self._gens: dict[torch.device, torch.Generator] = {}
        self._stash: dict[torch.Tensor, torch.Tensor] = {}
        self._kept: dict[torch.Tensor, tuple] = {}
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

    def state_dict(self):
        if self._n_probes:
            raise RuntimeError("state_dict() between probe() and step(): parameters are perturbed")
        return super().state_dict()

    def load_state_dict(self, state_dict):
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
                self.state[p]["momentum"] = v["momentum"].to(p.device, self._state_dtype(p), copy=True)
        first = params[0]
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
    def _noise(self, index, group, start, n, device, stream):
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        self.noise_calls += 1
        out = torch.empty(n, dtype=torch.float32, device=device)
        return _fill_noise(out, gen, self._seed, index, start, stream, group["direction"], group["noise_block"])

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        """(u, w) for elements [start, start+n) of parameter `index`, dtype cdt; w may be None if not need_w."""
        raise NotImplementedError

    def _dirs(self, index, p, group, start, n, cdt, need_w):
        if not self.keep_direction:
            return self._chunk_dirs(index, p, group, start, n, cdt, need_w)
        if not self._kept_ready:  # the step's first sweep materialises u and w once
            u, w = self._chunk_dirs(index, p, group, start, n, cdt, True)
            bufs = self._kept.get(p)
            if bufs is None or bufs[0].dtype != cdt:
                full = lambda: torch.empty(p.numel(), dtype=cdt, device=p.device)  # noqa: E731
                bufs = self._kept[p] = (full(), full() if w is not u else None)
            bufs[0][start:start + n].copy_(u)
            if bufs[1] is not None:
                bufs[1][start:start + n].copy_(w)
        bufs = self._kept[p]
        u = bufs[0][start:start + n]
        return u, (bufs[1][start:start + n] if bufs[1] is not None else u)

    # -- sweeps
    def _sweep(self, fn):
        self.sweeps += 1
        for index, (p, group) in enumerate((p, g) for g in self.param_groups for p in g["params"]):
            if not p.requires_grad:
                continue  # frozen after construction: untouched, index kept so other directions don't shift
            contiguous = p.is_contiguous()
            flat = (p.detach() if contiguous else p.detach().contiguous()).view(-1)
            size = group["chunk_numel"] or group["noise_block"]
            for start in range(0, flat.numel(), size):
                fn(index, p, group, flat[start:start + size], start, _compute_dtype(p.dtype))
            if not contiguous:
                p.detach().copy_(flat.view_as(p))
        if self.keep_direction:
            self._kept_ready = True

    @staticmethod
    def _write(x, y):
        if y is not x:
            x.copy_(y)  # the single rounding back to the storage dtype

    def _perturb(self, k, restore=False):
        """θ += k·ε·u in place; the stash is filled on the step's first sweep (restore=True reads it back)."""
        first = self._offset == 0

        def fn(index, p, group, x, start, cdt):
            if restore and self._stashes(p):
                return x.copy_(self._stash[p][start:start + x.numel()])
            if first and self._stashes(p):
                buf = self._stash.get(p)
                if buf is None:
                    buf = self._stash[p] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
                buf[start:start + x.numel()].copy_(x)
            u, _ = self._dirs(index, p, group, start, x.numel(), cdt, False)
            y = x.to(cdt)
            self._write(x, y.add_(u, alpha=k * group["eps"]))
        self._sweep(fn)
        self._offset += k

    # -- protocol
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
            self._perturb(-self._offset, restore=True)
        self._reset_step()

    @torch.no_grad()
    def step(self, closure=None):
        """Optional probe(closure), then the update fused with the restore.  Returns mean ℓ+."""
        if closure is not None:
            self.probe(closure)
        if self._n_probes == 0:
            raise RuntimeError("step() needs a closure or at least one probe() in this step")
        g = self._g_sum / self._n_probes
        ok = torch.isfinite(g)  # stays on device: no host sync
        scal = {}  # 0-d coefficient tensors per (group, device, dtype), built once per step

        def coef(gi, group, device, cdt):
            key = (gi, device, cdt)
            if key not in scal:
                lr, wd = group["lr"], group["weight_decay"]
                neg = torch.where(ok, -(g * lr), 0.0)
                decay = torch.where(ok, torch.as_tensor(1.0 - lr * wd, dtype=torch.float64), 1.0)
                sgn = torch.where(g >= 0, 1.0, -1.0)  # sign(0) = +1
                scal[key] = tuple(x.to(device, cdt) for x in (neg, decay, sgn)) + (ok.to(device),)
            return scal[key]
        gidx = {id(p): gi for gi, gr in enumerate(self.param_groups) for p in gr["params"]}

        def fn(index, p, group, x, start, cdt):
            n = x.numel()
            u, w = self._dirs(index, p, group, start, n, cdt, True)
            neg, decay, sgn, okd = coef(gidx[id(p)], group, p.device, cdt)
            if self._stashes(p):
                y = self._stash[p][start:start + n].to(cdt, copy=True)
            else:
                y = x.to(cdt).add_(u, alpha=self._offset * -group["eps"])
            self._write(x, y.mul_(decay).addcmul_(w, neg))
            self._after_update(p, start, u, okd, sgn)
        self._sweep(fn)

        meta = self._meta()
        meta["zo_skipped"] = meta["zo_skipped"] + (~ok).to(meta["zo_skipped"].device, torch.int64)
        meta["zo_step"] += 1
        self.last_projected_grad = g
        self.last_loss_plus, self.last_loss_minus = self._lp_sum / self._n_probes, self._lm_sum / self._n_probes
        self._reset_step()
        return self.last_loss_plus

    def _after_update(self, p, start, u, ok, sgn):
        pass


class MeZO(ZOOptimizer):
    """ZO-SGD: θ <- θ - lr·(g·z + λθ), z ~ N(0, I) (or ±1)."""

    kind = "mezo"

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        z = self._noise(index, group, start, n, p.device, 0).to(cdt)
        return z, z


class ZOAdaMU(ZOOptimizer):
    """ZO-AdaMU (zo-adamu.md §1.2 with the §1.4 fixes): u = β1·√α·n1 + (1-β1)·(m + √(1-α)·n2) is used for
    both probes and update; θ <- θ - lr·(g·u/√(v+σ) + λθ), v = β2·ż² + (1-β2)·z̈² rebuilt each step;
    m <- sign(g)·u (sign(0) = +1, so the centre never collapses) or m <- u if not signed_momentum."""

    kind = "zo_adamu"
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
        self.last_schedule = dict(zip(("alpha", "beta1", "beta2"), self._abc))

    def _chunk_dirs(self, index, p, group, start, n, cdt, need_w):
        alpha, b1, b2 = self._abc
        zd = self._noise(index, group, start, n, p.device, 0).to(cdt).mul_(math.sqrt(alpha))
        m = self._momentum(p)[start:start + n].to(cdt)
        zdd = self._noise(index, group, start, n, p.device, 1).to(cdt).mul_(math.sqrt(1.0 - alpha)).add_(m)
        u = torch.add(zd * b1, zdd, alpha=1.0 - b1)
        if not need_w:
            return u, None
        v = zd.square_().mul_(b2).add_(zdd.square_(), alpha=1.0 - b2)
        return u, u / v.add_(self.sigma).sqrt_()

    def _after_update(self, p, start, u, ok, sgn):
        m = self._momentum(p)[start:start + u.numel()]
        m.copy_(torch.where(ok, u * sgn if self.signed_momentum else u, m.to(u.dtype)))  # skipped: m kept
