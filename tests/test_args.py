"""args.py: every flag declared once, and one validation step that reports every problem before anything runs."""

import dataclasses
import subprocess
import sys

import pytest

import args
from zo import registry as zo_methods
from conftest import ROOT

TRAIN = ["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0"]


def problems(argv):
    with pytest.raises(args.UsageError) as caught:
        args.parse(argv)
    return caught.value.problems


def test_every_problem_is_reported_at_once_with_the_value_and_the_fix():
    found = problems([*TRAIN, "--max_steps", "-5", "--learning_rate", "-1e-3", "--per_device_train_batch_size", "0",
                      "--foo", "1", "--lr", "1e-3", "--num_eval", "abc", "--zo_optim", "ZO_AdaMU"])
    assert found == [
        "Unknown flag --foo. (`python run.py --help` lists every flag.)",
        "Unknown flag --lr. Did you mean --learning_rate? (`python run.py --help` lists every flag.)",
        "--num_eval 'abc': expected an integer.",
        "--zo_optim 'ZO_AdaMU' is not available. Did you mean 'zo_adamu'? (names are case-sensitive) Choose one of "
        + ", ".join(zo_methods.OPTIMIZERS) + ".",
        "--per_device_train_batch_size 0: must be >= 1.",
        "--learning_rate -0.001: must be >= 0.0.",  # a negative number after a flag is read as its value
        "--max_steps -5: must be >= 1 (or -1, the default, to train --num_train_epochs).",
    ]


def test_cross_flag_rules_are_reported_together_with_the_values_refused():
    """An out-of-range value used to end parsing before the cross-flag rules: a missing --train_set_seed showed only
    on the next try."""
    assert problems(["--trainer", "zo", "--max_steps", "-5"]) == [
        "--max_steps -5: must be >= 1 (or -1, the default, to train --num_train_epochs).",
        "--trainer zo needs --train_set_seed S (or --num_train_sets N) to draw the training set.",
        "--trainer zo needs --num_train > 0 (got 0).",
    ]
    # a refused value is reported once, for what was typed: the rules that read it say nothing of it
    untrained = ["--trainer", "zo", "--train_set_seed", "0"]
    assert problems([*untrained, "--num_train", "-3"]) == ["--num_train -3: must be >= 0."]
    assert problems([*untrained, "--num_train", "abc"]) == ["--num_train 'abc': expected an integer."]
    assert problems([*untrained, "--num_train", "abc", "--num_train", "abc"]) == [
        "--num_train 'abc': expected an integer."]
    assert problems([*TRAIN, "--zo_num_directions", "-2", "--zo_optim", "fzoo"]) == [
        "--zo_num_directions -2: must be >= 1."]
    assert problems([*TRAIN, "--fsdp", "full_shard"]) == [args.fsdp_launch_problems(("full_shard",))[0]]
    # Hugging Face's own rules see the default too: they would refuse the value again, and then no configuration
    # would be built for the cross-flag rules
    assert problems(["--trainer", "zo", "--logging_steps", "0"]) == [
        "--logging_steps 0.0: must be > 0.",
        "--trainer zo needs --train_set_seed S (or --num_train_sets N) to draw the training set.",
        "--trainer zo needs --num_train > 0 (got 0).",
    ]
    # the rules that do not read it still speak
    assert problems([*untrained, "--num_train", "-3", "--load_float16", "--load_bfloat16"]) == [
        "--num_train -3: must be >= 0.", "--load_float16 and --load_bfloat16 both given; choose one."]


def test_unknown_flags_get_the_closest_known_ones():
    assert problems(["--lerning_rate", "1e-3"]) == [
        "Unknown flag --lerning_rate. Did you mean --learning_rate? (`python run.py --help` lists every flag.)"]
    assert "Did you mean --zo_eps" in problems(["--eps", "1e-3"])[0]
    assert problems(["--task-nam", "SST2"])[0].startswith("Unknown flag --task-nam. Did you mean --task_name")


@pytest.mark.parametrize("value", ["-1e-3", "-0.5", "-3", "-.25", "-1E+2"])
def test_negative_numbers_can_be_typed_after_their_flag(value):
    config = args.parse([*TRAIN, "--weight_decay", "0.1", "--zo_alpha_floor", "0.5", "--zo_optim", "zo_adamu",
                         "--max_steps", "100"])
    assert config.zo.zo_alpha_floor == 0.5
    found = problems([*TRAIN, "--learning_rate", value])
    assert found == [f"--learning_rate {float(value)}: must be >= 0.0."]


def test_flags_that_mean_nothing_without_their_setting_are_refused():
    found = problems(["--lora_r", "16", "--zo_eps", "1e-2", *TRAIN[2:], "--trainer", "regular",
                      "--zo_t1", "5", "--temperature", "0.7"])
    assert "--lora_r only applies with --lora; drop it or add that setting." in found
    assert "--zo_eps only applies with --trainer zo; drop it or add that setting." in found
    assert "--zo_t1 only applies with --zo_optim zo_adamu; drop it or add that setting." in found
    assert "--temperature only applies with --sampling; drop it or add that setting." in found
    # defaults never count as given
    assert args.parse([*TRAIN, "--lora"]).peft.lora_r == 8


def test_legacy_spellings_still_work():
    config = args.parse([*TRAIN, "--prefix_tuning", "--no_reparam", "--evaluation_strategy", "no"])
    assert not config.peft.prefix_reparam and config.hf.eval_strategy == "no"
    config = args.parse([*TRAIN, "--prefix_tuning", "--no_no_reparam", "--no_prefix_init_by_real_act"])
    assert config.peft.prefix_reparam
    config = args.parse([*TRAIN, "--zo_optim", "zo_adamu", "--zo_unsigned_momentum", "--no_eval", "--max_steps", "10"])
    assert not config.zo.zo_signed_momentum and not config.evaluation.final_eval
    config = args.parse([*TRAIN, "--save_on_interrupt"])  # retired: signals always checkpoint now
    assert config.training


def test_the_training_objective_defaults_to_the_task_table():
    assert args.parse([*TRAIN, "--task_name", "SST2"]).train.train_as_classification is True
    assert args.parse([*TRAIN, "--task_name", "Copa"]).train.train_as_classification is False
    assert args.parse([*TRAIN, "--task_name", "Copa", "--train_as_classification"]).train.train_as_classification
    assert not args.parse([*TRAIN, "--task_name", "SST2", "--train_as_classification", "false"]
                          ).train.train_as_classification
    assert not args.parse([*TRAIN, "--trainer", "regular", "--linear_probing"]).train.train_as_classification
    assert not args.parse(["--task_name", "SST2"]).train.train_as_classification  # nothing trains


def test_every_zo_flag_reaches_the_optimizer():
    config = args.parse([*TRAIN, "--zo_optim", "zo_adamu", "--max_steps", "100", "--zo_eps", "0.01",
                         "--zo_direction", "rademacher", "--zo_exact_restore", "always", "--zo_carry_perturbation",
                         "--no_zo_cuda_graphs", "--no_zo_signed_momentum", "--zo_state_dtype", "bfloat16",
                         "--zo_t1", "5", "--zo_t2", "50"])
    kwargs = config.zo.optimizer_kwargs(100)
    assert kwargs["eps"] == 0.01 and kwargs["direction"] == "rademacher" and kwargs["exact_restore"] is True
    assert kwargs["carry_perturbation"] and kwargs["cuda_graphs"] is False and kwargs["signed_momentum"] is False
    assert str(kwargs["state_dtype"]) == "torch.bfloat16" and (kwargs["schedule"].T1, kwargs["schedule"].T2) == (5, 50)
    # what an optimizer takes comes from its constructor (through **kwargs to its base), so none is dropped
    for name, cls in zo_methods.OPTIMIZERS.items():
        config = args.parse([*TRAIN, "--zo_optim", name, "--max_steps", "100"])
        kwargs = config.zo.optimizer_kwargs(100)
        assert {"eps", "exact_restore", "keep_direction", "carry_perturbation", "cuda_graphs"} <= set(kwargs)
        assert set(kwargs) <= args.accepted_keywords(cls)
        assert "direction" not in kwargs   # unset: the method's own (FZOO: Rademacher)
    own = {"zo_sgd_mmt": {"mu"}, "zo_adam": {"beta1", "beta2", "adam_eps"}, "hizoo": {"alpha"}, "fzoo": {"num_directions"},
           "lozo": {"interval"}, "lozo_m": {"interval", "beta"}, "subzero": {"interval"}}
    for name, keys in own.items():
        kwargs = args.parse([*TRAIN, "--zo_optim", name, "--max_steps", "100"]).zo.optimizer_kwargs(100)
        assert keys <= set(kwargs), name


def test_identity_holds_what_changes_a_run_and_nothing_else():
    base = args.parse([*TRAIN, "--learning_rate", "1e-3"])
    same = args.parse([*TRAIN, "--learning_rate", "1e-3", "--logging_steps", "3", "--eval_steps", "7",
                       "--save_total_limit", "2", "--output_dir", "elsewhere", "--verbose", "--report_to", "none"])
    assert base.identity() == same.identity() and base.run_id() == same.run_id()
    for change in (["--learning_rate", "2e-3"], ["--num_train", "9"], ["--seed", "1"], ["--zo_eps", "1e-2"],
                   ["--max_steps", "7"], ["--task_name", "RTE"], ["--tag", "x"], ["--lora"]):
        assert args.parse([*TRAIN, "--learning_rate", "1e-3", *change]).run_id() != base.run_id(), change
    assert len(base.run_id()) == 8 and base.run_id() == args.parse([*TRAIN, "--learning_rate", "1e-3"]).run_id()


def test_each_suite_flag_is_declared_once_with_help():
    seen = {}
    for group, cls in args.GROUPS[:-1]:
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f.name
            assert f.name not in seen, (f.name, group, seen.get(f.name))
            seen[f.name] = group
    hf = {f.name for f in dataclasses.fields(args.HFArguments)}
    assert not hf & set(seen)  # no suite flag shadows a Hugging Face one


def test_help_lists_the_suite_groups_before_hugging_face_flags():
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    head = done.stdout.splitlines()[:50]
    assert any("Task and data:" in line for line in head) and any("--task_name" in line for line in head)
    lines = done.stdout.splitlines()
    assert lines.index(next(line for line in lines if line.startswith("Hugging Face"))) > \
        lines.index(next(line for line in lines if line.startswith("Zeroth-order")))


def help_entries() -> dict[str, str]:
    """--help as {first option string: its help, lines joined}."""
    entries, current = {}, None
    for line in args.Parser().format_help().splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("    ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_shows_each_default_once():
    """A help text that names its default in its own words got argparse's "(default: None)" after it, and each
    --no_X flag a "(default: False)" that contradicted --X's "(default: True)"."""
    entries = help_entries()
    assert len(entries) > 100  # the suite's flags and Hugging Face's
    twice = {flag: text for flag, text in entries.items() if text.count("(default") > 1}
    assert not twice, twice
    assert "(default: $ZO_DATA_DIR; unset: the hub, then the small bundled sample)." in entries["--data_dir"]
    assert entries["--data_dir"].endswith("bundled sample).")
    assert entries["--auto_device"].endswith("(default: True)")
    assert "(default" not in entries["--no_auto_device"] and "--auto_device false" in entries["--no_auto_device"]
    # a text default that would print as nothing is quoted
    assert entries["--eos_token"].endswith("(default: '\\n')") and entries["--tag"].endswith("(default: '')")


def test_an_unknown_optimizer_lists_every_valid_name_and_method_flags_belong_to_their_method():
    with pytest.raises(args.UsageError) as error:
        args.parse([*TRAIN, "--zo_optim", "zo_sgd"])
    assert all(name in str(error.value) for name in zo_methods.OPTIMIZERS)
    with pytest.raises(args.UsageError, match="--zo_nu only applies with --zo_optim lozo|lozo_m"):
        args.parse([*TRAIN, "--zo_optim", "subzero", "--zo_nu", "10"])
    config = args.parse([*TRAIN, "--zo_optim", "lozo_m", "--zo_rank", "3", "--zo_beta1", "0.5", "--max_steps", "9"])
    assert {k: v for k, v in config.zo.optimizer_kwargs(9).items() if k in ("rank", "interval", "beta")} == {
        "rank": 3, "interval": 50, "beta": 0.5}
    assert "fzoo: N+1 (9 at the default N = 8) forward passes a step" in args.ZOArguments.__dataclass_fields__[
        "zo_optim"].metadata["help"]


def test_an_unknown_optimizer_is_refused_with_every_available_name():
    # one problem, naming the value and listing the registry, in its order (new methods appear without an edit here)
    assert problems([*TRAIN, "--zo_optim", "nosuch"]) == [
        "--zo_optim 'nosuch' is not available. Choose one of " + ", ".join(zo_methods.OPTIMIZERS) + "."]
    assert {"lozo", "fzoo", "hizoo", "subzero"} <= set(zo_methods.OPTIMIZERS)


def test_directions_are_checked_against_the_optimizer_and_the_launch(monkeypatch):
    assert args.parse([*TRAIN]).zo.num_directions() == 1
    assert args.parse([*TRAIN, "--zo_optim", "fzoo"]).zo.num_directions() == 8
    assert args.parse([*TRAIN, "--zo_optim", "fzoo", "--zo_num_directions", "3"]).zo.optimizer_kwargs(10)[
        "num_directions"] == 3
    assert "--zo_num_directions 1: fzoo needs at least 2" in "\n".join(
        problems([*TRAIN, "--zo_optim", "fzoo", "--zo_num_directions", "1"]))
    # a method whose direction or update reads its state takes one direction, in either parallel mode
    for name in ("hizoo", "zo_sgd_cons", "zo_adamu", "zo_sgd_mmt", "zo_adam", "lozo_m"):
        assert f"--zo_num_directions 2: {name} probes 1 direction a step" in "\n".join(problems(
            [*TRAIN, "--zo_optim", name, "--zo_num_directions", "2"]))
    import parallel
    monkeypatch.setattr(parallel, "launched_world_size", lambda: 2)  # a torchrun launch of 2, seen by the checks
    for name in ("zo_adamu", "zo_sgd_mmt", "zo_adam", "lozo_m"):
        text = "\n".join(problems([*TRAIN, "--zo_optim", name, "--zo_parallel", "directions",
                                   "--zo_num_directions", "2"]))
        assert f"--zo_num_directions 2: {name} probes 1 direction a step (its direction or update reads" in text
    help_text = args.Parser().format_help()
    assert "One direction only: zo_adamu, zo_sgd_mmt, zo_sgd_cons, zo_adam, hizoo, lozo_m" in " ".join(
        help_text.split())
    assert "mezo lora: LR 1e-4, ε 1e-2 (MeZO README LoRA grid" in help_text
    text = "\n".join(problems([*TRAIN, "--zo_parallel", "directions", "--zo_num_directions", "3"]))
    assert "--zo_num_directions 3 does not split over 2 processes; use a multiple of 2 (e.g. 2 or 4)" in text
    text = "\n".join(problems([*TRAIN, "--zo_parallel", "directions", "--zo_num_directions", "4",
                               "--fsdp", "full_shard", "--save_strategy", "no"]))
    assert "each needs the whole model; drop --fsdp" in text
    config = args.parse([*TRAIN, "--zo_parallel", "directions", "--zo_num_directions", "4"])
    assert config.zo.zo_parallel == "directions"
    assert "--zo_parallel" in "\n".join(
        problems(["--trainer", "regular", "--num_train", "8", "--train_set_seed", "0", "--zo_parallel", "directions"]))
