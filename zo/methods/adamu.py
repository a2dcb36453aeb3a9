"""ZO-AdaMU (zo-adamu.md §1): its annealing schedule (pure functions of the step count, §1.3) and the method, one
element-wise rule on the core protocol of zo.ZOOptimizer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from zo import rule as zo_rule
from zo.core import NOISE_BLOCK, Rule, ZOOptimizer
from zo.hparams import Hyper
from zo.methods.family import ModeDefault

__all__ = ["anneal", "AdaMUSchedule", "AdaMUScalars", "ZOAdaMU"]


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


# The schedule's hyper-parameters (--zo_t1 .. --zo_alpha_floor): they reach the optimizer as its `schedule`.
SCHEDULE = (
    Hyper("T1", None, "end of the warm-up (default 0.0512 x max_steps)", symbol="T1", kind=int, low=0, flag="zo_t1",
          via="schedule"),
    Hyper("T2", None, "end of the annealing (default 0.8 x max_steps)", symbol="T2", kind=int, low=1, flag="zo_t2",
          via="schedule"),
    Hyper("T3", None, "schedule horizon (default max_steps)", symbol="T3", kind=int, low=1, flag="zo_t3",
          via="schedule"),
    Hyper("phi_alpha", 1.0, "annealing rate of alpha", symbol="φα", above=0.0, via="schedule"),
    Hyper("phi_beta1", 0.1, "annealing rate of beta1", symbol="φβ1", above=0.0, via="schedule"),
    Hyper("phi_beta2", 1.5, "annealing rate of beta2", symbol="φβ2", above=0.0, via="schedule"),
    Hyper("alpha_floor", None, "keep alpha >= this after T2 (the paper text's 0.5)", low=0.0, high=1.0,
          via="schedule"),
)
_DEFAULT = {h.name: h.default for h in SCHEDULE}


@dataclass(frozen=True)
class AdaMUSchedule:
    """(alpha, beta1, beta2) of ZO-AdaMU as functions of the 0-based completed-step count t (T1 .. T3: the paper's
    at 20k steps; the rates: SCHEDULE's declarations)."""
    T1: int = 1024
    T2: int = 16000
    T3: int = 20000
    phi_alpha: float = _DEFAULT["phi_alpha"]
    phi_beta1: float = _DEFAULT["phi_beta1"]
    phi_beta2: float = _DEFAULT["phi_beta2"]
    alpha_floor: float | None = _DEFAULT["alpha_floor"]  # "paper-text mode": alpha >= floor once t >= T2

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


class AdaMUScalars(NamedTuple):
    """ZO-AdaMU's per-step values from the schedule (α, β1, β2): each rounded once to the compute dtype where used."""
    sqrt_alpha: float
    sqrt_one_minus_alpha: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float

    @classmethod
    def of(cls, alpha: float, beta1: float, beta2: float) -> "AdaMUScalars":
        return cls(math.sqrt(alpha), math.sqrt(1.0 - alpha), beta1, 1.0 - beta1, beta2, 1.0 - beta2)


class ZOAdaMU(ZOOptimizer):
    """ZO-AdaMU (zo-adamu.md §1.2 with the §1.4 fixes), Eq. 4–6:
        ż = √α·n1,  z̈ = m + √(1-α)·n2,  u = β1·ż + (1-β1)·z̈            (probes and update)
        θ <- θ - lr·(g·u/√(v+σ) + λθ),  v = β2·ż² + (1-β2)·z̈²           (rebuilt each step, not an EMA)
        m <- sign(g)·u  (sign(0) = +1, so the centre never collapses), or m <- u if not signed_momentum.
    (α, β1, β2) follow `schedule` once per step.  state_dtype (float32 / bfloat16 / float16, default: the parameter
    dtype) stores the momentum buffer."""

    name = "zo_adamu"
    title = "ZO-AdaMU"
    streams = ("n1", "n2")
    buffers = ("momentum",)
    buffer_note = "in --zo_state_dtype, default the parameter dtype"
    step_values = AdaMUScalars._fields + ("sigma",)
    update_values = ("coef", "sign_g")
    # the ZO-AdaMU paper's best values per mode, as printed (its LoRA and prefix rows look swapped against MeZO's)
    mode_defaults = {"ft": ModeDefault(1e-4, 1e-3, "ZO-AdaMU paper, Appendix B, Table 3 (best of its grid)"),
                     "prefix": ModeDefault(1e-4, 1e-2, "ZO-AdaMU paper, Appendix B, Table 3 (best of its grid)"),
                     "lora": ModeDefault(1e-2, 1e-1, "ZO-AdaMU paper, Appendix B, Table 3 (best of its grid)")}
    hyperparameters = SCHEDULE + (
        Hyper("signed_momentum", True, "store m = sign(g) u as the released code does (--no_zo_signed_momentum: "
                                       "m = u, the paper's Algorithm 1)", kind=bool),
        Hyper("state_dtype", None, "momentum dtype (default: the parameter dtype)", kind=str,
              choices=("float32", "bfloat16", "float16"), convert=lambda name: getattr(torch, name)),
    )

    def __init__(self, params, lr=1e-4, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, schedule: AdaMUSchedule | None = None,
                 sigma=1e-8, **kw):
        if not sigma > 0:
            raise ValueError(f"Invalid sigma: {sigma} (need > 0: it keeps √(v+σ) away from zero)")
        self.schedule = schedule if schedule is not None else AdaMUSchedule()
        self.sigma = float(sigma)
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @classmethod
    def compose(cls, parts, *, max_steps):
        """The schedule from --zo_t1 .. --zo_alpha_floor (those given) scaled to the run's max_steps."""
        try:
            return {"schedule": AdaMUSchedule.for_max_steps(max_steps, **parts)}
        except ValueError as error:
            raise ValueError(f"ZO-AdaMU schedule: {error}. Pass --zo_t1 < --zo_t2 <= --zo_t3.") from None

    @staticmethod
    def rule(noise, state, s):
        zd = noise.n1 * s.sqrt_alpha
        zdd = noise.n2 * s.sqrt_one_minus_alpha + state.momentum
        u = zd * s.beta1 + zdd * s.one_minus_beta1
        v = zd * zd * s.beta2 + zdd * zdd * s.one_minus_beta2 + s.sigma
        return Rule(direction=u, step=u / zo_rule.sqrt(v) * s.coef, state={"momentum": u * s.sign_g})

    def values_at(self, t):
        return {**AdaMUScalars.of(*self.schedule.values(t))._asdict(), "sigma": self.sigma}

    def values_from_g(self, g, group):
        one = torch.ones((), dtype=torch.float64, device=g.device)
        return {"coef": -(g * group["lr"]), "sign_g": torch.where(g >= 0, one, -one) if self.signed_momentum else one}

    def schedule_values(self, t):
        return dict(zip(("alpha", "beta1", "beta2"), self.schedule.values(t)))

    def buffer_dtype(self, p):
        return self.state_dtype or p.dtype
