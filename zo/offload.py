"""Weights streamed from host memory (--zo_offload cpu): a model larger than the GPU trained on one GPU.

    streamer = zo.offload.Offloader(model, "cuda")   # the decoder blocks' weights move to (pinned) host memory
    opt = zo.registry.get("mezo")(params, lr, probe_mode="onepass"); opt.attach(model)
    streamer.bind(opt)                                # the updates of the streamed tensors wait for their block
    ...training...; streamer.flush()                  # before anything reads the host copy (checkpoints)

What streams: the model's own decoder blocks, found from the model, never by architecture name (`find_blocks`: the
largest nn.ModuleList of same-class children holding parameters, preferring a class the model names in
`_no_split_modules`, HF's list of blocks that must stay whole).  Their parameters (trainable or frozen) and the
optimizer's state buffers of their trainable parameters rest in host memory (pinned where the device is CUDA).
What stays on the device: every other parameter (embeddings, positional embeddings, the final norm, the head, a tied
head once) and every module buffer (rotary tables, masks: small); `memory()` says how much.

A step, block by block (forward pre- and post-hooks on each block; ZO2's schedule without its own forward):
  * the upload of block i+1 starts on a side stream when block i starts computing (block 0's when the model's
    forward starts); the compute stream waits for block i's upload event only when block i begins;
  * on arrival the previous step's update of the block's trainable tensors is applied on the device from what the
    optimizer's step() left (`pending`: the direction's seed, the step values and the update values computed from g,
    a SweepStep with its values frozen, zo.sweeps.Sweeper.frozen): the Sweeper's own update sweep restricted to those
    tensors, so the same rule, the same counter noise (a pure function of (seed, tensor index, element)), the same
    rounding: the resident run's bits.  Nothing else is kept between steps;
  * then the block computes: the forward-time probes (zo.probe, --zo_probe onepass: both signs in one pass) perturb
    inside its modules;
  * when it returns, a block that was updated is written back to the host on a second side stream (after its
    compute), while the next block computes; an unchanged block (a second forward in the same step, evaluation) is
    only dropped.  So with one-pass probes each block crosses the bus once each way per step.
Resident tensors are updated in step() as always (the sweep skips the streamed ones: Sweeper.only).

Exactly once: each block keeps its queue of pending steps (several where a step updates direction by direction);
arrival applies the queue in order and counts (`applied`, per block), and the write-back commits it.  A forward that
fails inside a block (an exception; the post-hook runs with always_call) drops the device copy and puts the queue
back, so the host never holds a half-applied step and the next arrival applies it again from the host's θ.
flush() applies every queue and waits for every write-back: the host then holds θ, which is what checkpoints save
(state_dict() and load_state_dict() of the model and of the bound optimizer flush first, and the trainer flushes
before evaluation, saving and the end of training; pending updates are never saved, so a checkpoint of a streamed
run is an ordinary one and resumes streamed or resident alike).  16-bit weights: a streamed tensor's rounded-away
updates (update_rounded_away) are counted when its update is applied, in the next step's figure.

The CPU stand-in: device "cpu" makes the device copy a separate CPU tensor and every copy synchronous; the code path
is otherwise the one CUDA runs (tests compare it bit for bit with the resident run).  Refused (refusal): in-place
probes (three sweeps of every tensor a step, all blocks at once) and methods whose step is not one element-wise update
of the core (they measure a loss at θ, judge candidate updates, or sweep low-rank factors themselves).
"""
from __future__ import annotations

from functools import partial
from inspect import unwrap

import torch
from torch import nn

from zo.core import ZOOptimizer

__all__ = ["Offloader", "find_blocks", "refusal", "OFFLOAD_MODES", "IN_FLIGHT"]

OFFLOAD_MODES = ("none", "cpu")
IN_FLIGHT = 3   # blocks on the device at once at most: the one computing, the next uploading, the last writing back
_OWN_STEP = ("probe", "probe_directions", "step", "apply_update", "center_loss", "probe_one_sided")


def refusal(cls: type[ZOOptimizer]) -> str:
    """Why a method cannot stream ('' where it can): its step must be the core's probes and one element-wise update
    sweep per direction, which can wait for each block; anything that reads or writes θ otherwise cannot."""
    # unwrapped: torch.optim wraps each optimizer class's step() for its profiler hooks
    own = [name for name in _OWN_STEP if unwrap(getattr(cls, name)) is not unwrap(getattr(ZOOptimizer, name))]
    if own:
        return (f"{cls.title} has its own {', '.join(own)} (it measures a loss at θ, judges candidate updates or probes "
                "one side), which a deferred element-wise update cannot follow")
    if cls.sweeps_itself() or cls.extra_state:
        return f"{cls.title} sweeps low-rank factors itself ({', '.join(cls.extra_state) or 'sweep_tensor'})"
    return ""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's repeated blocks: among the ModuleLists whose children are all one class and
    hold parameters, one whose class the model lists in `_no_split_modules` (HF: blocks kept whole on one device),
    else the one with the most parameters."""
    whole = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or len({type(c) for c in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        key = (type(module[0]).__name__ in whole, size)
        if size and (best is None or key > best[0]):
            best = (key, name, module)
    if best is None:
        raise ValueError(f"--zo_offload: {type(model).__name__} has no nn.ModuleList of same-class blocks holding "
                         "parameters to stream; train it resident (--zo_offload none)")
    return best[1], best[2]


class _Streams:
    """The copies: on CUDA two side streams (uploads, write-backs) and events; on the CPU stand-in plain copies."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.up, self.down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def copy(self, pairs, *, up: bool, after=None):
        """dst.copy_(src) for each pair, on the side stream of that direction after the work the compute stream has
        queued (a write-back: the block's compute; an upload: the last use of the memory it reuses) and after the
        event `after`; returns the event that marks them done (None on the stand-in: done)."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        stream = self.up if up else self.down
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                if not up:
                    src.record_stream(stream)   # the device copy is freed after the write-back has read it
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event):
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self):
        if self.cuda:
            self.up.synchronize()
            self.down.synchronize()


class _Block:
    def __init__(self, name, module, params):
        self.name, self.module, self.params = name, module, params
        self.trainable: list = []       # the optimizer's tensors among params (bind)
        self.state: list = []           # (param, buffer name) of their state buffers
        self.device = None              # the device copies, in the order of tensors(), while uploaded
        self.ready = self.written = None   # the events of the upload / the last write-back (CUDA)
        self.taken: list = []           # pending steps applied to the device copy, not yet written back


class Offloader:
    """The streaming of one model's blocks to `device` (torch.device or name; "cpu": the stand-in); the module
    docstring has the schedule.  `applied[i]` counts the steps applied to block i; `pending[i]` is its queue."""

    def __init__(self, model: nn.Module, device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.optimizer = model, None
        self.blocks_name, modules = find_blocks(model)
        owner: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):   # every name a parameter has
            inside = name[len(self.blocks_name) + 1:].split(".")[0] if name.startswith(self.blocks_name + ".") else None
            where = f"block {inside}" if inside is not None else "resident"
            if owner.setdefault(id(p), where) != where:
                raise ValueError(f"--zo_offload: parameter {name} is shared by {owner[id(p)]} and {where}; a streamed "
                                 "block must own its parameters: train this model resident (--zo_offload none)")
        self.blocks = [_Block(f"{self.blocks_name}.{i}", m, list(m.parameters())) for i, m in enumerate(modules)]
        streamed = {id(p) for b in self.blocks for p in b.params}
        self.resident = [p for p in model.parameters() if id(p) not in streamed]
        self.pending: list[list] = [[] for _ in self.blocks]
        self.applied = [0] * len(self.blocks)
        self.moved = {"up": 0, "down": 0}   # bytes copied to / from the device so far
        self._streams = _Streams(self.device)
        pin = self.device.type == "cuda"
        with torch.no_grad():
            for p in self.resident:
                p.data = p.data.to(self.device)
            for b in self.blocks:
                for p in b.params:
                    p.data = p.data.to("cpu").pin_memory() if pin else p.data.to("cpu")
            for module in model.modules():
                for key, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[key] = buf.to(self.device)
        # where the weights rest, for HF's Trainer and accelerate: a map of more than one device leaves them in place
        model.hf_device_map = {"": str(self.device), **{b.name: "cpu" for b in self.blocks}}
        # whoever saves or loads the weights sees θ: every pending update applied and written back first (a load
        # then overwrites it, so no update of the old weights lands on the loaded ones)
        self._hooks = [model.register_forward_pre_hook(self._model_begins),
                       model.register_state_dict_pre_hook(lambda *_: self.flush()),
                       model.register_load_state_dict_pre_hook(lambda *_: self.flush())]
        for i, b in enumerate(self.blocks):
            self._hooks.append(b.module.register_forward_pre_hook(partial(self._arrive, i)))
            self._hooks.append(b.module.register_forward_hook(partial(self._leave, i), always_call=True))

    # -- the optimizer
    def bind(self, optimizer: ZOOptimizer) -> None:
        """Defer the optimizer's updates of the streamed tensors to their block's next arrival (after attach(model):
        forward-time probes never write the weights)."""
        why = refusal(type(optimizer))
        if why:
            raise ValueError(f"--zo_offload cpu applies each step's element-wise update to a block when it next "
                             f"arrives; {why}: use --zo_offload none, or a method such as mezo or zo_adamu")
        if optimizer.probe_mode == "inplace":
            raise ValueError("--zo_offload cpu needs forward-time probes (--zo_probe onepass, or forward): in-place "
                             "probes sweep every tensor three times a step, which needs every block on the device")
        trainable = {id(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
        for b in self.blocks:
            b.trainable = [p for p in b.params if id(p) in trainable]
            b.state = [(p, name) for p in b.trainable for name in optimizer.buffers]
            for p, name in b.state:
                optimizer.sweeper.buffer(p, name)   # made on the host before the first step
        self.optimizer = optimizer
        self._hooks += [optimizer.register_state_dict_pre_hook(lambda *_: self.flush()),
                        optimizer.register_load_state_dict_pre_hook(lambda *_: self.flush())]
        optimizer.sweeper.only = {id(p) for p in self.resident}
        optimizer.sweeper.hold = self._hold

    def _hold(self, step) -> None:
        for queue in self.pending:
            queue.append(step)

    # -- the tensors of a block
    def _tensors(self, b: _Block) -> list[torch.Tensor]:
        """The host tensors of a block: its parameters, then its state buffers (pinned on first use where CUDA)."""
        state = self.optimizer.state if self.optimizer is not None else {}
        if self.device.type == "cuda":
            for p in b.params:
                if not p.data.is_pinned():   # a checkpoint load may have replaced them
                    p.data = p.data.pin_memory()
            for p, name in b.state:
                if not state[p][name].is_pinned():
                    state[p][name] = state[p][name].pin_memory()
        return [p.data for p in b.params] + [state[p][name] for p, name in b.state]

    def _point(self, b: _Block, tensors) -> None:
        """The block's parameters and state buffers made to hold `tensors` (device copies, or the host's)."""
        for p, t in zip(b.params, tensors):
            p.data = t
        for (p, name), t in zip(b.state, tensors[len(b.params):]):
            self.optimizer.state[p][name] = t

    def _upload(self, i: int) -> None:
        b = self.blocks[i]
        if b.device is not None:
            return
        host = self._tensors(b)
        with torch.inference_mode(False):   # copies made under evaluation's inference mode stay writable
            b.device = [torch.empty_like(t, device=self.device) for t in host]
        b.host = host
        b.ready = self._streams.copy(zip(b.device, host), up=True, after=b.written)
        self.moved["up"] += sum(t.numel() * t.element_size() for t in host)

    # -- the hooks
    def _model_begins(self, module, args):
        self._upload(0)

    @torch.no_grad()
    def _arrive(self, i: int, module=None, args=None) -> None:
        b = self.blocks[i]
        self._upload(i)
        self._streams.wait(b.ready)
        self._point(b, b.device)
        if i + 1 < len(self.blocks):
            self._upload(i + 1)     # overlaps this block's compute
        b.taken, self.pending[i] = self.pending[i], []
        for step in b.taken:
            self.optimizer.sweeper.apply(step, b.trainable)
            self.applied[i] += 1

    @torch.no_grad()
    def _leave(self, i: int, module=None, args=None, output=None) -> None:
        b = self.blocks[i]
        if b.device is None:
            return
        if output is None:   # the forward failed: the queue goes back, the host keeps θ before it
            self.pending[i] = b.taken + self.pending[i]
        elif b.taken:
            n = len(b.params)
            back = [(h, d) for h, d, p in zip(b.host, b.device, b.params) if any(p is q for q in b.trainable)]
            back += list(zip(b.host[n:], b.device[n:]))
            b.written = self._streams.copy(back, up=False)
            self.moved["down"] += sum(d.numel() * d.element_size() for _, d in back)
        b.taken = []
        self._point(b, b.host)
        b.device = b.host = b.ready = None

    # -- the host copy
    @torch.no_grad()
    def flush(self) -> None:
        """Every block's pending update applied and written back, every copy finished: the host holds θ (before a
        checkpoint, an evaluation that reads the host copy, or the end of training); prefetched copies are dropped
        (a checkpoint load may change the host copy next)."""
        for i, b in enumerate(self.blocks):
            if self.pending[i]:
                self._arrive(i)
                self._leave(i, output=True)
        self._streams.synchronize()   # before a prefetched copy is freed: its upload may still be writing it
        for b in self.blocks:
            if b.device is not None:
                self._point(b, b.host)
                b.device = b.host = b.ready = None

    def detach(self) -> None:
        """flush(), then remove the hooks and give the optimizer back its whole sweeps (the weights stay where they
        are: the blocks in host memory)."""
        self.flush()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.optimizer is not None:
            self.optimizer.sweeper.only = self.optimizer.sweeper.hold = None

    def report(self) -> dict:
        """For a run's training record: the device, the blocks, their bytes (memory()) and the bytes copied so far."""
        return {"device": str(self.device), "blocks_of": self.blocks_name, **self.memory(),
                "bytes_up": self.moved["up"], "bytes_down": self.moved["down"]}

    def memory(self) -> dict[str, int]:
        """Bytes: resident on the device (parameters and buffers), the largest block with its state, the most blocks in
        flight at once (IN_FLIGHT), and on the host (the streamed blocks and their state)."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        buffers = size(b for m in self.model.modules() for b in m._buffers.values() if b is not None)
        per_block = [size(self._tensors(b)) for b in self.blocks]
        resident_state = 0
        if self.optimizer is not None:
            names = self.optimizer.buffers
            resident_state = size(self.optimizer.state[p][n] for p in self.resident for n in names
                                  if n in self.optimizer.state.get(p, {}))
        return {"resident": size({id(p): p for p in self.resident}.values()) + buffers + resident_state,
                "block": max(per_block), "in_flight": IN_FLIGHT * max(per_block), "host": sum(per_block),
                "blocks": len(self.blocks)}
