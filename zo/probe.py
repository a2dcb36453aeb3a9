"""Forward-time probes: during a probe each module computes with θ + s·ε·u as a temporary; the stored weights stay θ
and change only in the update sweep.  Imports only torch.

    opt = zo.registry.get("mezo")(params, lr, probe_mode="forward")   # or "onepass"
    opt.attach(model)      # installs a ForwardProbe on the model (refuses what it cannot handle, by name)

Why: an in-place probe writes θ+εu, then θ-εu, then restores θ.  In 16-bit weights that round trip drifts (so by
default a copy of the weights is stashed: twice the weight memory); here nothing is written, so nothing drifts and no
stash exists, whatever the dtype.  The u is the optimizer's own (its `perturbed(p, k)`: the same counter noise, keyed
by the tensor's index in the optimizer, the same rule and rounding as the in-place sweep), so both modes probe the
same direction: the first probe's θ+εu is bit for bit the in-place one; θ-εu is computed from θ, not from θ+εu, so
it differs from the in-place probe by the in-place round trip's rounding.

Modes.  forward: two forward passes, each with its sign (any objective, any model whose modules are handled below).
onepass: both signs in one forward of the doubled batch: rows [0, B) see θ+εu, rows [B, 2B) θ-εu; every handled
module splits its batch-first inputs into the halves, computes each with its own temporary (one at a time) and
concatenates, so each layer computes both halves before the next runs.  Position ids and masks are doubled with the
batch (the suite's batches carry explicit (B, T) position ids, so GPT-2's learned positions are looked up per row);
the prefix is filled per half.  Refused where the halves would couple: mixture-of-experts routing (tokens of both
halves compete for expert capacity and are dispatched by index), packed batches (sequences flattened into one row
cannot be doubled along the batch); non-differentiable objectives (generation) are refused by the suite's flags.

What is handled, by kind of module, never by architecture:
  * a leaf module (no child holding parameters) whose trainable parameters its forward reads: nn.Linear, GPT-2's
    Conv1D, LayerNorm / RMSNorm of any model, peft's LoRA lora_A / lora_B, positional embeddings with their own
    forward: the parameters are swapped for their perturbed temporaries while that forward runs (one temporary of
    each at a time, in the weight dtype; the tied LM head of a model is such a Linear: one vocabulary-sized
    temporary, W+s·ε·u, and no other, no fp32 copy of u of that size);
  * nn.Embedding itself: only the rows the batch looks up are perturbed (optimizer.perturbed_rows: row r draws the
    slice of the full tensor's noise that the in-place sweep would add to it);
  * a module that reads its parameters outside its forward declares `zo_probe_batched = {method: batch argument}`:
    methods that build per-example tensors (batch first) from the parameters (the prefix: `batch_kv`); they run with
    the perturbed parameters, per half in one pass;
  * ParameterList / ParameterDict children count as their parent's parameters.
Any other module holding a trainable parameter is refused by name before training, as is a trainable parameter of
the optimizer that no module of the model holds.

Checkpoints are safe: no parametrization, no renamed or added parameter or buffer.  The module's `forward` (or a
declared method) is replaced by an instance attribute that calls the original; the `_parameters` entries are swapped
only inside that call and put back in a `finally`, so `state_dict()` keys, the Parameter objects and what a
checkpoint holds are those of the plain model (the optimizer refuses state_dict() during a probe anyway).
`detach()` removes the wrappers.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PROBE_MODES", "ForwardProbe", "check_mode"]

PROBE_MODES = ("inplace", "forward", "onepass")
_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
_MOE_CONFIG = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_mode(mode: str, carry_perturbation: bool, keep_direction: bool) -> str:
    """The probe mode, refused where an optimizer option presumes that probes write the weights."""
    if mode not in PROBE_MODES:
        raise ValueError(f"Invalid probe_mode: {mode!r} (choose from {PROBE_MODES})")
    if mode != "inplace" and (carry_perturbation or keep_direction):
        raise ValueError(f"probe_mode {mode!r} leaves the stored weights at θ: carry_perturbation (which rests them "
                         "at the next step's θ+εu) and keep_direction (a buffer for the in-place sweeps) do not "
                         "apply; drop them or use probe_mode 'inplace'")
    return mode


class _Entry(SimpleNamespace):
    """One handled module: its name, kind ("leaf", "rows" or "batched") and its trainable parameters as
    (holder module, key in holder._parameters, parameter)."""


class ForwardProbe:
    """The wrappers of one model for one optimizer (the module docstring has what is handled and why it is safe)."""

    def __init__(self, model: nn.Module, optimizer, make_buffer=None):
        if optimizer.probe_mode not in PROBE_MODES[1:]:
            raise ValueError(f"probe_mode {optimizer.probe_mode!r}: only 'forward' and 'onepass' probe inside the "
                             "forwards; in-place probes need no model attached")
        self.optimizer, self.one_pass = optimizer, optimizer.probe_mode == "onepass"
        self._both = False          # inside a one-pass forward: rows split into (+, -) halves
        self._sign: float | None = None   # a sign forced while one half (or a batched method) runs
        trainable = {id(p): p for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
        entries, held = [], set()
        for name, module in model.named_modules():
            if isinstance(module, _CONTAINERS):
                continue
            params = [(module, key, p) for key, p in module._parameters.items() if p is not None and id(p) in trainable]
            params += [(child, key, p) for child in module.children() if isinstance(child, _CONTAINERS)
                       for key, p in child._parameters.items() if p is not None and id(p) in trainable]
            if not params:
                continue
            held.update(id(p) for _, _, p in params)
            label = f"{name or '<the model>'} ({type(module).__name__})"
            batched = getattr(module, "zo_probe_batched", None)
            leaf = not any(p.requires_grad for c in module.children() if not isinstance(c, _CONTAINERS)
                           for p in c.parameters())
            if batched:
                kind = "batched"
            elif not leaf:
                raise ValueError(
                    f"--zo_probe {optimizer.probe_mode}: module {label} holds trainable parameters "
                    f"{[k for _, k, _ in params]} and has submodules, so where it reads them is unknown (not a leaf "
                    "module, no zo_probe_batched declaration); freeze them, declare the methods that read them, or "
                    "use --zo_probe inplace")
            elif type(module) is nn.Embedding and module.max_norm is None:
                kind = "rows"
            else:
                kind = "leaf"
            entries.append(_Entry(name=label, module=module, kind=kind, params=params, batched=batched or {}))
        missing = [p for i, p in trainable.items() if i not in held]
        if missing:
            raise ValueError(f"--zo_probe {optimizer.probe_mode}: {len(missing)} trainable tensor(s) of the optimizer "
                             f"(shapes {[tuple(p.shape) for p in missing][:4]}) belong to no module of the model; "
                             "attach the model they belong to, or use --zo_probe inplace")
        if self.one_pass:
            self._refuse_coupling(model)
        for p in trainable.values():   # before any probe: a buffer first made under inference_mode stays read-only
            for name in optimizer.buffers if make_buffer is not None else ():
                make_buffer(p, name)
        self.entries, self._originals = entries, []
        for entry in entries:
            self._install(entry)

    @staticmethod
    def _refuse_coupling(model):
        config = getattr(model, "config", None)
        for attr in _MOE_CONFIG:
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 1:
                raise ValueError(f"--zo_probe onepass: the model routes tokens to experts (config.{attr}={value}); "
                                 "expert routing with capacity couples the two halves of a doubled batch (their "
                                 "tokens compete for experts and are dispatched by index): use --zo_probe forward")
        moe = next((n for n, m in model.named_modules() if "moe" in type(m).__name__.lower()), None)
        if moe is not None:
            raise ValueError(f"--zo_probe onepass: module {moe} ({type(model.get_submodule(moe)).__name__}) is a "
                             "mixture-of-experts block, whose routing couples the halves of a doubled batch: use "
                             "--zo_probe forward")

    # -- installation
    def _install(self, entry):
        names = list(entry.batched) if entry.kind == "batched" else ["forward"]
        for attr in names:
            original = getattr(entry.module, attr)
            # an instance attribute already there (accelerate's device hooks replace `forward` so) is put back on
            # detach(); otherwise the class's method shows through again
            self._originals.append((entry.module, attr, original if attr in vars(entry.module) else None))

            def wrapper(*args, _entry=entry, _original=original, _attr=attr, **kwargs):
                return self._call(_entry, _original, _attr, args, kwargs)
            setattr(entry.module, attr, wrapper)

    def detach(self):
        """Remove every wrapper: the modules compute with their stored parameters again."""
        for module, attr, own in reversed(self._originals):
            if own is not None:
                setattr(module, attr, own)
            else:
                delattr(module, attr)
        self._originals = []

    # -- the signs
    def signs(self) -> tuple:
        """The signs the modules apply now: () none, (k,) one, (1, -1) the halves of a one-pass forward."""
        if self._sign is not None:
            return (self._sign,)
        if self._both:
            return (1.0, -1.0)
        k = self.optimizer.perturbation
        return (k,) if k else ()

    @contextlib.contextmanager
    def _forced(self, k):
        outer, self._sign = self._sign, k
        try:
            yield
        finally:
            self._sign = outer

    @contextlib.contextmanager
    def _swapped(self, entry, k):
        """The entry's trainable parameters replaced by θ + k·ε·u while the block runs."""
        done = []
        try:
            for holder, key, p in entry.params:
                holder._parameters[key] = self.optimizer.perturbed(p, k)
                done.append((holder, key, p))
            yield
        finally:
            for holder, key, p in done:
                holder._parameters[key] = p

    def _call(self, entry, original, attr, args, kwargs):
        signs = self.signs()
        if not signs:
            return original(*args, **kwargs)
        if len(signs) == 1:
            return self._one(entry, original, signs[0], args, kwargs)
        outputs = []
        for k, (a, kw) in zip(signs, self._halves(entry, attr, args, kwargs)):
            with self._forced(k):
                outputs.append(self._one(entry, original, k, a, kw))
        return _concat(outputs, entry.name)

    def _one(self, entry, original, k, args, kwargs):
        if entry.kind == "rows":
            ids = args[0] if args else kwargs["input"]
            rows, inverse = torch.unique(ids, return_inverse=True)
            weight = self.optimizer.perturbed_rows(entry.params[0][2], k, rows)
            return F.embedding(inverse, weight)
        with self._forced(k), self._swapped(entry, k):
            return original(*args, **kwargs)

    @staticmethod
    def _halves(entry, attr, args, kwargs):
        """(args, kwargs) of the + half and of the - half: every batch-first tensor split in two (the batch is the
        first dimension of the first tensor argument; a declared batched method gets half its batch argument)."""
        if entry.kind == "batched":
            name = entry.batched[attr]
            if name not in kwargs:
                raise TypeError(f"{entry.name}.{attr}: pass the batch size as the keyword {name}= (a one-pass probe "
                                "fills each half of the batch from its own perturbation)")
            size = kwargs[name]
            if size % 2:
                raise ValueError(f"{entry.name}.{attr}: {name}={size} is odd, not a doubled batch")
            half = {**kwargs, name: size // 2}
            return (args, half), (args, half)
        first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
        if first is None or first.dim() == 0 or first.shape[0] % 2:
            raise ValueError(f"--zo_probe onepass: {entry.name} got no batch-first input of even size "
                             f"({None if first is None else tuple(first.shape)}); a one-pass probe splits the doubled "
                             "batch into halves at every module: use --zo_probe forward")
        n = first.shape[0]

        def part(i):
            cut = lambda v: v[i * (n // 2):(i + 1) * (n // 2)] if torch.is_tensor(v) and v.dim() and v.shape[0] == n \
                else v   # noqa: E731
            return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
        return part(0), part(1)

    # -- the one-pass loss
    def losses(self, model, loss_fn):
        """loss_fn(model) as a probe needs it: inside probe_mode onepass's both-signs forward, the pair (ℓ+, ℓ-) of
        one forward of the doubled batch (loss_fn runs once per half, on a stand-in of the model that returns that
        half's logits; the model runs once); otherwise loss_fn(model)."""
        if not self._both:
            return loss_fn(model)
        doubled = _DoubledModel(model)
        return loss_fn(doubled.half(0)), loss_fn(doubled.half(1))

    def both(self, closure):
        """closure() with both signs active (one pass): it returns (ℓ+, ℓ-) (ForwardProbe.losses)."""
        self._both = True
        try:
            out = closure()
        finally:
            self._both = False
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("probe_mode onepass: the probe's closure must return (loss at θ+εu, loss at θ-εu): build "
                            "it with ForwardProbe.losses")
        return out


class _DoubledModel:
    """The model seen by one half of a one-pass probe: the first call of either half runs the model once on the
    doubled batch (every batch-first input repeated), both halves read their rows of the output's logits."""

    def __init__(self, model):
        self.model, self.output, self.call = model, None, None

    def half(self, i):
        def run(**kwargs):
            if self.output is None:
                batch = kwargs["input_ids"].shape[0] if "input_ids" in kwargs else None
                positions = kwargs.get("position_ids")
                if (positions is not None and positions.dim() == 2
                        and bool((positions[:, 1:] < positions[:, :-1]).any())):
                    raise ValueError("--zo_probe onepass: position_ids restart inside a row, a packed batch (several "
                                     "sequences flattened into one row); the halves of a doubled batch would share "
                                     "rows: use --zo_probe forward")
                doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v
                           for k, v in kwargs.items()}
                self.output, self.call, self.batch = self.model(**doubled), sorted(kwargs), batch
            elif sorted(kwargs) != self.call:
                raise RuntimeError("a one-pass probe's loss called the model twice with different arguments")
            logits = self.output.logits
            return SimpleNamespace(logits=logits[i * self.batch:(i + 1) * self.batch])
        return run


def _concat(outputs, name):
    if all(torch.is_tensor(o) for o in outputs):
        return torch.cat(outputs)
    if all(isinstance(o, tuple) for o in outputs):
        return tuple(torch.cat(parts) if torch.is_tensor(parts[0]) else parts[0] for parts in zip(*outputs))
    raise TypeError(f"--zo_probe onepass: {name} returned {type(outputs[0]).__name__}, not tensors to concatenate "
                    "along the batch: use --zo_probe forward")
