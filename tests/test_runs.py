"""Runs never lie: a run owns its folder, checkpoints are complete or ignored, signals checkpoint and stop, a killed run
resumes bit-identically, results never replace another run's (runs.py, run.py, trainer_zo.StopOnSignal).

Most tests run `python run.py` in a subprocess on a tiny random LLaMA with the embedded model's tokenizer and a
200-row copy of real SST2/RTE/CB rows, as a user would."""

import gzip
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import args
import runs
from conftest import ROOT, shared_data_or_skip


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first rows of real task files (fast to load), in the layout --data_dir expects."""
    source = shared_data_or_skip()
    target = tmp_path_factory.mktemp("data")
    for task in ("sst2", "rte", "cb"):
        (target / task).mkdir()
        for split in ("train", "validation"):
            path = next(p for p in (source / task).iterdir() if p.name.startswith(split + "."))
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as f:
                rows = [line for _, line in zip(range(200), f)]
            (target / task / f"{split}.jsonl").write_text("".join(rows))
    return target


def base_args(model_dir, *extra):
    return ["--model_name", str(model_dir), "--task_name", "SST2", "--trainer", "zo", "--num_train", "16",
            "--num_dev", "4", "--num_eval", "4", "--train_set_seed", "0", "--max_steps", "8",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1", "--report_to", "none",
            "--disable_tqdm", "true", "--save_model", *extra]


def environment(data, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZO_TEST")}
    env.update(ZO_DATA_DIR=str(data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               **(extra or {}))
    return env


def cli(cwd: Path, data, *argv, env=None, timeout=600):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], cwd=cwd, env=environment(data, env),
                          capture_output=True, text=True, timeout=timeout)


class Started:
    """A run.py process whose output goes to a file (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, cwd: Path, data, argv, env=None):
        cwd.mkdir(parents=True, exist_ok=True)
        self.log = cwd / f"run-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], cwd=cwd,
                                         env=environment(data, env), stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout=300) -> str:
        self.proc.wait(timeout=timeout)
        return self.output()


def start(cwd: Path, data, *argv, env=None) -> Started:
    return Started(cwd, data, argv, env)


def run_folder(cwd: Path) -> Path:
    folders = list((cwd / "result" / "output").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def wait_for(predicate, what: str, run=None, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"the run ended (status {run.proc.returncode}) before {what}:\n{run.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def result_files(cwd: Path) -> list[Path]:
    return sorted((cwd / "result").glob("*.json")) if (cwd / "result").is_dir() else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama_dir, small_data):
    """The uninterrupted run every interrupted one must end equal to."""
    cwd = tmp_path_factory.mktemp("straight")
    done = cli(cwd, small_data, *base_args(tiny_llama_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_files(cwd)[0].read_text())
    return weights(run_folder(cwd)), result


def assert_same_run(cwd: Path, straight):
    want_weights, want_result = straight
    got = weights(run_folder(cwd))
    assert got.keys() == want_weights.keys() and all(torch.equal(got[k], want_weights[k]) for k in got)
    result = json.loads(result_files(cwd)[0].read_text())
    assert result["predictions"] == want_result["predictions"] and result["accuracy"] == want_result["accuracy"]


# --- a run owns its folder --------------------------------------------------------------------------------------

def test_another_runs_checkpoint_is_never_resumed(tmp_path, tiny_llama_dir, small_data, straight):
    """Observation 1: an RTE run after an SST2 run (or one with other data sizes) used to resume the SST2 weights from
    the shared default folder and report them as its own result."""
    first = cli(tmp_path, small_data, *base_args(tiny_llama_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    for change in (["--task_name", "RTE"], ["--num_train", "12"]):
        other = cli(tmp_path, small_data, *base_args(tiny_llama_dir, *change))
        assert other.returncode == 0, other.stderr[-3000:]
        assert "Resuming" not in other.stderr
    assert len(list((tmp_path / "result" / "output").iterdir())) == 3  # one folder per configuration
    # the same command again finds its own finished run: nothing to train, the same result, no tied-head warning
    again = cli(tmp_path, small_data, *base_args(tiny_llama_dir))
    assert again.returncode == 0 and "is the last step of this run: nothing left to train" in again.stderr
    assert "missing keys" not in again.stderr


def test_a_finished_run_is_evaluated_from_its_last_checkpoint_not_trained_a_step_further(tmp_path, tiny_llama_dir,
                                                                                          small_data, straight):
    """Hugging Face, asked to resume from the checkpoint of a run's last step that ends inside an epoch, trains one
    step more (here: 6 steps of 4-example batches over 16 examples end in the second epoch). A rerun of a finished
    run must give the finished run's result."""
    argv = base_args(tiny_llama_dir, "--max_steps", "6")
    first = cli(tmp_path, small_data, *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(result_files(tmp_path)[0].read_text())
    again = cli(tmp_path, small_data, *argv)
    assert again.returncode == 0 and "nothing left to train" in again.stderr, again.stderr[-3000:]
    assert not list(run_folder(tmp_path).glob("checkpoint-7"))
    assert json.loads(result_files(tmp_path)[0].read_text())["predictions"] == result["predictions"]


def test_a_finished_checkpoint_of_any_name_is_evaluated_at_the_step_it_recorded(tmp_path, tiny_llama_dir,
                                                                                 small_data):
    """--resume_from_checkpoint may name a checkpoint kept under another name ("final"): the step a result records is
    the one the checkpoint's trainer state holds (run.py read it from the folder's name, and failed after the
    evaluation)."""
    argv = base_args(tiny_llama_dir, "--max_steps", "2")
    first = cli(tmp_path / "first", small_data, *argv)
    assert first.returncode == 0, first.stderr[-3000:]
    final = tmp_path / "final"
    shutil.copytree(run_folder(tmp_path / "first") / runs.checkpoint_name(2), final)
    again = cli(tmp_path / "again", small_data, *argv, "--resume_from_checkpoint", str(final))
    assert again.returncode == 0 and "nothing left to train" in again.stderr, again.stderr[-3000:]
    want, got = (json.loads(result_files(tmp_path / name)[0].read_text()) for name in ("first", "again"))
    assert got["training"]["global_step"] == 2 and got["predictions"] == want["predictions"]


def test_checkpoint_names_are_read_one_way_as_hugging_face_writes_them(tmp_path):
    """runs.checkpoint_name / checkpoint_step / checkpoints are the suite's only reading of checkpoint-N (report.py
    uses them too), on Hugging Face's prefix, and they pick the newest checkpoint as Hugging Face's own finder does."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    steps = {"checkpoint-2": 2, "checkpoint-10": 10, "checkpoint-9": 9, "checkpoint-old-30": None,
             "checkpoint-40.tmp": None, "checkpoint-": None, "tmp-checkpoint-50": None, "xcheckpoint-60": None,
             "checkpoint-7x": None, "final": None}
    for name in steps:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    assert {name: runs.checkpoint_step(tmp_path / name) for name in steps} == steps
    assert runs.checkpoint_step(f"{tmp_path}/checkpoint-10/") == 10 and runs.checkpoint_step("checkpoint-3") == 3
    assert runs.checkpoints(tmp_path) == [(step, tmp_path / f"checkpoint-{step}") for step in (10, 9, 2)]
    assert get_last_checkpoint(str(tmp_path)) == str(runs.checkpoints(tmp_path)[0][1])
    assert runs.checkpoint_name(10) == f"{PREFIX_CHECKPOINT_DIR}-10" == "checkpoint-10"
    assert runs.checkpoints(tmp_path / "nowhere") == []


def test_a_folder_of_another_run_stops_before_anything_loads(tmp_path, tiny_llama_dir, small_data):
    shared = ["--output_dir", str(tmp_path / "shared")]
    assert cli(tmp_path, small_data, *base_args(tiny_llama_dir, *shared, "--max_steps", "2")).returncode == 0
    before = sorted(p.name for p in result_files(tmp_path))
    other = cli(tmp_path, small_data, *base_args(tiny_llama_dir, *shared, "--max_steps", "2", "--task_name", "RTE"))
    assert other.returncode == 2
    assert "belongs to another run; its configuration differs in:" in other.stderr
    assert "--task_name: 'SST2' there, 'RTE' now" in other.stderr
    assert "--overwrite_output_dir" in other.stderr and "--output_dir" in other.stderr
    assert "Loading weights" not in other.stderr  # decided before the model loads
    assert sorted(p.name for p in result_files(tmp_path)) == before
    fresh = cli(tmp_path, small_data, *base_args(tiny_llama_dir, *shared, "--max_steps", "2", "--task_name", "RTE",
                                                 "--overwrite_output_dir"))
    assert fresh.returncode == 0 and "removing" in fresh.stderr and "Resuming" not in fresh.stderr


# --- checkpoints are complete or ignored --------------------------------------------------------------------------

def fake_checkpoint(folder: Path, step: int, identity: dict, complete=True, truncate=None):
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "optimizer.pt").write_bytes(b"x" * 100)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        files = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
        (checkpoint / runs.MARKER).write_text(json.dumps({"step": step, "identity": identity, "files": files}))
    if truncate:
        (checkpoint / truncate).write_bytes((checkpoint / truncate).read_bytes()[:7])
    return checkpoint


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_broken_ones(tmp_path):
    """Observations 2 and 3: a checkpoint cut short by a kill, or one whose files were truncated, used to break every
    later rerun with a traceback naming neither the file nor the way out."""
    identity = {"learning_rate": 0.001}
    fake_checkpoint(tmp_path, 5, identity)
    fake_checkpoint(tmp_path, 10, identity)
    fake_checkpoint(tmp_path, 15, identity, complete=False)            # killed during its save
    fake_checkpoint(tmp_path, 20, identity, truncate="optimizer.pt")   # truncated afterwards
    fake_checkpoint(tmp_path, 25, identity, truncate="trainer_state.json")
    plan = runs.plan_resume(tmp_path, identity, overwrite=False, explicit=None)
    assert plan.checkpoint == tmp_path / "checkpoint-10"
    assert plan.skipped == [
        f"{tmp_path / 'checkpoint-25' / 'trainer_state.json'} has 7 bytes, {len(json.dumps({'global_step': 25}))} "
        f"were written (truncated or replaced)",
        f"{tmp_path / 'checkpoint-20' / 'optimizer.pt'} has 7 bytes, 100 were written (truncated or replaced)",
        f"{tmp_path / 'checkpoint-15'} has no {runs.MARKER} (it was interrupted while being saved, or predates this "
        f"check)"]
    with pytest.raises(runs.UsageError, match="differs in:\n  --learning_rate: 0.001 there, 0.002 now"):
        runs.plan_resume(tmp_path, {"learning_rate": 0.002}, overwrite=False, explicit=None)


def test_a_folder_with_only_broken_checkpoints_starts_over_only_when_asked(tmp_path):
    fake_checkpoint(tmp_path, 15, {}, complete=False)
    with pytest.raises(runs.UsageError) as caught:
        runs.plan_resume(tmp_path, {}, overwrite=False, explicit=None)
    text = str(caught.value)
    assert "holds checkpoints, and none can be resumed from" in text and "checkpoint-15 has no" in text
    assert "--overwrite_output_dir" in text
    plan = runs.plan_resume(tmp_path, {}, overwrite=True, explicit=None)
    assert plan.checkpoint is None and plan.wipe == [tmp_path / "checkpoint-15"]
    with pytest.raises(runs.UsageError, match="--resume_from_checkpoint .*checkpoint-15: .* has no"):
        runs.plan_resume(tmp_path, {}, overwrite=False, explicit=str(tmp_path / "checkpoint-15"))


def test_a_problem_of_several_lines_counts_once_in_the_heading(tmp_path, monkeypatch, caplog, tiny_llama_dir,
                                                                small_data):
    """The heading counted lines: "3 problems with this command" headed a folder of another run, one problem."""
    broken = tmp_path / "broken"
    fake_checkpoint(broken, 15, {}, complete=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / runs.RUN_CONFIG).write_text(json.dumps({"run_id": "x", "identity": {"learning_rate": 1.0}}))
    written = tmp_path / "written"
    fake_checkpoint(written, 4, {"learning_rate": 1.0})

    def headed(*extra):
        caplog.clear()
        assert call_main(tmp_path, small_data, monkeypatch, *base_args(tiny_llama_dir, *extra)) == 2
        [message] = [r.getMessage() for r in caplog.records if "with this command" in r.getMessage()]
        return message

    for folder, opening in ((broken, "holds checkpoints, and none can be resumed from"),
                            (other, "belongs to another run"), (written, "was written by another configuration")):
        message = headed("--output_dir", str(folder))
        assert message.startswith("1 problem with this command;") and opening in message, message
    # two problems: two in the count, each with its own lines
    message = headed("--output_dir", str(broken), "--result_file", str(tmp_path))
    assert message.startswith("2 problems with this command;") and "checkpoint-15 has no" in message
    assert f"--result_file {tmp_path} is a folder" in message


def test_problems_with_flags_and_with_folders_are_one_kind_reported_alike(tmp_path, monkeypatch, caplog,
                                                                          tiny_llama_dir, small_data):
    """A bad flag (args.py) and a folder the run cannot use (runs.py, whose RunError is the old name) are one class
    of error, and run.py heads each the same way wherever it is found, also once the data are loaded (--num_dev
    taking the whole draw used to be printed bare, without the heading)."""
    assert runs.RunError is args.UsageError is runs.UsageError
    other = tmp_path / "other"
    other.mkdir()
    (other / runs.RUN_CONFIG).write_text(json.dumps({"run_id": "x", "identity": {"learning_rate": 1.0}}))
    for extra, outcome, problem in ((["--zo_eps", "0"], "nothing was run or written", "--zo_eps 0.0: must be > 0.0"),
                                    (["--output_dir", str(other)], "nothing was run or written",
                                     "belongs to another run"),
                                    (["--num_dev", "200"], "the run stopped",   # the 200 rows of small_data
                                     "No training examples left: the draw has 200 rows and --num_dev 200 takes them")):
        caplog.clear()
        assert call_main(tmp_path, small_data, monkeypatch, *base_args(tiny_llama_dir, *extra)) == 2
        [message] = [r.getMessage() for r in caplog.records if "with this command" in r.getMessage()]
        assert message.startswith(f"1 problem with this command; {outcome}:\n  ") and problem in message, message


def test_killed_anywhere_then_rerun_ends_bit_identical(tmp_path, tiny_llama_dir, small_data, stall_hooks, straight):
    """SIGKILL in the middle of a checkpoint save, then at random moments; each rerun of the same command resumes from
    the newest complete checkpoint, and the finished run equals the uninterrupted one bit for bit (CPU, fp32)."""
    argv = base_args(tiny_llama_dir)
    flag = tmp_path / "stalled"
    run = start(tmp_path, small_data, *argv, env={"PYTHONPATH": str(stall_hooks), "ZO_TEST_STALL_SAVE": "3",
                                                  "ZO_TEST_STALL_FLAG": str(flag)})
    wait_for(flag.exists, "the stalled save of checkpoint-3", run)
    run.proc.kill()
    run.finish()
    folder = run_folder(tmp_path)
    assert (folder / "checkpoint-3" / "optimizer.pt").is_file() and not (folder / "checkpoint-3" / runs.MARKER).exists()

    def complete():
        return {p.parent.name for p in folder.glob(f"checkpoint-*/{runs.MARKER}")}

    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        before = complete()
        run = start(tmp_path, small_data, *argv)
        # a new checkpoint, or the end (an earlier kill may have come after the last checkpoint)
        wait_for(lambda: complete() - before or run.proc.poll() is not None, "a new checkpoint")
        time.sleep(rng.uniform(0.0, 0.4))  # within the remaining steps, at an arbitrary point of one
        if run.proc.poll() is None:
            kills += 1
            run.proc.send_signal(signal.SIGKILL)
        output = run.finish()
        if attempt == 0:  # the rerun after the interrupted save named it and resumed from the one before
            assert f"checkpoint-3 has no {runs.MARKER}" in output, output[-3000:]
            assert "checkpoint-2" in output.split("Resuming from")[1].splitlines()[0]
        if run.proc.returncode == 0:
            break
    assert kills >= 1
    final = cli(tmp_path, small_data, *argv)
    assert final.returncode == 0, final.stderr[-3000:]
    if "Resuming from" in final.stderr:  # on a loaded machine three attempts, each killed, can end before the run
        final = cli(tmp_path, small_data, *argv)
        assert final.returncode == 0, final.stderr[-3000:]
    # the finished run is not trained again: its last checkpoint is evaluated
    assert "is the last step of this run: nothing left to train" in final.stderr, final.stderr[-3000:]
    assert_same_run(tmp_path, straight)


# --- signals ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_a_complete_checkpoint_and_stops_with_the_resume_command(tmp_path, tiny_llama_dir, small_data,
                                                                               straight, signum):
    argv = base_args(tiny_llama_dir, "--save_steps", "100")  # no scheduled save: the signal's is the only one
    run = start(tmp_path, small_data, *argv)
    # after the first step's log line: the handlers that checkpoint are installed when training begins (a signal
    # before that stops the run with a line saying that nothing was written)
    wait_for(lambda: "'loss'" in run.output(), "the first training step", run)
    run.proc.send_signal(signum)
    stderr = run.finish()
    assert run.proc.returncode == 128 + signum, stderr[-3000:]
    folder = run_folder(tmp_path)
    saved = [p for p in folder.glob("checkpoint-*") if runs.checkpoint_problem(p) is None]
    assert len(saved) == 1 and runs.checkpoint_step(saved[0]) < 8
    name = signal.Signals(signum).name
    assert f"{name}: stopped after step" in stderr and "Resume with:" in stderr and "run.py" in stderr
    assert not result_files(tmp_path)  # no result for a run that did not finish
    if signum == signal.SIGTERM:  # the rerun continues to the same end as the uninterrupted run
        rerun = cli(tmp_path, small_data, *argv)
        assert rerun.returncode == 0 and f"Resuming from {saved[0].relative_to(tmp_path)}" in rerun.stderr
        assert_same_run(tmp_path, straight)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_training_stops_with_one_line_saying_so(tmp_path, monkeypatch, caplog, tiny_llama_dir,
                                                               small_data, signum):
    """A signal while the model loaded used to end the run without a word (SIGTERM) or with a traceback (SIGINT)."""
    import run
    before = signal.getsignal(signum)

    def interrupted_loading(config):
        # the run's own handler must be in place: the default one would end this test process
        assert signal.getsignal(signum) is not before, "nothing catches the signal while the model loads"
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at the next bytecode; this line is never finished
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(run, "load_model", interrupted_loading)
    status = call_main(tmp_path, small_data, monkeypatch, *base_args(tiny_llama_dir))
    name = signal.Signals(signum).name
    assert status == 128 + signum
    [line] = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert line.startswith(f"{name} while loading the model") and "before training began" in line, line
    assert "nothing was written" in line and f"exit status {128 + signum}" in line and "\n" not in line, line
    assert not (tmp_path / "result").exists()  # no run folder, no result
    assert signal.getsignal(signum) is before  # the process's handler is back


# --- results ------------------------------------------------------------------------------------------------------

def call_main(cwd: Path, data, monkeypatch, *argv):
    import run
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ZO_DATA_DIR", str(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return run.main(list(argv))


def test_results_of_another_run_are_never_replaced(tmp_path, monkeypatch, caplog, tiny_llama_dir, small_data):
    """Observation 5: two runs differing only in what their name leaves out used to write the same file."""
    icl = ["--model_name", str(tiny_llama_dir), "--task_name", "SST2", "--num_eval", "4", "--train_set_seed", "1",
           "--num_train", "2", "--disable_tqdm", "true"]
    assert call_main(tmp_path, small_data, monkeypatch, *icl) == 0
    assert call_main(tmp_path, small_data, monkeypatch, *icl, "--max_length", "1024") == 0   # not in the name
    files = result_files(tmp_path)
    assert len(files) == 2 and "holds the result of another run" in caplog.text
    plain = tmp_path / "result" / "SST2-tiny-llama0-sampleeval4-ntrain2-trainset0.json"
    [other] = [p for p in files if p != plain]
    first, beside = json.loads(plain.read_text()), json.loads(other.read_text())
    assert other.name == f"{plain.stem}-{beside['run_id']}.json"  # the second run's result, named by its run id
    assert first["run_id"] != beside["run_id"] and beside["config"]["max_length"] == 1024
    assert call_main(tmp_path, small_data, monkeypatch, *icl) == 0  # the same run again replaces its own file
    assert len(result_files(tmp_path)) == 2


def test_sizes_the_data_cannot_give_are_warned_recorded_and_named(tmp_path, monkeypatch, caplog, tiny_llama_dir,
                                                                 small_data):
    """Observation 5: --num_eval 100000 on CB evaluated 56 examples into a file named sampleeval100000."""
    caplog.set_level(logging.INFO)
    argv = ["--model_name", str(tiny_llama_dir), "--task_name", "CB", "--num_eval", "100000", "--disable_tqdm", "true"]
    assert call_main(tmp_path, small_data, monkeypatch, *argv) == 0
    [path] = result_files(tmp_path)
    result = json.loads(path.read_text())
    assert path.name == "CB-tiny-llama0-sampleeval56-onetrainpereval.json"
    assert result["clipped"]["num_eval"]["requested"] == 100000 and result["clipped"]["num_eval"]["used"] == 56
    assert result["sizes"]["eval"] == 56 and len(result["predictions"]) == 56
    assert caplog.text.count("--num_eval 100000: only 56 used") == 1
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("===== CB"))
    assert "NOTE --num_eval 100000 -> 56" in summary and "data local:" in summary


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_result_files_respect_the_umask(tmp_path, monkeypatch, tiny_llama_dir, small_data, umask):
    old = os.umask(umask)
    try:
        assert call_main(tmp_path, small_data, monkeypatch, "--model_name", str(tiny_llama_dir), "--num_eval", "2",
                         "--disable_tqdm", "true") == 0
    finally:
        os.umask(old)
    [path] = result_files(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("mode", [[], ["--lora"]])
def test_saved_weights_respect_the_umask(tmp_path, monkeypatch, tiny_llama_dir, small_data, mode):
    """safetensors writes through a temporary file created 0600: weights were readable by their owner alone."""
    old = os.umask(0o022)
    try:
        assert call_main(tmp_path, small_data, monkeypatch, *base_args(tiny_llama_dir, "--max_steps", "1",
                                                                       "--no_final_eval", *mode)) == 0
    finally:
        os.umask(old)
    folder = run_folder(tmp_path)
    saved = sorted(folder.rglob("*.safetensors"))
    weights_name = "adapter_model.safetensors" if mode else "model.safetensors"
    # --save_model's weights in the run folder, and a checkpoint's
    assert {p.relative_to(folder).as_posix() for p in saved} == {weights_name, f"checkpoint-1/{weights_name}"}
    modes = {p.relative_to(folder).as_posix(): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*")
             if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


# --- long phases show progress ------------------------------------------------------------------------------------

def test_evaluation_and_generation_show_progress_with_rate_and_eta(tmp_path, tiny_llama_dir, small_data):
    done = cli(tmp_path, small_data, "--model_name", str(tiny_llama_dir), "--num_eval", "6", "--num_train", "1",
               "--per_device_eval_batch_size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Encoding SST2: 100%" in done.stderr and "Scoring: 100%" in done.stderr and "prompt/s]" in done.stderr
    squad = tmp_path / "squad"
    (squad / "squad").mkdir(parents=True)
    row = json.dumps({"title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
                      "answers": {"text": ["France"], "answer_start": [12]}})
    for split in ("train", "validation"):
        (squad / "squad" / f"{split}.jsonl").write_text((row + "\n") * 3)
    done = cli(tmp_path, squad, "--model_name", str(tiny_llama_dir), "--task_name", "SQuAD", "--num_eval", "3",
               "--max_new_tokens", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Generating SQuAD: 100%" in done.stderr and "ex/s]" in done.stderr
