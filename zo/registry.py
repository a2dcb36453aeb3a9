"""The registry of ZO optimizers: --zo_optim name -> class, each method's default LR / ε per mode, and the per-method
--zo_* flags derived from the methods' hyper-parameter declarations (zo.hparams).  The one module that imports every
method (the methods import the core, zo.core; the core imports none of them); args.py, the trainer, the scripts
(`python -m zo.registry defaults|forwards|list`) and the benchmarks read it."""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from zo import hparams
from zo.core import ZOOptimizer
from zo.methods.adamu import AdaMUSchedule, ZOAdaMU
from zo.methods.family import FZOO, HiZOO, MeZO, ZOAdam, ZOSGDCons, ZOSGDMMT, ZOSGDSign
from zo.methods.lowrank import LOZO, LOZOM, SubZero

__all__ = ["AdaMUSchedule", "OPTIMIZERS", "MODES", "Flag", "flags", "keywords", "accepted_keywords", "get", "describe",
           "describe_all", "forward_passes", "mode_defaults", "default_source", "defaults_table", "taking_several_directions", "directions_help", "short"]

OPTIMIZERS: dict[str, type[ZOOptimizer]] = {cls.name: cls for cls in (
    MeZO, ZOAdaMU, ZOSGDSign, ZOSGDMMT, ZOSGDCons, ZOAdam, HiZOO, LOZO, LOZOM, SubZero, FZOO)}
MODES = ("ft", "lora", "prefix")


def get(name: str) -> type[ZOOptimizer]:
    """The class of --zo_optim `name`; an unknown name is an error that lists the valid ones."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown ZO optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None


class Flag(NamedTuple):
    """A --zo_* flag derived from the methods' hyper-parameter declarations (zo.hparams)."""
    name: str                 # without the dashes
    kind: type                # float, int, bool or str
    default: Any              # the methods' common default, or None where they differ (each then takes its own)
    help: str
    low: Any
    high: Any
    above: Any
    choices: tuple | None
    methods: tuple            # the --zo_optim names it applies to


def flags() -> list[Flag]:
    """Every per-method --zo_* flag, in the order the methods declare them: one per flag name, shared by the
    methods that read it (whose declarations must then agree on all but the default)."""
    users: dict[str, list] = {}
    for name, cls in OPTIMIZERS.items():
        for h in hparams.declarations(cls):
            users.setdefault(h.flag_name, []).append((name, cls, h))
    out = []
    for flag, found in users.items():
        first = found[0][2]
        for name, _, h in found[1:]:
            if (h.kind, h.low, h.high, h.above, h.choices, h.help) != (first.kind, first.low, first.high, first.above,
                                                                        first.choices, first.help):
                raise TypeError(f"--{flag}: {name} declares it differently from {found[0][0]}; share one declaration "
                                "(zo.hparams.SHARED)")
        defaults = [h.default for _, _, h in found]
        titles = " / ".join(dict.fromkeys(cls.title for _, cls, _ in found))
        text = f"{titles}: {first.help}" + (f" [{first.symbol}]" if first.symbol else "")
        default = defaults[0] if all(d == defaults[0] for d in defaults) else None
        if default is None and any(d is not None for d in defaults):
            text += " (default: " + ", ".join(f"{cls.title} {h.default}" for _, cls, h in found) + ")"
        out.append(Flag(flag, first.kind, default, text + ".", first.low, first.high, first.above, first.choices,
                        tuple(dict.fromkeys(name for name, _, _ in found))))
    return out


def keywords(name: str, values: dict, *, max_steps: int) -> dict:
    """Constructor keywords of --zo_optim `name` from flag values ({flag name: value}); a flag left at None leaves
    the method's own default."""
    cls = get(name)
    kwargs, parts = {}, {}
    for h in hparams.declarations(cls):
        value = values.get(h.flag_name)
        if value is None:
            continue
        value = h.convert(value) if h.convert is not None and isinstance(value, str) else value
        (parts if h.via is not None else kwargs)[h.arg] = value
    kwargs.update(cls.compose(parts, max_steps=max_steps))
    return kwargs


def accepted_keywords(cls) -> set[str]:
    """Keyword arguments a method's constructor takes: those of its signatures (through the **kwargs each hands to
    its base's, down to the core's) and its declared hyper-parameters."""
    names = {h.arg for h in hparams.declarations(cls) if h.via is None}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if klass is ZOOptimizer or not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def describe(name: str) -> str:
    """One line for --help and the README: forward passes per step and the memory beyond inference."""
    cls = get(name)
    return f"{name}: {getattr(cls, 'forwards_note', cls.forwards)} forward passes a step; {cls.memory()}"


def taking_several_directions() -> list[str]:
    """The methods that take --zo_num_directions > 1."""
    return [name for name, cls in OPTIMIZERS.items() if cls.direction_bound()[0] != 1]


def directions_help() -> str:
    """--zo_num_directions' help: what Q means for each method, from the registry."""
    one = [name for name in OPTIMIZERS if name not in taking_several_directions()]
    averaged = [name for name in taking_several_directions() if get(name).forwards_per_direction == 2]
    own = [f"{name} (N one-sided directions around one L(θ), N+1 forward passes; default "
           f"{get(name).default_directions}, at least {get(name).min_directions})"
           for name in taking_several_directions() if name not in averaged]
    return (f"Directions Q a step. {', '.join(averaged)}: Q two-point estimates on the step's batch (2 forward passes "
            f"each), the update θ - lr·mean_q(g_q·u_q) (default 1). {'; '.join(own)}. One direction only: "
            f"{', '.join(one)} (their optimizer state, or their probe, belongs to one direction a step).")


def describe_all() -> str:
    return "; ".join(map(describe, OPTIMIZERS))


def forward_passes(name: str, num_directions: int | None = None) -> int:
    """Training forward passes a step of --zo_optim `name` with `num_directions` directions (default: its own)."""
    cls = get(name)
    extra = (num_directions or cls.default_directions) - cls.default_directions
    return cls.forwards + extra * cls.forwards_per_direction


def mode_defaults(name: str, mode: str) -> tuple[float, float]:
    """(LR, ε) a method starts from in a training mode (ft, lora, prefix): its class's mode_defaults."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    default = get(name).mode_defaults[mode]
    return default.lr, default.eps


def default_source(name: str, mode: str) -> str:
    """Where the (LR, ε) of mode_defaults(name, mode) come from."""
    mode_defaults(name, mode)
    return get(name).mode_defaults[mode].source


def defaults_table() -> str:
    """Every method's starting (LR, ε) per mode with its source: one line each (run.py --help shows it)."""
    return ("ZO optimizers: the (LR, ε) each starts from per mode (mezo.sh and grid.sh use them where LR / EPS are not "
            "given), and where they come from:\n" + "\n".join(
                f"  {name} {mode}: LR {short(d.lr)}, ε {short(d.eps)} ({d.source})"
                for name, cls in OPTIMIZERS.items() for mode, d in cls.mode_defaults.items()))


def short(x: float) -> str:
    """A number as the scripts spell it: 1e-5, 3e-2, 1.5e-3 (the run tags keep this spelling)."""
    mantissa, exponent = f"{x:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


USAGE = """usage: python -m zo.registry COMMAND
  defaults OPTIM MODE      DEFAULT_LR=... and DEFAULT_EPS=... of a method in a training mode (ft, lora, prefix)
  forwards OPTIM [Q]       training forward passes a step of a method (with Q directions a step)
  list                     the --zo_optim names"""


def main(argv: list[str]) -> int:
    """The scripts' view of the registry (mezo.sh, grid.sh)."""
    import sys
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    shapes = {"defaults": (2,), "forwards": (1, 2), "list": (0,)}
    if command not in shapes or len(rest) not in shapes[command]:
        print(USAGE, file=sys.stderr)
        return 2
    if command == "list":
        print(" ".join(OPTIMIZERS))
        return 0
    optim = rest[0]
    if optim not in OPTIMIZERS:
        print(f"unknown OPTIM={optim} (choose from {' | '.join(OPTIMIZERS)})", file=sys.stderr)
        return 2
    if command == "forwards":
        q = rest[1] if len(rest) > 1 else None
        if q is not None and not (q.isdigit() and int(q) >= 1):
            print(f"--zo_num_directions {q}: need a positive integer", file=sys.stderr)
            return 2
        print(forward_passes(optim, int(q) if q else None))
        return 0
    if rest[1] not in MODES:
        print(f"unknown MODE={rest[1]} (choose from {' | '.join(MODES)})", file=sys.stderr)
        return 2
    lr, eps = mode_defaults(optim, rest[1])
    print(f"DEFAULT_LR={short(lr)}\nDEFAULT_EPS={short(eps)}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
