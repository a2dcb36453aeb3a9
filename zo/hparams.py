"""Hyper-parameters of the ZO methods, each declared once (in the spirit of peft's LoraConfig fields with
metadata={"help": ...}): its default, its range, its help, the paper's symbol and the --zo_* flag it is read from.

A method lists its own in `hyperparameters`:

    hyperparameters = (Hyper("mu", 0.9, "momentum of the ZO gradient estimate (ZO-Bench's sweeps: 0.9)",
                             symbol="μ", low=0.0, high=0.999999),)

and takes them in its constructor with `take(self, kw)` (the default where not given, the range checked).  A
hyper-parameter that several methods share (β1, the rank r, the refresh interval) is declared once in `SHARED`; a
method names it with its own default, `shared("rank", 2)` (and, where they differ, its constructor keyword or its
flag: `shared("interval", 2000, flag="zo_T")`).  The registry (zo.registry.flags) derives the --zo_* flags, their help,
ranges and the methods they apply to from these declarations, and maps flag values to constructor keywords.
Imports nothing of the project.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

__all__ = ["Hyper", "SHARED", "shared", "declarations", "take", "range_text"]


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter.  `name` identifies it (and names its flag, --zo_<name>, unless `flag` says otherwise);
    `keyword` is the constructor's keyword (default: the name); low / high: inclusive bounds, above: exclusive lower
    bound (None: open); `kind` the flag's type (float, int, bool or str); `choices` the accepted values of a str;
    `convert` turns a flag value into the constructor's value (e.g. a dtype name into a torch dtype)."""
    name: str
    default: Any = None
    help: str = ""
    symbol: str = ""
    kind: type = float
    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple | None = None
    keyword: str | None = None
    flag: str | None = None
    convert: Callable | None = None
    shared: bool = False      # a method's use of a SHARED declaration: only its default, keyword and flag are its own
    via: str | None = None    # not a constructor keyword: part of this one, built by the method's compose()

    @property
    def arg(self) -> str:
        """The constructor keyword."""
        return self.keyword or self.name

    @property
    def flag_name(self) -> str:
        return self.flag or f"zo_{self.name}"

    def problem(self, value) -> str | None:
        """Why `value` is refused, or None."""
        if value is None:
            return None if self.default is None else "need a value"
        if self.kind is bool:
            return None if isinstance(value, bool) else "need True or False"
        if self.choices is not None:   # a flag's value, or what `convert` makes of one
            allowed = list(self.choices) + ([self.convert(c) for c in self.choices] if self.convert else [])
            return None if value in allowed else f"choose from {', '.join(map(str, self.choices))}"
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return "need an int"
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return "need a finite number"
            if ((self.low is not None and value < self.low) or (self.above is not None and value <= self.above)
                    or (self.high is not None and value > self.high)):
                return f"need {range_text(self.low, self.high, self.above)}"
        return None


def range_text(low, high, above) -> str:
    lower = f"> {above}" if above is not None else f">= {low}" if low is not None else ""
    upper = f"<= {high}" if high is not None else ""
    return " and ".join(p for p in (lower, upper) if p)


# Hyper-parameters that several methods share: declared here once; each method gives its default (shared()).
SHARED = {h.name: h for h in (
    Hyper("beta1", 0.9, "first-moment (momentum) decay β1 (0.9 in both papers' code)", symbol="β1", low=0.0,
          high=0.999999),
    Hyper("rank", None, "rank r of the low-rank directions", symbol="r", kind=int, low=1),
    Hyper("interval", None, "steps between redraws of the slowly changing factors (LOZO's ν, SubZero's T)",
          symbol="ν / T", kind=int, low=1),
)}


def shared(name: str, default, *, keyword: str | None = None, flag: str | None = None) -> Hyper:
    """A method's use of the shared hyper-parameter `name`: its default (and constructor keyword, or flag, where
    they are not the shared declaration's)."""
    if name not in SHARED:
        raise KeyError(f"no shared hyper-parameter {name!r}; declared: {', '.join(SHARED)}")
    return Hyper(name, default, keyword=keyword, flag=flag, shared=True)


def declarations(cls) -> tuple[Hyper, ...]:
    """A method class's hyper-parameters, the shared ones completed from SHARED (help, symbol, type, range)."""
    out = []
    for h in getattr(cls, "hyperparameters", ()):
        if h.shared:
            base = SHARED[h.name]
            h = replace(base, default=h.default, keyword=h.keyword or base.keyword, flag=h.flag or base.flag,
                        shared=True)
        out.append(h)
    return tuple(out)


def take(optimizer, kw: dict) -> dict:
    """The values of the optimizer's declared hyper-parameters, taken out of its constructor's keywords `kw` (the
    declared default where one is not given), each checked against its declaration: {keyword: value}."""
    values = {}
    for h in declarations(type(optimizer)):
        if h.via is not None:
            continue   # reaches the constructor inside another keyword (compose)
        value = kw.pop(h.arg, h.default)
        why = h.problem(value)
        if why:
            symbol = f"{h.symbol}: " if h.symbol else ""
            raise ValueError(f"Invalid {optimizer.title} {h.arg}={value!r}: {why} ({symbol}{h.help})")
        if h.convert is not None and isinstance(value, str):
            value = h.convert(value)
        values[h.arg] = float(value) if h.kind is float and value is not None else value
    return values
