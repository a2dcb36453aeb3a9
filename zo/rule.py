"""The per-element form of an element-wise ZO method, and the sweeps built from it.  Imports nothing of the project.

A method states once, as a pure function of per-element values,

    rule(noise, state, s) -> Rule(direction=u, step=..., state={name: new value})

with `noise.<stream>` its noise values, `state.<buffer>` its per-parameter state, `s.<name>` its per-step scalars,
written with ordinary arithmetic operators and the helpers below (`sqrt`, `where`, `sign`, `absolute`, comparisons).
`sweep()` states once what the framework does with a rule in each kind of sweep (perturb, update, carried update).

The same functions are evaluated two ways:
  * on torch tensors (the torch path, chunk by chunk: the reference), each operation one IEEE rounding in the compute
    dtype T (float32, or float64 for float64 parameters);
  * on `Expr` values, which record each operation in a `Graph` (hash-consed: an operation on the same operands is one
    node), from which a backend keeps what an output needs (`Graph.order`) and emits one statement per node, with
    the same single rounding in the same order.  That is how the C and Triton kernels equal the torch path bit for
    bit without anyone writing the method's arithmetic a second time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

__all__ = ["Rule", "SweepSpec", "Expr", "Graph", "Leaf", "Values", "sqrt", "where", "sign", "absolute", "sweep",
           "trace",
           "FRAMEWORK_SCALARS", "SWEEP_KINDS"]

SWEEP_KINDS = ("perturb", "update", "update_stash")
# scalars the framework feeds every sweep: x += perturb_scale·u (a probe, or a restore with the opposite sign);
# y = x + restore_scale·u undoes the probes before an update; decay = 1-lr·λ; ok = whether g is finite
FRAMEWORK_SCALARS = ("perturb_scale", "restore_scale", "decay", "ok")


class Rule(NamedTuple):
    """What a method computes for one element: the direction u of the probes, the additive update `step` of
    θ <- θ·decay + step (None where the update sweep is not needed), and the new values of its state buffers."""
    direction: Any
    step: Any = None
    state: dict = {}


@dataclass(frozen=True)
class SweepSpec:
    """A method as the sweeps and the kernels see it, frozen (and hashable: the kernels of a spec are built once):
    its rule and the names of its noise streams, state buffers, step values (known when a step begins) and update
    values (derived from the projected gradient after the probes)."""
    rule: Callable
    streams: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    step_values: tuple[str, ...] = ()
    update_values: tuple[str, ...] = ()

    @property
    def scalars(self) -> tuple[str, ...]:
        """The method's scalars in kernel order: step values, then update values (the framework's come after)."""
        return self.step_values + self.update_values


# ------------------------------------------------------------------------------------------ expressions
class Graph:
    """Operations in creation order (a topological order); `key -> node` makes equal operations one node."""

    def __init__(self):
        self.nodes: list[tuple] = []      # (op, args: tuple of node ids, attr)
        self.kinds: list[str] = []        # "float" or "bool"
        self._index: dict[tuple, int] = {}

    def add(self, op: str, args: tuple = (), attr=None, kind: str = "float") -> "Expr":
        key = (op, args, attr)
        node = self._index.get(key)
        if node is None:
            node = self._index[key] = len(self.nodes)
            self.nodes.append(key)
            self.kinds.append(kind)
        return Expr(self, node)

    def const(self, value: float) -> "Expr":
        # keyed by the bits of the double, so 0.0 and -0.0 stay two constants
        return self.add("const", (), int(np.float64(value).view(np.int64)))

    @staticmethod
    def const_value(attr: int) -> float:
        """The float of a "const" node's attribute (the bits of a double)."""
        return float(np.int64(attr).view(np.float64))

    def order(self, outputs) -> list[int]:
        """The nodes the outputs depend on, in creation order (dead operations dropped)."""
        live = set()
        stack = [o.node for o in outputs]
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(self.nodes[node][1])
        return sorted(live)


class Expr:
    """A value of a traced rule: a node of its graph."""
    __slots__ = ("graph", "node")

    def __init__(self, graph: Graph, node: int):
        self.graph, self.node = graph, node

    @property
    def kind(self) -> str:
        return self.graph.kinds[self.node]

    def _lift(self, other) -> "Expr":
        if isinstance(other, Expr):
            if other.graph is not self.graph:
                raise ValueError("a rule mixed values of two traces")
            return other
        if isinstance(other, (bool, int, float, np.floating, np.integer)):
            return self.graph.const(float(other))
        raise TypeError(f"a rule combined a traced value with {type(other).__name__} {other!r}: use numbers, the "
                        "rule's noise, state and step values, and the helpers of zo.rule")

    def _op(self, op, *others, kind="float"):
        args = (self,) + tuple(self._lift(o) for o in others)
        if any(a.kind != "float" for a in args):
            raise TypeError(f"{op} of a comparison result: use where(condition, a, b) to turn it into a number")
        return self.graph.add(op, tuple(a.node for a in args), kind=kind)

    def __add__(self, o): return self._op("add", o)
    def __radd__(self, o): return self._lift(o)._op("add", self)
    def __sub__(self, o): return self._op("sub", o)
    def __rsub__(self, o): return self._lift(o)._op("sub", self)
    def __mul__(self, o): return self._op("mul", o)
    def __rmul__(self, o): return self._lift(o)._op("mul", self)
    def __truediv__(self, o): return self._op("div", o)
    def __rtruediv__(self, o): return self._lift(o)._op("div", self)
    def __neg__(self): return self._op("neg")
    def __lt__(self, o): return self._op("lt", o, kind="bool")
    def __le__(self, o): return self._op("le", o, kind="bool")
    def __gt__(self, o): return self._op("gt", o, kind="bool")
    def __ge__(self, o): return self._op("ge", o, kind="bool")

    def __bool__(self):
        raise TypeError("a rule branched on a traced value (if / and / or): it must be one expression per element; "
                        "use where(condition, a, b)")

    __hash__ = None  # == is not overloaded: hash-consing goes through Graph keys


def _traced(*values) -> Graph | None:
    return next((v.graph for v in values if isinstance(v, Expr)), None)


def sqrt(x):
    """Correctly rounded square root (the hardware instruction; torch's vectorised CPU sqrt is not)."""
    if isinstance(x, Expr):
        return x._op("sqrt")
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.contiguous().numpy()))
    return x.sqrt()


def absolute(x):
    return x._op("abs") if isinstance(x, Expr) else x.abs()


def where(condition, a, b):
    """a where condition holds, else b, element by element (an exact selection, no rounding)."""
    graph = _traced(condition, a, b)
    if graph is None:
        return torch.where(condition, a, b)
    cond = condition if isinstance(condition, Expr) else None
    if cond is None or cond.kind != "bool":
        raise TypeError("where() needs a comparison of traced values as its condition")
    a, b = cond._lift(a), cond._lift(b)
    return graph.add("where", (cond.node, a.node, b.node))


def sign(x):
    """-1, 0 or +1 (0 for a zero or NaN input), as a composition of comparisons: the same selections everywhere."""
    if isinstance(x, Expr):
        return where(x > 0, 1.0, where(x < 0, -1.0, 0.0))
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, torch.where(x < 0, -one, torch.zeros_like(one)))


# ------------------------------------------------------------------------------------------ values of a sweep
class Values:
    """Attribute access to named values (noise streams, state buffers, scalars); an unknown name is an error that
    lists the declared ones."""

    def __init__(self, what: str, values: dict):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"{object.__getattribute__(self, '_what')} has no {name!r}; declared: "
                                 f"{', '.join(values) or 'none'}")
        return values[name]

    def __setattr__(self, name, value):
        raise AttributeError("rule inputs are read-only: return new state in Rule(state={...})")

    def __getitem__(self, name):
        return self.__getattr__(name)


class Leaf(NamedTuple):
    """A traced input: what a backend loads for it.  role: "x", "stash", "noise", "state", "scalar", "bits" (the
    rounding bits of a stochastic update); name: the stream, buffer or scalar name; step: 0 for this step, 1 for the
    next (a carried perturbation)."""
    role: str
    name: str = ""
    step: int = 0


def sweep(kind: str, rule, x, noise: Values, state: dict, s: Values, *, stash=None, rounded=None,
          next_noise: Values | None = None, next_s: Values | None = None, stochastic=None,
          count: bool = False) -> dict:
    """New values of one sweep, per element: {"x": ..., buffer: ...} (buffers only where they change).

      perturb       x + perturb_scale·u
      update        y = x + restore_scale·u (update_stash: y = stash); x = y·decay + step where g is finite, else y;
                    each state buffer takes its new value where g is finite, else keeps its own
      stochastic    (update only) the updated x = stochastic(y·decay + step): rounded to x's storage dtype at random
                    (zo.noise.stochastic_round), so a step below half an ulp survives on average; a skipped step
                    stores y as always
      count         (update only) also "rounded_away": 1.0 where g is finite and the update changed x in T but not
                    the stored value (rounded(x) equals rounded(y), what a restore alone stores), else 0.0
      carry         (update only, with next_noise / next_s) then + perturb_scale·u' of the next step, built from the
                    rounded new weights and state; the stash, if any, takes the rounded new weights
    `rounded(name, value)` rounds a value to the storage dtype of x or of a buffer (and back to T)."""
    if kind not in SWEEP_KINDS:
        raise ValueError(f"sweep kind {kind!r}: choose from {SWEEP_KINDS}")
    r = rule(noise, Values("state", state), s)
    if not isinstance(r, Rule):
        raise TypeError(f"a rule returns zo.Rule(direction=..., step=..., state={{...}}), got {type(r).__name__}")
    u = r.direction
    if kind == "perturb":
        return {"x": x + u * s.perturb_scale}
    unknown = set(r.state) - set(state)
    if unknown:
        raise ValueError(f"the rule returns state {sorted(unknown)} that the method does not declare "
                         f"(declared: {sorted(state)})")
    if r.step is None:
        raise ValueError("the rule gives no step: an update sweep needs Rule(step=...)")
    y = stash if kind == "update_stash" else x + u * s.restore_scale
    z = y * s.decay + r.step
    new = z if stochastic is None else stochastic(z)
    out = {"x": where(s.ok, new, y)}
    if count:
        kept, before = rounded("x", new), rounded("x", y)
        same = where(kept < before, 0.0, where(kept > before, 0.0, 1.0))
        out["rounded_away"] = where(s.ok, where(z < y, same, where(z > y, same, 0.0)), 0.0)
    for name, value in r.state.items():
        out[name] = where(s.ok, value, state[name])
    if next_noise is None:
        return out
    new_state = {name: rounded(name, out[name]) if name in out else value for name, value in state.items()}
    x_new = rounded("x", out["x"])
    u_next = rule(next_noise, Values("state", new_state), next_s).direction
    if kind == "update_stash":
        out["stash"] = x_new
    out["x"] = x_new + u_next * next_s.perturb_scale
    return out


def trace(kind: str, rule, streams, buffers, scalars, carry: bool = False, stochastic: bool = False,
          count: bool = False):
    """The graph of one sweep of `rule`: (graph, {output: Expr}, {node: Leaf} of the inputs it reads).
    `scalars` are the method's scalar names (step values and update values); the framework's are added.
    stochastic: the update rounds x by an "sround" node (args: the value and the element's 32 random bits, a leaf
    of role "bits" and kind "bits", which no arithmetic accepts); count: the output "rounded_away" (not stored: a
    backend adds it up)."""
    graph = Graph()
    leaves: dict[int, Leaf] = {}

    def leaf(role, name="", step=0, kind="float"):
        e = graph.add("leaf", (), (role, name, step), kind=kind)
        leaves[e.node] = Leaf(role, name, step)
        return e

    def scalar_values(step):
        names = tuple(scalars) + FRAMEWORK_SCALARS
        return Values("the step values", {n: leaf("scalar", n, step, "bool" if n == "ok" else "float")
                                          for n in names})

    def noise_values(step):
        return Values("the noise", {n: leaf("noise", n, step) for n in streams})

    state = {name: leaf("state", name) for name in buffers}

    def rounded(name, value):
        return graph.add("round", (value.node,), name)

    kw = dict(rounded=rounded, count=count)
    if carry:
        kw.update(next_noise=noise_values(1), next_s=scalar_values(1))
    if stochastic:
        kw["stochastic"] = lambda value: graph.add("sround", (value.node, leaf("bits", kind="bits").node), "x")
    out = sweep(kind, rule, leaf("x"), noise_values(0), state, scalar_values(0),
                stash=leaf("stash") if kind == "update_stash" else None, **kw)
    return graph, out, leaves
