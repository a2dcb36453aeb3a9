"""The ZO trainer inside the HF Trainer loop: exactness, accumulation, frozen parameters, resume, logging."""

import copy
import random

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

import zo
from zo.methods import family as zo_family
from conftest import tiny_model
from args import ZOArguments
from adapters import adapter_of
from trainer_zo import TaskEval, ZOTrainer
from utils import ListDataset, Objective, TrainCollator


def records(n=16, seed=0, option_len=3):
    rng = random.Random(seed)
    return [{"input_ids": [256] + [rng.randrange(256) for _ in range(rng.randrange(6, 14))], "option_len": option_len}
            for _ in range(n)]


def make_trainer(model, tmp_path, optimizer="mezo", batch=8, accumulation=1, steps=3, lr=1e-3, **extra):
    """A ZO trainer; `extra` takes the ZO flags without their zo_ prefix (exact_restore=True means "always")."""
    eval_steps = extra.pop("eval_steps", None)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy=extra.pop("save", "no"),
                             save_steps=extra.pop("save_steps", 500), report_to="none", remove_unused_columns=False,
                             eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
                             seed=0, use_cpu=True, max_grad_norm=0.0, disable_tqdm=True)
    return ZOTrainer(model=model, args=args, train_dataset=ListDataset(extra.pop("data", records())),
                     eval_dataset=ListDataset(records(8, seed=5)) if eval_steps else None,
                     data_collator=TrainCollator(258), objective=Objective(), task_eval=TaskEval(None, [], None, None, None),
                     zo_args=zo_arguments(optimizer, **extra))


def zo_arguments(optimizer, exact_restore=None, **extra):
    restore = {None: "auto", True: "always", False: "never"}[exact_restore]
    return ZOArguments(zo_optim=optimizer, zo_eps=1e-3, zo_exact_restore=restore,
                       **{f"zo_{k}": v for k, v in extra.items()})


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer", ["mezo", "zo_adamu"])
def test_accumulation_equals_one_big_batch(tmp_path, optimizer):
    # fp64: in fp32 the loss difference over 2*eps amplifies round-off of the two batchings past any tight bound
    base = tiny_model("llama", dtype=torch.float64)
    big, small = copy.deepcopy(base), copy.deepcopy(base)
    make_trainer(big, tmp_path / "a", optimizer, batch=8, accumulation=1, steps=2).train()
    make_trainer(small, tmp_path / "b", optimizer, batch=4, accumulation=2, steps=2).train()
    moved = False
    for (name, a), b, start in zip(big.named_parameters(), small.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)
        moved |= not torch.equal(a, start)
    assert moved


def test_zo_step_in_trainer_equals_the_optimizer_on_the_same_batch(tmp_path):
    """One trainer step is exactly one MeZO probe+update of the collated batch, in eval mode."""
    base = tiny_model("opt")
    trained = copy.deepcopy(base)
    trainer = make_trainer(trained, tmp_path, steps=1, batch=16)
    trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))  # same sampler seed: the batch the step used
    from utils import training_loss
    optimizer = zo_family.MeZO(zo.param_groups_for_model(base, 0.0), lr=1e-3, eps=1e-3, seed=0)
    optimizer.step(lambda: training_loss(base, batch, Objective()).float())
    for (name, a), b in zip(trained.named_parameters(), base.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_frozen_parameters_never_change(tmp_path):
    model = tiny_model("gpt2")
    for name, p in model.named_parameters():
        p.requires_grad_("h.1." in name)
    before = params(model)
    make_trainer(model, tmp_path, "zo_adamu", steps=3).train()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("h.1." in name), name


@pytest.mark.parametrize("optimizer", ["mezo", "zo_adamu"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    base = tiny_model("llama")
    straight, resumed = copy.deepcopy(base), copy.deepcopy(base)
    make_trainer(straight, tmp_path / "straight", optimizer, steps=6).train()
    interrupted = make_trainer(copy.deepcopy(base), tmp_path / "run", optimizer, steps=6, save="steps", save_steps=3)
    interrupted.add_callback(StopAfter(3))  # the same run, killed after its step-3 checkpoint
    interrupted.train()
    trainer = make_trainer(resumed, tmp_path / "run", optimizer, steps=6, save="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer", ["mezo", "zo_adamu"])
def test_carried_perturbation_is_settled_for_evaluation_checkpoints_and_the_end(tmp_path, optimizer):
    """--zo_carry_perturbation leaves the weights at θ+εu between steps; evaluation, checkpoints and the final model
    must still see θ: with a stash the run equals the uncarried one bit for bit, eval losses included."""
    from safetensors.torch import load_file
    base = tiny_model("llama")
    runs = {}
    for carry in (False, True):
        model = copy.deepcopy(base)
        trainer = make_trainer(model, tmp_path / str(carry), optimizer, steps=5, save="steps", save_steps=2,
                               eval_steps=2, exact_restore=True, carry_perturbation=carry)
        trainer.train()
        assert not trainer._zo_optimizer.carried
        evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        saved = load_file(str(tmp_path / str(carry) / "checkpoint-4" / "model.safetensors"))
        runs[carry] = params(model), evals, saved
    (plain, plain_evals, plain_saved), (carried, carried_evals, carried_saved) = runs[False], runs[True]
    assert len(plain_evals) >= 2 and plain_evals == carried_evals
    assert plain_saved.keys() == carried_saved.keys()
    assert all(torch.equal(plain_saved[k], carried_saved[k]) for k in plain_saved)
    assert all(torch.equal(plain[n], carried[n]) for n in plain)
    assert any(not torch.equal(plain[n], p) for n, p in base.named_parameters())
    # nothing evaluates or saves: the end of training alone settles
    model = copy.deepcopy(base)
    trainer = make_trainer(model, tmp_path / "end", optimizer, steps=5, exact_restore=True, carry_perturbation=True)
    trainer.train()
    assert not trainer._zo_optimizer.carried and all(torch.equal(plain[n], p) for n, p in params(model).items())


def adapted(mode):
    import lora
    import prefix
    model = tiny_model("llama")
    torch.manual_seed(1)
    return lora.apply_lora(model, r=4, alpha=8) if mode == "lora" else prefix.apply_prefix_tuning(model, num_prefix=4)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_adapter_checkpoints_hold_the_adapter_and_resume_bit_identically(tmp_path, mode):
    straight, resumed = adapted(mode), adapted(mode)
    make_trainer(straight, tmp_path / "straight", "zo_adamu", steps=6).train()
    interrupted = make_trainer(adapted(mode), tmp_path / "run", "zo_adamu", steps=6, save="steps", save_steps=3)
    interrupted.add_callback(StopAfter(3))
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors" if mode == "lora" else "prefix_model.safetensors", "optimizer.pt"} <= saved
    assert "model.safetensors" not in saved
    trainer = make_trainer(resumed, tmp_path / "run", "zo_adamu", steps=6, save="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    want, got = trainable(straight), trainable(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_best_adapter_checkpoint_is_loaded_back(tmp_path, mode):
    model = adapted(mode)
    trainer = make_trainer(model, tmp_path, "mezo", steps=3, lr=1e-2, save="steps", save_steps=1)
    trainer.train()
    reference = adapted(mode)
    if mode == "lora":  # HF's own loader of peft adapters, as the Trainer uses it
        reference.load_adapter(str(tmp_path / "checkpoint-1"), "default", is_trainable=True)
    else:
        adapter_of(reference).checkpoint_load(reference, str(tmp_path / "checkpoint-1"))
    after_step_1 = trainable(reference)
    last = trainable(model)
    assert any(not torch.equal(after_step_1[n], last[n]) for n in last)
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    trainer._load_best_model()
    assert all(torch.equal(after_step_1[n], p) for n, p in trainable(model).items())


def test_resuming_with_another_optimizer_fails_clearly(tmp_path):
    make_trainer(tiny_model("llama"), tmp_path, "mezo", steps=2, save="steps", save_steps=2).train()
    trainer = make_trainer(tiny_model("llama"), tmp_path, "zo_adamu", steps=4)
    with pytest.raises(ValueError, match="made with optimizer mezo, this run uses zo_adamu"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_logs_carry_projected_gradient_and_schedule(tmp_path):
    trainer = make_trainer(tiny_model("llama"), tmp_path, "zo_adamu", steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"projected_grad", "loss_minus", "skipped_steps", "alpha", "beta1", "beta2"} <= set(e)
                          for e in logged)


@pytest.mark.parametrize("optimizer", ["mezo", "zo_adamu"])
def test_loss_falls_when_overfitting_a_few_examples(tmp_path, optimizer):
    model = tiny_model("llama", seed=1)
    data = records(8, seed=3)
    collate = TrainCollator(258)
    from utils import training_loss

    def loss():
        with torch.no_grad():
            return training_loss(model, collate(data), Objective()).item()

    start = loss()
    make_trainer(model, tmp_path, optimizer, batch=8, steps=60, lr=2e-3, data=data).train()
    assert loss() < start - 0.1, (start, loss())


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))  # every loss is NaN
    trainer = make_trainer(model, tmp_path, steps=30)
    trainer.max_consecutive_skips = 5
    with pytest.raises(RuntimeError, match="5 ZO steps in a row had a non-finite"):
        trainer.train()


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_graphs_setting_reaches_the_optimizer(tmp_path, cuda_graphs):
    trainer = make_trainer(tiny_model("llama"), tmp_path, cuda_graphs=cuda_graphs)
    trainer.create_optimizer()
    assert trainer.optimizer.cuda_graphs is cuda_graphs
