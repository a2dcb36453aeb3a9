"""run.py end to end: real ICL runs on the embedded model and real data, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

import args
import run
import runs
from conftest import ROOT, shared_data_or_skip


def run_cli(tmp_path, *args, env=None):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task,num_train,expected_name", [
    ("SST2", 0, "SST2-smollm2-135m-sampleeval48-onetrainpereval.json"),
    ("SST2", 4, "SST2-smollm2-135m-sampleeval48-ntrain4-onetrainpereval.json"),
    ("Copa", 0, "Copa-smollm2-135m-sampleeval48-onetrainpereval.json"),
    ("Copa", 4, "Copa-smollm2-135m-sampleeval48-ntrain4-onetrainpereval.json"),
])
def test_icl_on_embedded_model_and_real_rows(tmp_path, task, num_train, expected_name):
    data = shared_data_or_skip()
    done = run_cli(tmp_path, "--task_name", task, "--num_train", str(num_train), "--num_eval", "48",
                   env={"ZO_DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result" / expected_name).read_text())
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["data_source"].startswith("local:")
    assert result["sizes"] == {"train": num_train, "dev": 0, "eval": 48}
    assert result["config"]["task_name"] == task and result["config"]["num_train"] == num_train
    predictions = result["predictions"]
    assert len(predictions) == 48
    assert result["accuracy"] == pytest.approx(
        sum(p["predicted_candidate"] == p["correct_candidate"] for p in predictions) / 48)
    # a pretrained model is far from uniform: its option scores differ between candidates
    assert any(p["scores"][0] != p["scores"][1] for p in predictions)


def test_shared_demo_set_mode_writes_trainset_file(tmp_path):
    data = shared_data_or_skip()
    done = run_cli(tmp_path, "--task_name", "SST2", "--num_train", "4", "--num_eval", "16", "--train_set_seed", "5",
                   "--tag", "icl", env={"ZO_DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result" / "SST2-smollm2-135m-sampleeval16-ntrain4-icl-trainset0.json").read_text())
    assert result["train_set_seed"] == 5 and result["sizes"]["train"] == 4


def test_every_result_records_the_version_of_its_prompts(tmp_path, monkeypatch):
    """As lm-eval records a task's version: a result names the revision of its task's prompt format (templates.py's
    Template.version), which report.py keeps apart."""
    import templates
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    monkeypatch.setattr(templates.SST2Template, "version", "7")
    assert call_main(tmp_path, monkeypatch, "--task_name", "SST2", "--num_train", "2", "--train_set_seed", "0",
                     "--num_eval", "4") == 0
    [path] = (tmp_path / "result").glob("*.json")
    assert json.loads(path.read_text())["prompt_version"] == "7"


ZO = ["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0"]


def test_legacy_evaluation_strategy_spelling_is_accepted():
    config = args.parse(["--evaluation_strategy", "steps", "--eval_steps", "10"])
    assert config.hf.eval_strategy == "steps"
    config = args.parse(["--evaluation_strategy=epoch"])
    assert config.hf.eval_strategy == "epoch"


def test_defaults_follow_the_reference():
    config = args.parse([])
    assert (config.task.task_name, config.task.num_train, config.zo.zo_eps, config.model.max_length,
            config.evaluation.max_new_tokens) == ("SST2", 0, 1e-3, 2048, 50)
    assert config.train.only_train_option and not config.peft.prefix_reparam and config.peft.prefix_init_by_real_act
    assert config.model.model_name == "smollm2-135m" and config.mode == "icl"


def test_cuda_graphs_flag():
    assert args.parse([]).zo.zo_cuda_graphs
    assert not args.parse([*ZO, "--no_zo_cuda_graphs"]).zo.zo_cuda_graphs
    assert not args.parse([*ZO, "--zo_cuda_graphs", "false"]).zo.zo_cuda_graphs
    with pytest.raises(args.UsageError, match="--zo_cuda_graphs 'maybe': expected true or false"):
        args.parse([*ZO, "--zo_cuda_graphs", "maybe"])  # the flag, the value and what to pass


def call_main(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return run.main(list(args))


@pytest.mark.parametrize("argv,message", [
    (["--task_name", "Foo"], "--task_name 'Foo' is not available. Choose one of SST2, RTE"),
    (["--task_name", "copa"], "Did you mean 'Copa'? (names are case-sensitive)"),
    (["--task_name", "SST2", "--num_dev", "8"], "--num_dev 8 only applies to training"),
    (["--task_name", "SQuAD", "--sfc"], "task SQuAD is a generation task"),
    (["--task_name", "SST2", "--icl_sfc"  , "--task_name", "DROP"], "task DROP is a generation task"),
    (["--task_name", "SST2", "--trainer", "bogus"], "--trainer 'bogus' is not available"),
    (["--model_name", "no-such-org/no-such-model"], "--model_name no-such-org/no-such-model is not in the Hugging Face "
                                                    "cache and HF_HUB_OFFLINE is set"),
    (["--model_name", "./nope"], "--model_name ./nope: no such local folder"),
    (["--result_file", "/proc/x.json"], "--result_file /proc/x.json: cannot write in /proc"),
    ([*ZO, "--output_dir", "/proc/x"], "--output_dir /proc/x: cannot write in /proc"),
    ([*ZO, "--task_name", "SQuAD", "--max_length", "8", "--max_new_tokens", "2"],
     "tokens) does not fit in --max_length 8; raise --max_length"),
    # training combinations
    (["--trainer", "zo", "--num_train", "8"], "needs --train_set_seed S"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_eps", "0"], "--zo_eps 0.0: must be > 0.0"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_optim", "adam"], "--zo_optim 'adam' is not available. Choose one of mezo, zo_adamu"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--fsdp", "full_shard"], "this is one process; start several: torchrun"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_optim", "zo_adamu", "--max_steps", "100",
      "--zo_t1", "60", "--zo_t2", "50"], "ZO-AdaMU schedule"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_optim", "zo_adamu", "--max_steps", "100",
      "--zo_t2", "90", "--zo_t3", "80"], "ZO-AdaMU schedule"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_direction", "uniform"],
     "--zo_direction 'uniform' is not available. Choose one of gaussian, rademacher"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_exact_restore", "sometimes"],
     "--zo_exact_restore 'sometimes' is not available. Choose one of auto, always, never"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_carry_perturbation",
      "--zo_keep_direction"], "--zo_carry_perturbation and --zo_keep_direction do not combine"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_state_dtype", "int8"],
     "--zo_state_dtype 'int8' is not available. Choose one of float32, bfloat16, float16"),
    (["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--zo_optim", "zo_adamu", "--max_steps", "100",
      "--zo_phi_beta2", "10"], "ZO-AdaMU schedule: phi_beta2=10.0"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--non_diff"],
     "--non_diff only applies with --trainer zo"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--lora", "--head_tuning"], "choose one"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--load_int8"], "inference only"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--load_float16", "--fp16"],
     "AMP cannot unscale fp16 gradients"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--linear_probing",
      "--train_as_classification"], "--linear_probing fits a head on the option tokens; drop"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--fsdp", "full_shard auto_wrap"],
     "this is one process; start several: torchrun"),
    (["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--load_best_model_at_end",
      "--eval_strategy", "steps", "--save_strategy", "steps"], "pass --num_dev N"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, monkeypatch, caplog, argv, message):
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    assert call_main(tmp_path, monkeypatch, *argv, "--num_eval", "4") == 2
    assert message in caplog.text
    assert not (tmp_path / "result").exists()


def test_bad_data_dir_fails_clearly(tmp_path, monkeypatch, caplog):
    (tmp_path / "data" / "rte").mkdir(parents=True)
    (tmp_path / "data" / "rte" / "train.jsonl").write_text('{"premise": "p", "idx": 0, "label": 0}\n')
    (tmp_path / "data" / "rte" / "validation.jsonl").write_text("")
    assert call_main(tmp_path, monkeypatch, "--task_name", "RTE", "--data_dir", "data") != 0
    assert "train.jsonl:1: row lacks field(s) hypothesis" in caplog.text
    assert call_main(tmp_path, monkeypatch, "--task_name", "CB", "--data_dir", "data") != 0
    assert "no train.jsonl or train.jsonl.gz in data/cb" in caplog.text
    assert not (tmp_path / "result").exists()


def test_library_warnings_are_printed_once():
    """huggingface_hub and datasets print through a handler of their own and pass the record on to the root logger:
    each hub retry warning used to appear twice."""
    emit = ("import logging, run; assert run.main(['--max_steps', '-5']) == 2; "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].'); "
            "logging.getLogger('datasets.load').warning('Using the latest cached version of the dataset')")
    done = subprocess.run([sys.executable, "-c", emit], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr
    assert done.stderr.count("Using the latest cached version") == 1, done.stderr
    # in the run's format, with the logger that said it
    assert "WARNING huggingface_hub.utils._http: Retrying in 1s" in done.stderr


def test_result_file_name_follows_the_reference():
    config = args.parse(["--task_name", "SST2", "--model_name", "facebook/opt-13b", "--num_eval", "1000",
                         "--num_train", "1000", "--num_dev", "500", "--tag", "mezo-ft-20000-16-1e-7-1e-3-0",
                         "--trainer", "zo", "--train_set_seed", "0"])
    assert runs.result_name(config, "trainset0") == \
        "SST2-opt-13b-sampleeval1000-ntrain1000-ndev500-mezo-ft-20000-16-1e-7-1e-3-0-trainset0.json"
    config = args.parse(["--task_name", "SST2", "--model_name", "facebook/opt-13b", "--num_eval", "1000",
                         "--num_train", "32", "--tag", "icl", "--sfc"])
    assert runs.result_name(config, "onetrainpereval") == "SST2-opt-13b-sfc-sampleeval1000-ntrain32-icl-onetrainpereval.json"
