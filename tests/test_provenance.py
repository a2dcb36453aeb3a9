"""Every result file says where it came from: package versions, device, git commit (dirty or not), wall time, and the
run folder whose trainer_state.json holds its curves."""

import json
import subprocess

import torch

import provenance
import run
from conftest import ROOT, shared_data_or_skip, tiny_model


def git(folder, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                   capture_output=True)


def test_git_state_names_the_commit_and_a_dirty_tree(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "result.json").write_text("{}")  # untracked files (results, runs) do not make the code dirty
    assert provenance.git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path) == {"git_commit": head, "git_dirty": True}


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
    assert provenance.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": None}


def test_record_has_versions_device_and_wall_time():
    record = provenance.collect(tiny_model("llama"), started=1000.0)
    assert record["versions"]["torch"] == torch.__version__
    assert set(provenance.PACKAGES) <= set(record["versions"])
    assert record["device"].startswith("cpu (") and "torch threads" in record["device"]
    done = provenance.finished(record, now=1012.34)
    assert done["wall_time_s"] == 12.3 and done["started_at"] < done["finished_at"]
    assert "_started" not in done and json.dumps(done)


def test_a_training_result_carries_provenance_and_its_run_folder(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run.main(["--model_name", str(tiny_llama_dir), "--task_name", "SST2", "--trainer", "zo",
                     "--learning_rate", "1e-3", "--num_train", "16", "--num_dev", "4", "--num_eval", "4",
                     "--train_set_seed", "0", "--max_steps", "2", "--per_device_train_batch_size", "4",
                     "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no",
                     "--report_to", "none", "--result_file", "results/r.json"])
    assert code == 0
    result = json.loads((tmp_path / "results" / "r.json").read_text())
    record = result["provenance"]
    assert record["versions"]["transformers"] and record["device"].startswith("cpu")
    assert record["wall_time_s"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert record["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    # run_dir is relative to the result file's folder, and holds the whole log history
    run_dir = tmp_path / "results" / result["run_dir"]
    assert run_dir.resolve().parent == (tmp_path / "result" / "output").resolve()
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert [e["step"] for e in history if "eval_accuracy" in e] == [1, 2]
