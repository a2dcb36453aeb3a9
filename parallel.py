"""What the suite does with several processes (launched by `torchrun` or `accelerate launch`; the process group is the
one the Hugging Face Trainer's setup initialises: NCCL on GPUs, gloo on CPUs).

* `world()`: this process's rank and the number of processes (1, 0 without torch.distributed).
* `mean_over_ranks(loss, weight)`: the loss of the global batch from each rank's loss of its shard, weighted by what
  each loss averages over (examples or option tokens), so data-parallel ZO computes the projected gradient of the
  whole batch and every rank applies the same update without a parameter ever being sent.
* `agree(value, what)`: every rank holds the same value (the run's configuration, checked before anything loads), or
  a clear error naming the ranks that differ.
* `shard` / `gather`: an evaluation split over the ranks and its records put back in order (not for a model sharded
  with FSDP2, whose every forward is a collective: there all ranks run the same forwards in lockstep).
* `is_sharded(model)` / `reshard(model)`: whether the weights are FSDP2 shards, and putting each module back in its
  sharded state after a forward (the root module keeps its gathered weights after a forward; a ZO perturbation of
  the shards would not reach them).
* `directions_of_rank(q)` / `share_directions(optimizer, q)`: direction parallelism, where every rank probes its
  block of a step's q directions on the same batch, and the (direction, g) sums are all-reduced so every rank
  records the others' and applies all q updates (3 numbers and a count per direction cross the network).
* `finish(clean)`: the process group torn down at the end of a run, after a barrier when the run ended cleanly.
* `max_over_ranks(value)`: the largest of an int over the ranks (a signal received by one process stops all of them
  at the same step).
* `local_part(p)` / `shard_offset(p)`: the part of a (possibly FSDP2-sharded) tensor this process holds, and where
  it starts in the flattened full tensor.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if initialised():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun / accelerate set WORLD_SIZE), before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device_for_collectives() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """sum_r weight_r·loss_r / sum_r weight_r over the ranks, in float64 (one process: the loss itself)."""
    if not initialised():
        return loss
    parts = torch.stack([loss.detach().to(torch.float64) * weight, torch.tensor(float(weight), dtype=torch.float64,
                                                                                 device=loss.device)])
    parts = parts.to(_device_for_collectives())
    dist.all_reduce(parts)
    return (parts[0] / parts[1]).to(loss.device, torch.promote_types(loss.dtype, torch.float32))


def directions_of_rank(q: int) -> range:
    """This rank's contiguous block of a step's q directions (all of them in one process); q divides evenly (args)."""
    rank, size = world()
    per = q // size
    return range(rank * per, (rank + 1) * per)


def share_directions(optimizer, q: int) -> None:
    """Every rank ends with the measurements of all q directions of this step: each rank's own (from its probes)
    and the others' (recorded).  One all-reduce of [q, 4] float64 values, where each direction's row is non-zero on
    the one rank that probed it; adding zeros is exact, so a recorded direction equals the probed one bit for bit."""
    if not initialised():
        return
    own = optimizer.measurements()
    table = torch.zeros((q, 4), dtype=torch.float64)
    for direction, (g, lp, lm, probes) in own.items():
        table[direction] = torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in (g, lp, lm, probes)])
    table = table.to(_device_for_collectives())
    dist.all_reduce(table)
    table = table.cpu()
    like = next(iter(own.values()))[0] if own else torch.tensor(0.0)
    for direction in range(q):
        if direction in own:
            continue
        g, lp, lm, probes = table[direction].tolist()
        if probes < 1:
            raise RuntimeError(f"direction {direction} of this step was probed by no rank; every rank must probe "
                               f"its block (directions_of_rank)")
        optimizer.record_direction(direction, *(torch.tensor(x, dtype=like.dtype, device=like.device)
                                                for x in (g, lp, lm)), probes=int(probes))


def max_over_ranks(value: int) -> int:
    if not initialised():
        return value
    tensor = torch.tensor([int(value)], device=_device_for_collectives())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agree(value, what: str) -> str | None:
    """None if every rank holds `value`, else a message naming the ranks that differ (the same on every rank)."""
    if not initialised():
        return None
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if all(v == values[0] for v in values):
        return None
    if all(isinstance(v, dict) for v in values):  # name only the entries that differ
        keys = sorted({k for v in values for k in v if any(other.get(k) != v.get(k) for other in values)})
        values = [{k: v.get(k) for k in keys} for v in values]
    groups = {}
    for rank, v in enumerate(values):
        groups.setdefault(repr(v)[:300], []).append(rank)
    listed = "; ".join(f"ranks {ranks}: {v}" for v, ranks in groups.items())
    return (f"The processes disagree on {what} ({listed}). Launch every rank with the same command line and "
            f"environment.")


def shard(items: list) -> list:
    """This rank's share of an evaluation: items rank, rank + world, ... (all of them in one process)."""
    rank, size = world()
    return items[rank::size]


def gather(records: list, total: int) -> list:
    """The records of every rank's `shard`, back in the original order (every rank gets all of them)."""
    if not initialised():
        return records
    size = dist.get_world_size()
    parts = [None] * size
    dist.all_gather_object(parts, records)
    merged = [None] * total
    for rank, part in enumerate(parts):
        merged[rank::size] = part
    return merged


def _fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(_fsdp_modules(model))


def reshard(model) -> None:
    for module in _fsdp_modules(model):
        module.reshard()


def barrier() -> None:
    if initialised():
        dist.barrier()


def finish(clean: bool) -> None:
    """The end of a process under torchrun: every rank waits for the others (only after a clean end: a rank that
    failed would leave them waiting until torchrun stops them), then the process group goes. A gloo group left to the
    interpreter's exit can abort a rank whose peer has already closed its side ("terminate called without an active
    exception", SIGABRT, after the run had written its result)."""
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def local_part(p: torch.Tensor) -> torch.Tensor:
    """The part of p this process holds and sweeps: a DTensor's local shard (FSDP2), else p itself."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_offset(p: "DTensor") -> int:
    """Element offset of this rank's shard in the flattened full tensor. Only dimension-0 sharding over a 1-D mesh is
    a contiguous run of the flattened tensor (what FSDP2's fully_shard produces); anything else is refused."""
    from torch.distributed.tensor import Replicate, Shard
    placements = tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return 0
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"ZO sweeps a shard as one run of the flattened tensor, which needs dimension-0 sharding on a "
                         f"1-D device mesh (FSDP2's fully_shard); this parameter is placed {placements}. Shard with "
                         f"--fsdp (full_shard), or train without sharding.")
    rows, ranks = p.shape[0], p.device_mesh.size(0)
    per_rank = -(-rows // ranks)  # torch.chunk: every chunk but the last holds ceil(rows / ranks) rows
    start = min(per_rank * p.device_mesh.get_local_rank(0), rows)
    return start * (p.numel() // rows if rows else 0)
