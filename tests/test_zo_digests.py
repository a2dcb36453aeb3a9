"""Every optimizer's arithmetic, pinned: sha256 digests of the weights and the optimizer state after a few steps (one
of them skipped for a non-finite loss), per optimizer x {fp32, bf16} x {one direction, two where the method takes
them}, recorded in tests/fixtures/zo_digests.json.  A refactoring of the ZO core must reproduce every digest bit for
bit; a change that means to alter a method's arithmetic re-records them (python tests/test_zo_digests.py --record) and
says why in its commit.

Nothing here depends on the machine: the weights start from a closed-form pattern (not torch's RNG, whose vectorised
normal sampler differs across instruction sets), and the loss is evaluated in Python floats over a fixed subset of the
weights (not a BLAS reduction, whose summation order does): only the optimizer's own arithmetic, which is IEEE
element-wise and the counter noise, decides the digests."""
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zo  # noqa: E402
from zo import registry as zo_methods  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "zo_digests.json"
SHAPES = {"proj.weight": (12, 20), "proj.bias": (12,), "norm.weight": (20,), "out.weight": (6, 12)}
STEPS, SKIPPED = 4, 1          # step 1 sees a non-finite loss
EPS, WEIGHT_DECAY = 1e-2, 0.01
LR = {"float32": 1e-3, "bfloat16": 1e-2}   # bf16: steps that survive its rounding near 1.0


def model(dtype) -> nn.Module:
    modules = nn.ModuleDict({"proj": nn.Linear(20, 12), "norm": nn.LayerNorm(20, elementwise_affine=True),
                             "out": nn.Linear(12, 6, bias=False)})
    with torch.no_grad():
        for k, (name, p) in enumerate(modules.named_parameters()):
            values = [0.05 * math.sin(0.37 * i + k) + (1.0 if name == "norm.weight" else 0.0) for i in range(p.numel())]
            p.copy_(torch.tensor(values, dtype=torch.float64).view_as(p))
    modules.norm.bias.requires_grad_(False)   # a frozen tensor between trainable ones keeps its noise index
    return modules.to(dtype)


def loss_of(modules: nn.Module):
    """A smooth loss of every trainable tensor, evaluated in Python floats over every third element."""
    def closure():
        total = 0.0
        for k, p in enumerate(modules.parameters()):
            values = p.detach().to(torch.float64).view(-1)[::3].tolist()
            total += sum((x - 0.02 * math.cos(0.5 * i + k)) ** 2 * (1 + (i % 5)) for i, x in enumerate(values))
        return torch.tensor(total, dtype=torch.float64)
    return closure


def nan_loss():
    return torch.tensor(float("nan"), dtype=torch.float64)


def cases():
    for name, cls in zo_methods.OPTIMIZERS.items():
        several = cls.direction_bound()[0] != 1
        counts = (2, 3) if cls.min_directions > 1 else (1, 2) if several else (1,)
        for dtype in ("float32", "bfloat16"):
            for q in counts:
                yield f"{name}-{dtype}-q{q}", name, dtype, q


def run(name: str, dtype: str, q: int) -> str:
    cls = zo_methods.get(name)
    modules = model(getattr(torch, dtype))
    kwargs = {}
    if "num_directions" in __import__("args").accepted_keywords(cls):
        kwargs["num_directions"] = q
    if name in ("lozo", "lozo_m", "subzero"):
        kwargs["interval"] = 2   # a refresh of the slow factors inside the few steps
    opt = cls(zo.param_groups_for_model(modules, WEIGHT_DECAY), lr=LR[dtype], eps=EPS, seed=3, **kwargs)
    closure = loss_of(modules)
    for step in range(STEPS):
        loss = nan_loss if step == SKIPPED else closure
        if name == "fzoo" or q == 1:
            opt.step(loss)
        else:
            for direction in range(q):
                opt.probe(loss, direction=direction)
            opt.step()
    assert opt.step_count == STEPS and int(opt.skipped_steps) == 1
    start = model(getattr(torch, dtype))
    moved = [not torch.equal(a, b) for a, b in zip(modules.parameters(), start.parameters()) if a.requires_grad]
    assert all(moved), f"{name} {dtype}: a trainable tensor did not move, so its digest pins nothing"
    return digest(modules, opt)


def digest(modules: nn.Module, opt) -> str:
    sha = hashlib.sha256()
    for p in modules.parameters():
        sha.update(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for index, (p, state) in enumerate(opt.state.items()):
        for key in sorted(state):
            value = state[key]
            sha.update(f"{index}:{key}".encode())
            if torch.is_tensor(value):
                sha.update(str(value.dtype).encode() + value.detach().contiguous().view(-1).view(torch.uint8).numpy()
                           .tobytes())
            else:
                sha.update(repr(value).encode())
    return sha.hexdigest()


@pytest.mark.parametrize("case,name,dtype,q", list(cases()), ids=[c[0] for c in cases()])
def test_every_optimizer_reproduces_its_recorded_digest(case, name, dtype, q):
    recorded = json.loads(FIXTURE.read_text())
    assert case in recorded["digests"], f"{case} has no recorded digest: run python {Path(__file__).name} --record"
    assert run(name, dtype, q) == recorded["digests"][case]


def test_the_digests_see_a_change_of_one_ulp_in_the_weights():
    modules = model(torch.float32)
    opt = zo_methods.get("mezo")(zo.param_groups_for_model(modules, WEIGHT_DECAY), lr=1e-3, eps=EPS)
    before = digest(modules, opt)
    with torch.no_grad():
        p = next(modules.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1.0))
    assert digest(modules, opt) != before


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"recorded_at_commit": commit, "digests": {
        case: run(name, dtype, q) for case, name, dtype, q in cases()}}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
