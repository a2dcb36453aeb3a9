"""Weights streamed from host memory (--zo_offload cpu, zo.offload) on the CPU stand-in: the device copy is a separate
CPU tensor, every copy synchronous, the code path otherwise CUDA's.  The streamed run must equal the resident run bit
for bit (the deferred update is the resident sweep restricted to a block), apply each step's update exactly once per
block, and survive a failure inside a step and a resume from a checkpoint.  No GPU: the overlap of the streams and the
memory saved are not measured here (bench/offload.py)."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_model
from test_zo_probe import batch, closure, lm_loss, optimizer
from zo import registry as zo_methods
from zo.offload import Offloader, find_blocks, refusal

K = 3


def streamed(kind, name="mezo", mode="onepass", **kw):
    model = tiny_model(kind)
    offloader = Offloader(model, "cpu")
    opt = optimizer(model, mode, name, **kw)
    offloader.bind(opt)
    return model, opt, offloader


def steps(model, opt, n, inputs=None, directions=None):
    loss = lm_loss(inputs or batch())
    out = []
    for _ in range(n):
        if directions:
            opt.probe_directions(closure(opt, model, loss), directions)
            opt.step()
        else:
            opt.step(closure(opt, model, loss))
        out.append((float(opt.last_loss_plus), float(opt.last_loss_minus)))
    return out


def state_tensors(opt):
    return {(i, k): t for i, p in enumerate(opt.param_groups[0]["params"]) for k, t in opt.state[p].items()
            if torch.is_tensor(t)}


def assert_same(a_model, a_opt, b_model, b_opt):
    for (n, a), b in zip(a_model.named_parameters(), b_model.parameters()):
        assert torch.equal(a, b), n
    a, b = state_tensors(a_opt), state_tensors(b_opt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ bit for bit
@pytest.mark.parametrize("name", ["mezo", "zo_adamu"])
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_the_streamed_run_equals_the_resident_run_bit_for_bit(kind, name):
    resident = tiny_model(kind)
    opt = optimizer(resident, "onepass", name)
    want = steps(resident, opt, K)
    model, opt2, offloader = streamed(kind, name)
    assert steps(model, opt2, K) == want
    offloader.flush()
    assert_same(resident, opt, model, opt2)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model(kind).parameters()))
    # it did stream: every block came up each step and went back once its update was applied
    blocks = len(offloader.blocks)
    assert offloader.applied == [K] * blocks
    block = offloader.memory()["block"] - sum(opt2.state[p][b].numel() * 4 for p in offloader.blocks[0].trainable
                                              for b in opt2.buffers)
    assert offloader.moved["up"] >= K * blocks * block > 0


@pytest.mark.parametrize("mode,directions", [("forward", None), ("onepass", [0, 1])])
def test_two_forwards_a_step_and_several_directions_stream_bit_for_bit(mode, directions):
    """--zo_probe forward streams every block twice a step (updated on the first arrival only); MeZO's two directions
    a step queue two updates per block, applied in order."""
    resident = tiny_model("llama")
    opt = optimizer(resident, mode)
    want = steps(resident, opt, K, directions=directions)
    model, opt2, offloader = streamed("llama", mode=mode)
    assert steps(model, opt2, K, directions=directions) == want
    offloader.flush()
    assert_same(resident, opt, model, opt2)
    assert offloader.applied == [K * len(directions or [0])] * 2


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_adapters_stream_bit_for_bit_and_only_what_trains_goes_back(adapter):
    """LoRA: the frozen base weights of a block go up every step, only lora_A / lora_B come back; the prefix lives
    outside the blocks and is updated resident."""
    from test_zo_probe import build
    resident = build("llama", adapter=adapter)
    opt = optimizer(resident, "onepass")
    want = steps(resident, opt, K)
    model = build("llama", adapter=adapter)
    offloader = Offloader(model, "cpu")
    opt2 = optimizer(model, "onepass")
    offloader.bind(opt2)
    assert steps(model, opt2, K) == want
    offloader.flush()
    assert_same(resident, opt, model, opt2)
    trained = sum(p.numel() * 4 for b in offloader.blocks for p in b.trainable)
    assert offloader.moved["down"] == K * trained   # steps 2, 3 and the flush write back what trained, nothing else
    assert offloader.moved["up"] == (K + 1) * offloader.memory()["host"]


def test_resident_tensors_stay_on_the_device_and_blocks_rest_on_the_host():
    model, opt, offloader = streamed("llama")
    name, blocks = find_blocks(model)
    assert name == "model.layers" and offloader.blocks_name == name
    inside = {id(p) for p in blocks.parameters()}
    assert {id(p) for p in offloader.resident} == {id(p) for p in model.parameters()} - inside
    held = []   # blocks holding a device copy while each block computes: this one and the next, uploading
    for b in offloader.blocks:
        b.module.register_forward_hook(lambda *_: held.append(sum(c.device is not None for c in offloader.blocks)))
    steps(model, opt, 1)
    assert held and max(held) <= 2 and max(held) * offloader.memory()["block"] <= offloader.memory()["in_flight"]
    # between steps each block's parameters are its host tensors again, not a device copy
    host = [p.data.data_ptr() for b in offloader.blocks for p in b.params]
    steps(model, opt, 1)
    assert [p.data.data_ptr() for b in offloader.blocks for p in b.params] == host
    memory = offloader.memory()
    assert memory["host"] == sum(p.numel() * 4 for p in blocks.parameters())
    assert memory["resident"] >= sum(p.numel() * 4 for p in offloader.resident)


def test_evaluation_streams_the_same_logits_and_changes_nothing():
    resident = tiny_model("gpt2")
    opt = optimizer(resident, "onepass")
    steps(resident, opt, 2)
    model, opt2, offloader = streamed("gpt2")
    steps(model, opt2, 2)   # the second step's update is still pending: evaluation applies it on arrival
    inputs = batch()
    with torch.inference_mode():
        want = resident(**inputs).logits
        got = model(**inputs).logits
    assert torch.equal(got, want)
    offloader.flush()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode():
        model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert offloader.applied == [2, 2]
    steps(model, opt2, 1)   # parameters touched under inference mode still train
    steps(resident, opt, 1)
    offloader.flush()
    assert_same(resident, opt, model, opt2)


# ------------------------------------------------------------------------------------------------ exactly once
def test_the_pending_update_is_applied_exactly_once_per_block_per_step_around_a_checkpoint(tmp_path):
    model, opt, offloader = streamed("opt", "zo_adamu")
    calls = []
    apply = opt.sweeper.apply
    opt.sweeper.apply = lambda step, tensors: (calls.append((step.seed, tuple(map(id, tensors)))), apply(step, tensors))
    loss = lm_loss(batch())
    for t in range(3):
        opt.step(closure(opt, model, loss))
        # step t's forward applied step t-1's update to each block once; step t's now waits, once per block
        assert offloader.applied == [t, t] and [len(q) for q in offloader.pending] == [1, 1]
    offloader.flush()   # the last step before a checkpoint: applied once, on flush, not again
    assert offloader.applied == [3, 3] and offloader.pending == [[], []]
    offloader.flush()
    assert offloader.applied == [3, 3]
    assert len(calls) == len(set(calls)) == 3 * 2   # no (step, block) applied twice
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    model2 = tiny_model("opt")
    model2.load_state_dict(saved["model"])
    offloader2 = Offloader(model2, "cpu")
    opt2 = optimizer(model2, "onepass", "zo_adamu")
    opt2.load_state_dict(saved["opt"])
    offloader2.bind(opt2)
    opt2.step(closure(opt2, model2, loss))   # the first step after a resume: nothing was pending
    assert offloader2.applied == [0, 0] and [len(q) for q in offloader2.pending] == [1, 1]
    opt2.step(closure(opt2, model2, loss))
    assert offloader2.applied == [1, 1]
    opt.step(closure(opt, model, loss))
    opt.step(closure(opt, model, loss))
    offloader.flush()
    offloader2.flush()
    assert offloader2.applied == [2, 2]
    assert_same(model, opt, model2, opt2)


class Killed(Exception):
    pass


def kill_in_block(offloader, i):
    """A failure inside block i's forward, after its pending update was applied to its device copy."""
    handle = []

    def hook(module, args):
        handle[0].remove()
        raise Killed
    handle.append(offloader.blocks[i].module.register_forward_pre_hook(hook))


def test_a_failure_inside_a_step_leaves_no_block_half_updated_and_the_step_repeats_exactly():
    resident = tiny_model("llama")
    opt = optimizer(resident, "onepass", "zo_adamu")
    want = steps(resident, opt, 4)
    model, opt2, offloader = streamed("llama", "zo_adamu")
    got = steps(model, opt2, 2)
    kill_in_block(offloader, 1)   # block 0 has taken step 2's update and written it back; block 1 dies with it
    with pytest.raises(Killed):
        steps(model, opt2, 1)
    assert offloader.applied == [2, 2] and [len(q) for q in offloader.pending] == [0, 1]
    assert opt2.step_count == 2
    got += steps(model, opt2, 2)
    assert got == want
    offloader.flush()
    assert_same(resident, opt, model, opt2)


def test_a_run_killed_during_a_step_and_resumed_from_its_checkpoint_ends_identical(tmp_path):
    resident = tiny_model("gpt2")
    opt = optimizer(resident, "onepass", "zo_adamu")
    steps(resident, opt, 4)
    model, opt2, offloader = streamed("gpt2", "zo_adamu")
    steps(model, opt2, 2)
    assert offloader.applied == [1, 1]
    # no explicit flush: state_dict() of the model and of the optimizer apply the pending update first
    weights = {k: v.clone() for k, v in model.state_dict().items()}   # a copy before the optimizer's state_dict()
    torch.save({"model": weights, "opt": opt2.state_dict()}, tmp_path / "ckpt.pt")
    assert offloader.applied == [2, 2]
    kill_in_block(offloader, 1)
    with pytest.raises(Killed):
        steps(model, opt2, 1)
    del model, opt2, offloader   # the process is gone; its host copy with it
    saved = torch.load(tmp_path / "ckpt.pt")
    model, opt2, offloader = streamed("gpt2", "zo_adamu")
    model.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    steps(model, opt2, 2)
    offloader.flush()
    assert_same(resident, opt, model, opt2)


@pytest.mark.parametrize("name", ["mezo", "zo_adamu"])
def test_trainer_runs_stream_checkpoint_and_resume_as_the_resident_run(tmp_path, name):
    """ZOTrainer with --zo_offload cpu: the checkpoint of a streamed run (flushed before saving) holds the resident
    run's weights at that step, and a run killed inside the next step resumes from it to the resident run's end."""
    from safetensors.torch import load_file
    from test_trainer_zo import StopAfter, make_trainer
    base = tiny_model("llama")
    resident = copy.deepcopy(base)
    make_trainer(resident, tmp_path / "resident", name, steps=4, save="steps", save_steps=2, probe="onepass",
                 lr=1e-2).train()
    model = copy.deepcopy(base)
    trainer = make_trainer(model, tmp_path / "run", name, steps=4, save="steps", save_steps=2, probe="onepass",
                           offload="cpu", lr=1e-2)
    trainer.add_callback(StopAfter(2))
    trainer.train()
    assert trainer.offloader.applied == [2, 2] and trainer.offloader.pending == [[], []]
    for key in ("model.safetensors", "optimizer.pt"):
        if key.endswith("safetensors"):
            a, b = (load_file(str(tmp_path / d / "checkpoint-2" / key)) for d in ("resident", "run"))
        else:
            a, b = (torch.load(tmp_path / d / "checkpoint-2" / key)["state"] for d in ("resident", "run"))
            a, b = ({(k, n): t for k, s in x.items() for n, t in s.items() if torch.is_tensor(t)} for x in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    killed = make_trainer(copy.deepcopy(base), tmp_path / "run", name, steps=4, save="steps", save_steps=2,
                          probe="onepass", offload="cpu", lr=1e-2)
    kill_in_block(killed.offloader, 1)
    with pytest.raises(Killed):
        killed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    model = copy.deepcopy(base)
    resumed = make_trainer(model, tmp_path / "run", name, steps=4, save="steps", save_steps=2, probe="onepass",
                           offload="cpu", lr=1e-2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.offloader.applied == [2, 2]   # steps 3 and 4, once each: step 3 found nothing pending
    for (n, a), b in zip(resident.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name", ["hizoo", "fzoo", "zo_sgd_cons", "lozo", "lozo_m", "subzero"])
def test_methods_whose_step_is_not_one_element_wise_update_are_refused_with_the_reason(name):
    model = tiny_model("llama")
    offloader = Offloader(model, "cpu")
    mode = "inplace" if name == "zo_sgd_cons" else "onepass"
    opt = optimizer(model, mode, name)
    with pytest.raises(ValueError, match="--zo_offload cpu applies each step's element-wise update"):
        offloader.bind(opt)
    assert refusal(zo_methods.get(name))
    assert not refusal(zo_methods.get("mezo")) and not refusal(zo_methods.get("zo_adamu"))


def test_in_place_probes_and_models_without_blocks_are_refused():
    model = tiny_model("llama")
    offloader = Offloader(model, "cpu")
    with pytest.raises(ValueError, match="--zo_probe onepass"):
        offloader.bind(optimizer(model, "inplace"))
    with pytest.raises(ValueError, match="no nn.ModuleList of same-class blocks"):
        Offloader(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "cpu")
    shared = nn.Module()
    shared.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    shared.head = shared.layers[1]
    with pytest.raises(ValueError, match="is shared by block 1 and resident"):
        Offloader(shared, "cpu")


@pytest.mark.parametrize("extra,fix", [
    ([], "add --zo_probe onepass"),
    (["--zo_probe", "onepass", "--zo_optim", "hizoo"], "--zo_optim hizoo: HiZOO has its own probe"),
    (["--zo_probe", "onepass", "--zo_optim", "subzero"], "--zo_optim subzero: SubZero sweeps low-rank factors"),
])
def test_flags_refuse_what_cannot_stream(extra, fix):
    import args
    from cli import UsageError
    argv = ["--trainer", "zo", "--train_set_seed", "0", "--num_train", "8", "--max_steps", "2", "--zo_offload", "cpu"]
    with pytest.raises(UsageError, match=fix.replace("-", r"\-")):
        args.parse(argv + extra)
    config = args.parse(argv + ["--zo_probe", "onepass"])
    assert config.zo.zo_offload == "cpu"
    # the same bits as resident: a checkpoint of either resumes in the other (and earlier runs' ids hold)
    assert config.run_id() == args.parse(argv[:-2] + ["--zo_probe", "onepass"]).run_id()


def test_several_processes_and_fsdp_are_refused(monkeypatch):
    import args
    import parallel
    config = args.parse(["--trainer", "zo", "--train_set_seed", "0", "--num_train", "8", "--max_steps", "2",
                         "--zo_offload", "cpu", "--zo_probe", "onepass"])
    monkeypatch.setattr(parallel, "launched_world_size", lambda: 2)
    config.fsdp = ("full_shard",)
    problems = args.offload_problems(config)
    assert any("--fsdp shards every tensor" in p for p in problems)
    assert any("this launch has 2 processes" in p for p in problems)


# ------------------------------------------------------------------------------------------------ the benchmark
def test_the_benchmark_runs_end_to_end_on_the_stand_in_and_says_its_gpu_figures_are_unmeasured():
    import json
    import os
    import subprocess
    import sys
    from conftest import ROOT
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "offload.py"), "--shape", "tiny", "--steps", "2",
                           "--method", "zo_adamu"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["gpu_measured"] is False and "unmeasured" in report["note"]
    assert report["streamed"]["peak_gpu_gb"] is None and report["resident"]["peak_gpu_gb"] is None
    assert report["equal_weights"] is True and report["resident"]["fits"] is True
    streamed = report["streamed"]
    # each step uploads every block once and writes back every block it updated: 2 blocks, weights and momentum
    block = streamed["memory_bytes"]["block"]
    assert streamed["bytes_up_per_step"] > 0 and streamed["bytes_down_per_step"] <= streamed["bytes_up_per_step"]
    assert streamed["bytes_up_per_step"] == 2 * block
    assert report["plan"]["layers"] == 2 and report["plan"]["host_gb"] == pytest.approx(2 * report["plan"]["block_gb"],
                                                                                         abs=1e-3)


def test_run_py_trains_streamed_to_the_resident_result(tmp_path, monkeypatch, tiny_llama_dir):
    """run.py end to end (load in host memory, stream, evaluate streamed, write the result): the same metrics and
    losses as the resident run, and the same run name (streaming is not part of a run's identity)."""
    from test_run_training import train
    argv = ["--task_name", "SST2", "--trainer", "zo", "--zo_optim", "zo_adamu", "--learning_rate", "1e-2",
            "--zo_probe", "onepass", "--train_as_classification", "--eval_strategy", "steps", "--eval_steps", "2"]
    for sub in ("resident", "streamed"):
        (tmp_path / sub).mkdir()
    want, name = train(tmp_path / "resident", monkeypatch, tiny_llama_dir, *argv)
    got, streamed_name = train(tmp_path / "streamed", monkeypatch, tiny_llama_dir, *argv, "--zo_offload", "cpu")
    assert streamed_name == name
    for key in ("accuracy", "dev_accuracy"):
        assert got[key] == want[key], key
    assert got["predictions"] == want["predictions"]   # every test example's scores, from the trained weights
    assert got["config"]["zo_offload"] == "cpu" and "offload" not in want["training"]
    streamed = got["training"]["offload"]
    assert streamed["blocks_of"] == "model.layers" and streamed["blocks"] == 2
    assert streamed["bytes_up"] >= 3 * streamed["host"] > 0 and streamed["bytes_down"] > 0


def test_detach_flushes_and_the_optimizer_then_updates_every_tensor_at_once():
    resident = tiny_model("llama")
    opt = optimizer(resident, "onepass")
    steps(resident, opt, 3)
    model, opt2, offloader = streamed("llama")
    steps(model, opt2, 2)
    offloader.detach()   # step 2's update applied; from now on a resident run (on the host copy)
    assert offloader.applied == [2, 2] and offloader.pending == [[], []]
    steps(model, opt2, 1)
    assert offloader.applied == [2, 2]
    assert_same(resident, opt, model, opt2)
