"""Checkpoints written before the ZO core became the zo/ package still resume: an optimizer state_dict saved by the
code of commit 3c2ea36 (the flat zo_*.py modules, run in a subprocess from an extracted copy of that commit) loads into
the package's optimizer, and the two steps after it equal, bit for bit, the two steps that commit's code took after
saving."""
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT

OLD = "3c2ea36"
CASES = [("mezo", "float32"), ("zo_adamu", "bfloat16"), ("zo_adam", "float32"), ("hizoo", "float32"),
         ("lozo_m", "float32"), ("fzoo", "float32")]

# Shared by both sides: a model built from a closed form and an element-wise loss (no BLAS reduction order).
SETUP = '''
import math, torch
from torch import nn

def model(dtype):
    modules = nn.ModuleDict({"proj": nn.Linear(20, 12), "norm": nn.LayerNorm(20), "out": nn.Linear(12, 6, bias=False)})
    with torch.no_grad():
        for k, (name, p) in enumerate(modules.named_parameters()):
            values = [0.05 * math.sin(0.37 * i + k) + (1.0 if name == "norm.weight" else 0.0) for i in range(p.numel())]
            p.copy_(torch.tensor(values, dtype=torch.float64).view_as(p))
    return modules.to(dtype)

def closure(modules):
    def loss():
        total = torch.zeros((), dtype=torch.float64)
        for k, p in enumerate(modules.parameters()):
            x = p.detach().to(torch.float64).view(-1)
            i = torch.arange(x.numel(), dtype=torch.float64)
            total = total + (((x - 0.02 * torch.cos(0.5 * i + k)) ** 2) * (1 + i % 5)).sum()
        return total
    return loss

def settings(name, dtype):
    kw = dict(lr=1e-3 if dtype == "float32" else 1e-2, eps=1e-2, seed=3)
    return dict(kw, interval=2) if name == "lozo_m" else dict(kw, num_directions=3) if name == "fzoo" else kw
'''

OLD_RUN = SETUP + '''
import json, sys
sys.path.insert(0, sys.argv[1])
import zo, zo_methods
for name, dtype in json.loads(sys.argv[3]):
    modules = model(getattr(torch, dtype))
    opt = zo_methods.get(name)(zo.param_groups_for_model(modules, 0.01), **settings(name, dtype))
    for _ in range(3):
        opt.step(closure(modules))
    torch.save({"model": modules.state_dict(), "optimizer": opt.state_dict()}, f"{sys.argv[2]}/{name}-saved.pt")
    for _ in range(2):
        opt.step(closure(modules))
    torch.save(modules.state_dict(), f"{sys.argv[2]}/{name}-after.pt")
'''


@pytest.fixture(scope="module")
def old_checkpoints(tmp_path_factory):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    archive = subprocess.run([git, "-C", str(ROOT), "archive", OLD], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {OLD} is not in this clone's history")
    tree, out = tmp_path_factory.mktemp("old-tree"), tmp_path_factory.mktemp("old-checkpoints")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tree, filter="data")
    done = subprocess.run([sys.executable, "-c", OLD_RUN, str(tree), str(out), json.dumps(CASES)],
                          capture_output=True, text=True, timeout=900, cwd=tree)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name,dtype", CASES, ids=[c[0] for c in CASES])
def test_a_checkpoint_of_the_flat_modules_resumes_bit_for_bit(old_checkpoints, name, dtype):
    import zo
    space = {}
    exec(SETUP, space)
    saved = torch.load(old_checkpoints / f"{name}-saved.pt", weights_only=False)
    modules = space["model"](getattr(torch, dtype))
    modules.load_state_dict(saved["model"])
    opt = zo.get(name)(zo.param_groups_for_model(modules, 0.01), **space["settings"](name, dtype))
    opt.load_state_dict(saved["optimizer"])
    assert opt.step_count == 3
    for _ in range(2):
        opt.step(space["closure"](modules))
    after = torch.load(old_checkpoints / f"{name}-after.pt", weights_only=False)
    for key, value in modules.state_dict().items():
        assert torch.equal(value, after[key]), key
