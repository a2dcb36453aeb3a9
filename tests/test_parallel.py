"""Several processes (torchrun, gloo, 2 CPU processes, tiny models): data-parallel ZO keeps the ranks bit-identical
and equals one process on the whole batch; ZO on FSDP2 shards equals the unsharded run; a killed 2-process run resumes
to the same end; ranks that disagree stop before anything loads; FSDP first-order fine-tuning trains on CPUs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import args
from conftest import ROOT, shared_data_or_skip

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def environment(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def worker(tmp_path, model_dir, name, nproc, *extra):
    out = tmp_path / name
    out.mkdir()
    command = (launcher(nproc) if nproc > 1 else [sys.executable]) + [
        str(ROOT / "tests" / "distributed_worker.py"), str(model_dir), str(out), *extra]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.mark.parametrize("optimizer", ["mezo", "zo_adamu"])
def test_data_parallel_ranks_stay_identical_and_equal_one_process_on_the_whole_batch(tmp_path, tiny_llama_dir,
                                                                                       optimizer):
    two = worker(tmp_path, tiny_llama_dir, "two", 2, "--batch", "2", "--optimizer", optimizer)
    one = worker(tmp_path, tiny_llama_dir, "one", 1, "--batch", "4", "--optimizer", optimizer)
    a, b, whole = two[0]["params"], two[1]["params"], one[0]["params"]
    assert a.keys() == b.keys() == whole.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks drifted apart"
    # The ranks' losses are combined as Σ w·ℓ / Σ w (in float64) from fp32 losses of half batches: they equal the
    # whole batch's fp32 loss to a few ulps (stated tolerance: 1e-6 relative). The projected gradient divides a
    # difference of two such losses by 2ε, which scales that round-off up (here 1e-6 x 10.8 / 2e-3): 1e-3 relative;
    # the weights then differ by lr·Δg·|z| per step, under 1e-4 after these steps.
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(two[0]["projected_grads"]), torch.tensor(one[0]["projected_grads"]),
                               rtol=1e-3, atol=0)
    for k in a:
        torch.testing.assert_close(a[k], whole[k], rtol=0, atol=1e-4, msg=k)
    assert two[0]["world"] == 2


@pytest.mark.parametrize("mode", ["lora", "prefix", "head"])
def test_every_mode_keeps_the_ranks_identical_with_gradient_accumulation(tmp_path, tiny_llama_dir, mode):
    two = worker(tmp_path, tiny_llama_dir, "two", 2, "--batch", "1", "--accumulation", "2", "--mode", mode,
                 "--optimizer", "zo_adamu")
    a, b = two[0]["params"], two[1]["params"]
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the ranks drifted apart"
    one = worker(tmp_path, tiny_llama_dir, "one", 1, "--batch", "2", "--accumulation", "2", "--mode", mode,
                 "--optimizer", "zo_adamu")
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("optimizer", ["mezo", "lozo", "fzoo"])
def test_direction_parallelism_equals_one_process_probing_every_direction(tmp_path, tiny_llama_dir, optimizer):
    """2 ranks probe 2 of 4 directions each on the same batch and exchange the (direction, g) sums: every rank ends
    where one process probing all 4 ends, bit for bit (exact restore: each direction's probes start from θ itself in
    the one process too, so every loss is the same computation)."""
    common = ("--batch", "2", "--accumulation", "2", "--steps", "3", "--optimizer", optimizer, "--directions", "4",
              "--exact_restore", "always")
    two = worker(tmp_path, tiny_llama_dir, "two", 2, *common, "--zo_parallel", "directions")
    one = worker(tmp_path, tiny_llama_dir, "one", 1, *common)
    a, b, whole = two[0]["params"], two[1]["params"], one[0]["params"]
    assert a.keys() == b.keys() == whole.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks drifted apart"
    assert all(torch.equal(a[k], whole[k]) for k in a), "direction parallelism left the one-process run"
    assert two[0]["projected_grads"] == one[0]["projected_grads"]
    # and the directions did move the weights: the run differs from one direction a step
    single = worker(tmp_path, tiny_llama_dir, "single", 1, *common[:-4], "--directions",
                    "2" if optimizer == "fzoo" else "1", "--exact_restore", "always")
    assert not all(torch.equal(a[k], single[0]["params"][k]) for k in a)


def test_zo_on_fsdp2_shards_equals_the_unsharded_run(tmp_path, tiny_llama_dir):
    sharded = worker(tmp_path, tiny_llama_dir, "sharded", 2, "--fsdp")
    plain = worker(tmp_path, tiny_llama_dir, "plain", 2)
    for rank in (0, 1):
        got, want = sharded[rank]["params"], plain[0]["params"]
        assert all(torch.equal(got[k], want[k]) for k in want), "a sharded run drew other directions"
    assert sharded[0]["projected_grads"] == plain[0]["projected_grads"]


# --- through run.py ---------------------------------------------------------------------------------------------

def run_args(model_dir, *extra):
    return ["--model_name", str(model_dir), "--task_name", "SST2", "--trainer", "zo", "--num_train", "16",
            "--num_dev", "4", "--num_eval", "4", "--train_set_seed", "0", "--max_steps", "6",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--save_strategy", "steps",
            "--save_steps", "1", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
            "--save_model", *extra]


def saved_weights(cwd: Path) -> dict:
    from safetensors.torch import load_file
    [folder] = list((cwd / "result" / "output").iterdir())
    return load_file(str(folder / "model.safetensors"))


def test_a_killed_two_process_run_resumes_to_the_same_end(tmp_path, tiny_llama_dir, stall_hooks):
    data = shared_data_or_skip()
    env = environment(ZO_DATA_DIR=str(data))
    command = launcher(2) + [str(ROOT / "run.py"), *run_args(tiny_llama_dir)]
    straight = tmp_path / "straight"
    straight.mkdir()
    done = subprocess.run(command, cwd=straight, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    flag = tmp_path / "stalled"  # set by each rank in the middle of saving checkpoint-3 (conftest.stall_hooks)
    stall = dict(env, PYTHONPATH=str(stall_hooks), ZO_TEST_STALL_SAVE="3", ZO_TEST_STALL_FLAG=str(flag))
    with open(killed / "log", "w") as log:
        proc = subprocess.Popen(launcher(2) + [str(ROOT / "run.py"), *run_args(tiny_llama_dir)], cwd=killed,
                                env=stall, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (killed / "log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, in the middle of a save
    proc.wait()
    rerun = subprocess.run(launcher(2) + [str(ROOT / "run.py"), *run_args(tiny_llama_dir)], cwd=killed, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "checkpoint-2" in rerun.stderr.split("Resuming from")[1].splitlines()[0], \
        rerun.stderr[-4000:]
    want, got = saved_weights(straight), saved_weights(killed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    result = json.loads(next((killed / "result").glob("*.json")).read_text())
    assert result["config"]["per_device_train_batch_size"] == 2 and "-bs4-" in next(
        (killed / "result").glob("*.json")).name  # named by the global batch


def test_run_py_splits_directions_over_the_ranks_and_refuses_an_uneven_split(tmp_path, tiny_llama_dir):
    data = shared_data_or_skip()
    common = ["--zo_parallel", "directions", "--max_steps", "2", "--save_strategy", "no"]
    uneven = subprocess.run(launcher(2) + [str(ROOT / "run.py"), *run_args(tiny_llama_dir, *common),
                                           "--zo_num_directions", "3"],
                            cwd=tmp_path, env=environment(ZO_DATA_DIR=str(data)), capture_output=True, text=True,
                            timeout=600)
    assert uneven.returncode != 0 and "--zo_num_directions 3 does not split over 2 processes" in uneven.stderr
    assert "Loading weights" not in uneven.stderr and not (tmp_path / "result").exists()
    done = subprocess.run(launcher(2) + [str(ROOT / "run.py"), *run_args(tiny_llama_dir, *common),
                                         "--zo_num_directions", "4"],
                          cwd=tmp_path, env=environment(ZO_DATA_DIR=str(data)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [result] = (tmp_path / "result").glob("*.json")
    # every rank took the whole batch: the global batch is one rank's 2 examples, and the name records 4 directions
    assert "-dirs4-" in result.name and "-bs2-" in result.name, result.name
    assert done.stderr.count("===== SST2:") == 1, done.stderr[-4000:]  # the summary once, not once a rank


def test_ranks_that_disagree_stop_before_anything_loads(tmp_path, tiny_llama_dir):
    data = shared_data_or_skip()
    script = tmp_path / "per_rank.sh"  # each rank gets another seed, as a badly written launch script would do
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "run.py"}" "$@" --seed "$LOCAL_RANK"\n')
    script.chmod(0o755)
    command = launcher(2)
    command.insert(3, "--no-python")
    done = subprocess.run(command + [str(script), *run_args(tiny_llama_dir)], cwd=tmp_path,
                          env=environment(ZO_DATA_DIR=str(data)), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "The processes disagree on the run's configuration" in done.stderr and "'seed': 0" in done.stderr
    assert "Loading weights" not in done.stderr and not (tmp_path / "result").exists()


def test_finetune_fsdp_trains_on_two_cpu_processes(tmp_path, tiny_llama_dir):
    """First-order fine-tuning with the weights sharded over 2 CPU processes (gloo): the loss falls, the best
    checkpoint's weights are loaded back at the end."""
    data = shared_data_or_skip()
    env = environment(ZO_DATA_DIR=str(data), NPROC="2", MODEL=str(tiny_llama_dir), TRAIN="24", DEV="8", EVAL="8",
                      EPOCH="3", BS="4", LR="3e-3", PRECISION="")
    done = subprocess.run(["bash", str(ROOT / "finetune_fsdp.sh"), "--logging_steps", "1", "--report_to", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    [folder] = list((tmp_path / "result" / "output").iterdir())
    state = json.loads(max(folder.glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) >= 6 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert "Loading the best weights from" in done.stderr
    assert json.loads(next((tmp_path / "result").glob("*.json")).read_text())["sizes"]["train"] == 24
    # the weights that the ranks gathered and saved are readable as the umask allows, as every other file
    umask = os.umask(0o022)
    os.umask(umask)
    saved = list(folder.glob("checkpoint-*/model.safetensors"))
    assert saved and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in saved)
    # --fsdp reaches transformers in the form it takes; the summary is printed once, not once a rank
    assert "Passing `fsdp` as a string is deprecated" not in done.stderr
    assert done.stderr.count("===== SST2:") == 1, done.stderr[-4000:]


@pytest.mark.parametrize("argv,message", [
    (["--fsdp", "shard_grad_op", "--save_strategy", "no"], "--fsdp shard_grad_op is not available"),
    (["--fsdp", "full_shard"], "pass --save_only_model"),
    (["--fsdp", "full_shard", "--save_strategy", "no", "--fsdp_config", "{}"], "--fsdp_config is not used"),
])
def test_sharding_that_the_suite_cannot_serve_is_refused_with_the_alternative(monkeypatch, argv, message):
    import parallel
    monkeypatch.setattr(parallel, "launched_world_size", lambda: 2)  # as under torchrun, without its process group
    with pytest.raises(args.UsageError) as caught:
        args.parse(["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", *argv])
    assert any(message in p for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("typed,config", [("full_shard", {"reshard_after_forward": True}),
                                          ("full_shard auto_wrap offload", {"reshard_after_forward": True,
                                                                            "cpu_offload": True})])
def test_fsdp_reaches_transformers_in_the_form_it_takes(monkeypatch, typed, config):
    """transformers deprecates --fsdp as a string ("Passing `fsdp` as a string is deprecated"): it takes fsdp=True
    and the options in fsdp_config. The command line stays the same."""
    import logging

    import parallel
    monkeypatch.setattr(parallel, "launched_world_size", lambda: 2)
    said = []
    listener = logging.Handler()
    listener.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(listener)  # it does not propagate to the root logger
    try:
        parsed = args.parse(["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--fsdp", typed,
                             "--save_strategy", "no"])
    finally:
        logging.getLogger("transformers").removeHandler(listener)
    assert not [m for m in said if "fsdp" in m and "deprecated" in m], said
    assert parsed.fsdp == tuple(typed.split()) and parsed.hf.fsdp is True
    assert {k: parsed.hf.fsdp_config[k] for k in config} == config and \
        ("cpu_offload" in parsed.hf.fsdp_config) == ("offload" in typed)


def test_fsdp_needs_several_processes():
    with pytest.raises(args.UsageError, match="--fsdp shards the model over the processes of a launch"):
        args.parse(["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--fsdp", "full_shard",
                    "--save_strategy", "no"])


def test_scaling_benchmark_runs_every_mode_and_reports_its_json(tiny_llama_dir):
    data = shared_data_or_skip()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--model", str(tiny_llama_dir),
                           "--procs", "1,2", "--batch", "1", "--seq", "16", "--steps", "1"],
                          env=environment(ZO_DATA_DIR=str(data)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["procs"] == [1, 2] and set(report["modes"]) == {"dp", "fsdp"}
    assert len(report["examples_per_s"]) == len(report["efficiency"]) == 2 and report["efficiency"][0] == 1.0
    assert all(r["examples_per_s"] > 0 for mode in report["modes"].values() for r in mode["runs"])
