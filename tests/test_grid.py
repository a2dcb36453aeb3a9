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
