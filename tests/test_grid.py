"""grid.sh: a grid killed midway and rerun with the same command completes only the missing runs."""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, shared_data_or_skip

GRID = {"LRS": "1e-3 1e-4 1e-5", "SEEDS": "0", "EPSS": "1e-3", "MODES": "ft", "OPTIMS": "mezo", "STEPS": "4",
        "BS": "4", "TRAIN": "16", "DEV": "4", "EVAL": "4", "EVAL_STEPS": "1", "OUT": "grid", "PRECISION": ""}


def environment(tmp_path, model_dir, **overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "TASK", "MODES", "OPTIMS", "LRS", "EPSS")}
    env.update(GRID, MODEL=str(model_dir), TASK="SST2", ZO_DATA_DIR=str(shared_data_or_skip()), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.update(overrides)
    return env


def grid(tmp_path, env, *args):
    return subprocess.run(["bash", str(ROOT / "grid.sh"), "--report_to", "none", "--disable_tqdm", "true", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_a_killed_grid_reruns_only_the_missing_runs(tmp_path, tiny_llama_dir):
    env = environment(tmp_path, tiny_llama_dir)
    out = tmp_path / "grid"
    process = subprocess.Popen(["bash", str(ROOT / "grid.sh"), "--report_to", "none", "--disable_tqdm", "true"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not list(out.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        # the first run has its result: kill the whole grid (and the run it started next) without warning
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    first = sorted(out.glob("*.json"))
    assert len(first) == 1, "the grid should have been killed after its first run"
    stamp = first[0].stat().st_mtime_ns

    done = grid(tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(out.glob("*.json"))
    assert len(results) == 3
    assert first[0].stat().st_mtime_ns == stamp  # not run again
    assert done.stdout.count("result exists, skipped") == 1 and done.stdout.count(": running") == 2
    assert "3 of 3 runs have results" in done.stdout and "(2 run now, 1 skipped)" in done.stdout
    assert all(name.startswith("SST2-") and "-mezo-ft-lr" in name for name in (p.name for p in results))

    again = grid(tmp_path, env)  # everything is there: nothing runs
    assert again.returncode == 0 and again.stdout.count("result exists, skipped") == 3
    assert "(0 run now, 3 skipped)" in again.stdout


def test_extra_flags_change_the_names_and_bad_lists_are_refused(tmp_path, tiny_llama_dir):
    env = environment(tmp_path, tiny_llama_dir, LRS="1e-3", STEPS="1")
    done = grid(tmp_path, env, "--num_prefix", "not-a-number")
    # run.py refuses the flag; the grid reports the failed run and exits 1
    assert done.returncode == 1 and "failed: SST2-" in done.stderr and "-x" in done.stderr
    for bad, message in ((dict(MODES="ft bogus"), "unknown mode 'bogus'"), (dict(SEEDS=" "), "SEEDS is empty")):
        done = grid(tmp_path, environment(tmp_path, tiny_llama_dir, **bad))
        assert done.returncode == 2 and message in done.stderr
    assert not list((tmp_path / "grid").glob("*.json"))


def test_a_run_stopped_by_a_signal_stops_the_grid(tmp_path, tiny_llama_dir):
    """run.py checkpoints and exits 128+signal on SIGTERM: the grid must stop there, not go on to the next run."""
    env = environment(tmp_path, tiny_llama_dir, LRS="1e-3 1e-4", STEPS="400", EVAL_STEPS="1000")
    process = subprocess.Popen(["bash", str(ROOT / "grid.sh"), "--report_to", "none", "--disable_tqdm", "true",
                                "--logging_steps", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    deadline = time.monotonic() + 600
    for line in process.stdout:
        seen.append(line)
        if "'loss'" in line or time.monotonic() > deadline:  # training has started
            break
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        os.kill(int(child), signal.SIGTERM)
    rest = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert "rerun the same command to continue" in rest and rest.count(": running") == 0
    assert not list((tmp_path / "grid").glob("*.json"))
    assert list((tmp_path / "grid" / "output").glob("*/checkpoint-*/checkpoint_complete.json"))


def test_a_forward_budget_gives_each_method_its_steps_and_locked_runs_are_left_to_their_grid(tmp_path, tiny_llama_dir):
    """FORWARDS=6: MeZO (2 forward passes a step) runs 3 steps, HiZOO (3) 2, Adam (one forward and one backward) 6;
    LRS_<optim> gives one method its own list, and JOBS=2 runs two at a time.  A configuration whose lock another
    grid holds is skipped and named, and the grid exits 1 until it has every result."""
    import fcntl
    env = environment(tmp_path, tiny_llama_dir, OPTIMS="mezo hizoo adam", MODES="lora", FORWARDS="6",
                      EVAL_FORWARDS="3", JOBS="2", LRS="1e-3", LRS_mezo="1e-3 1e-4", EPSS="1e-2")
    out = tmp_path / "grid"
    (out / "locks").mkdir(parents=True)
    held = "SST2-" + tiny_llama_dir.name + "-mezo-lora-lr1e-4-eps1e-2-seed0-steps3-bs4-n16-4-4-x"
    # the extra flags' hash is part of the name: find it the way grid.sh computes it
    extra = subprocess.run(["bash", "-c", "printf '%s\\0' --report_to none --disable_tqdm true | cksum | cut -d' ' -f1"],
                           capture_output=True, text=True).stdout.strip()
    with open(out / "locks" / f"{held}{extra}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = grid(tmp_path, env)
    assert done.returncode == 1 and f"{held}{extra}: running in another grid, skipped" in done.stdout, done.stderr
    names = sorted(p.name for p in out.glob("*.json"))
    assert [n.split("-lora-")[0].rsplit("-", 1)[1] + " " + n.split("-seed0-")[1].split("-")[0] for n in names] == [
        "adam steps6", "hizoo steps2", "mezo steps3"], names
    assert any("-adam-lora-lr1e-3-seed0-" in n and "-eps" not in n for n in names)
    import json
    for path in out.glob("*.json"):
        record = json.loads(path.read_text())
        training, config = record["training"], record["config"]
        assert training["global_step"] == config["max_steps"] == int(path.name.split("-steps")[1].split("-")[0])
        want = 1 if config["trainer"] == "regular" else {"mezo": 2, "hizoo": 3}[config["zo_optim"]]
        assert training["forward_passes_this_process"] == want * training["global_step"]
        assert config["eval_steps"] == 3 // want and training["peak_rss_mb"] > 0
    again = grid(tmp_path, env)   # the lock is free now: the missing run, alone
    assert again.returncode == 0 and again.stdout.count(": running") == 1, again.stderr


def test_no_run_starts_after_stop_at(tmp_path, tiny_llama_dir):
    """STOP_AT (epoch seconds) is for a machine lent for a fixed time: finished runs are still skipped, nothing new
    starts once it has passed, the runs left are named and the grid exits 1; a value that is no time is refused."""
    import time as clock
    env = environment(tmp_path, tiny_llama_dir, LRS="1e-3", STEPS="1")
    assert grid(tmp_path, env).returncode == 0
    late = grid(tmp_path, environment(tmp_path, tiny_llama_dir, LRS="1e-3 1e-4", STEPS="1",
                                      STOP_AT=str(int(clock.time()) - 1)))
    assert late.returncode == 1, late.stderr
    assert late.stdout.count("result exists, skipped") == 1 and late.stdout.count(": running") == 0
    assert "-lr1e-4-" in late.stderr and "not started before STOP_AT" in late.stderr
    assert len(list((tmp_path / "grid").glob("*.json"))) == 1
    bad = grid(tmp_path, environment(tmp_path, tiny_llama_dir, STOP_AT="soon"))
    assert bad.returncode == 2 and "STOP_AT=soon is not a positive integer" in bad.stderr
