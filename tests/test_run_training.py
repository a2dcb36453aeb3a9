"""run.py training paths end to end on a tiny random LLaMA with the real tokenizer and real task rows."""

import json
import os

import pytest

import run
from conftest import shared_data_or_skip

COMMON = ["--num_train", "24", "--num_dev", "8", "--num_eval", "8", "--train_set_seed", "0", "--max_steps", "3",
          "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none"]


def train(tmp_path, monkeypatch, model_dir, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run.main(["--model_name", str(model_dir), "--output_dir", str(tmp_path / "out"), *COMMON, *args])
    assert code == 0
    files = list((tmp_path / "result").glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["prompt_version"] == "1"  # every result, trained or not (test_run.py)
    return result, files[0].name


@pytest.mark.parametrize("trainer_args,description", [
    (["--trainer", "regular", "--learning_rate", "1e-3"], "regular-ft-lr0.001-steps3-bs4-seed42"),
    (["--trainer", "zo", "--zo_optim", "mezo", "--learning_rate", "1e-3"], "mezo-ft-lr0.001-eps0.001-steps3-bs4-seed42"),
    (["--trainer", "zo", "--zo_optim", "zo_adamu", "--learning_rate", "1e-4"],
     "zo_adamu-ft-lr0.0001-eps0.001-steps3-bs4-seed42"),
])
def test_training_writes_test_and_dev_metrics(tmp_path, monkeypatch, tiny_llama_dir, trainer_args, description):
    result, name = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "SST2", "--train_as_classification",
                         "--eval_strategy", "steps", "--eval_steps", "2", *trainer_args)
    # without --tag the name says what distinguishes the run, so another learning rate never overwrites it
    assert name.endswith(f"-ntrain24-ndev8-{description}-trainset0.json")
    assert {"accuracy", "dev_accuracy"} <= set(result)
    assert result["sizes"] == {"train": 24, "dev": 8, "eval": 8}
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # --save_strategy no


def test_zo_generation_task_with_non_differentiable_objective(tmp_path, monkeypatch, tiny_llama_dir):
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "SQuAD", "--trainer", "zo", "--non_diff",
                      "--max_new_tokens", "4", "--learning_rate", "1e-3", "--num_eval", "4")
    assert "f1" in result and "dev_f1" in result


def test_zo_non_differentiable_classification(tmp_path, monkeypatch, tiny_llama_dir):
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "Copa", "--trainer", "zo", "--non_diff",
                      "--learning_rate", "1e-3")
    assert "accuracy" in result


def test_without_dev_set_evaluation_is_off_and_test_is_untouched(tmp_path, monkeypatch, tiny_llama_dir, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    args = [a for a in COMMON]
    i = args.index("--num_dev")
    del args[i:i + 2]
    assert run.main(["--model_name", str(tiny_llama_dir), "--output_dir", str(tmp_path / "out"), *args,
                     "--trainer", "zo", "--eval_strategy", "steps", "--eval_steps", "1"]) == 0
    assert "evaluation during training is turned off" in caplog.text
    result = json.loads(next((tmp_path / "result").glob("*.json")).read_text())
    assert "dev_accuracy" not in result and result["sizes"]["dev"] == 0


def test_each_train_set_starts_from_pretrained_weights(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZO_DATA_DIR", str(shared_data_or_skip()))
    args = [a for a in COMMON]
    i = args.index("--train_set_seed")
    args[i:i + 2] = ["--num_train_sets", "2"]
    loads = []
    original = run.load_model
    monkeypatch.setattr(run, "load_model", lambda a: loads.append(1) or original(a))
    assert run.main(["--model_name", str(tiny_llama_dir), "--output_dir", str(tmp_path / "out"), *args,
                     "--trainer", "zo"]) == 0
    assert len(loads) == 2
    assert sorted(p.name for p in (tmp_path / "result").glob("*.json"))[-1].endswith("trainset1.json")
    assert os.path.isdir(tmp_path / "out" / "trainset1")


@pytest.mark.parametrize("trainer", ["regular", "zo"])
@pytest.mark.parametrize("mode", [["--lora"], ["--prefix_tuning"], ["--head_tuning"]])
def test_parameter_efficient_modes_train_and_save_only_their_parameters(tmp_path, monkeypatch, tiny_llama_dir,
                                                                        trainer, mode):
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "RTE", "--trainer", trainer,
                      "--learning_rate", "1e-3", "--train_as_classification", "--save_model", *mode)
    assert {"accuracy", "dev_accuracy"} <= set(result)
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    if mode == ["--lora"]:
        assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    elif mode == ["--prefix_tuning"]:
        assert "prefix_model.safetensors" in saved and "model.safetensors" not in saved
    else:
        assert "model.safetensors" in saved


def test_linear_probing_fits_and_evaluates(tmp_path, monkeypatch, tiny_llama_dir):
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "SST2", "--trainer", "regular",
                      "--linear_probing", "--lp_early_stopping", "--save_model")
    assert {"accuracy", "dev_accuracy"} <= set(result)
    assert (tmp_path / "out" / "linear_probe.pt").is_file()


def test_untied_head_starts_from_the_tied_embeddings(tiny_llama_dir):
    import torch

    import models
    model = models.load_model(str(tiny_llama_dir), untie_emb=True)
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embeddings and head.data_ptr() != embeddings.data_ptr()
    assert torch.equal(head, embeddings)


def test_best_checkpoint_can_be_chosen_by_dev_accuracy(tmp_path, monkeypatch, tiny_llama_dir):
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "SST2", "--trainer", "zo",
                      "--train_as_classification", "--eval_strategy", "steps", "--eval_steps", "1",
                      "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end",
                      "--metric_for_best_model", "accuracy", "--learning_rate", "1e-3")
    state = json.loads(max((tmp_path / "out").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    assert state["best_metric"] == max(e["eval_accuracy"] for e in state["log_history"] if "eval_accuracy" in e)
    assert "dev_accuracy" in result


@pytest.mark.parametrize("mode", ["ft", "lora", "prefix"])
def test_regular_training_overfits_eight_examples(tmp_path, mode):
    import torch
    from transformers import TrainingArguments

    import lora
    import prefix
    from conftest import tiny_model
    from trainer_zo import SuiteTrainer, TaskEval
    from utils import ListDataset, Objective, TrainCollator, training_loss

    model = tiny_model("llama", seed=2)
    if mode == "lora":
        model = lora.apply_lora(model, r=4, alpha=8)
    elif mode == "prefix":
        model = prefix.apply_prefix_tuning(model, num_prefix=4)
    data = [{"input_ids": [256] + [(7 * i + 3 * j) % 256 for j in range(10)], "option_len": 3} for i in range(8)]
    batch = TrainCollator(258)(data)
    with torch.no_grad():
        start = training_loss(model, batch, Objective()).item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                             learning_rate={"ft": 3e-3, "lora": 5e-2, "prefix": 1e-1}[mode], report_to="none",
                             save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="constant")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    SuiteTrainer(model=model, args=args, train_dataset=ListDataset(data), data_collator=TrainCollator(258),
                 objective=Objective(), task_eval=TaskEval(None, [], None, None, None)).train()
    with torch.no_grad():
        end = training_loss(model, batch, Objective()).item()
    # a random two-layer model: adapters (few parameters, no head) move the loss less than full fine-tuning
    assert end < {"ft": 0.6 * start, "lora": start - 0.5, "prefix": start - 0.15}[mode], (start, end)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
