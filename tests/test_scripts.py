"""The bash wrappers build the reference's command lines (a stand-in `python`/`torchrun` records them; the scripts'
reads of the task table, `python tasks.py defaults TASK`, and of a method's LR / EPS, `python -m zo.registry
defaults OPTIM MODE`, go to the real interpreter)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture
def recorder(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        (bin_dir / name).write_text(f'#!/bin/sh\ncase "$1" in *tasks.py|-m) exec "{sys.executable}" "$@";; esac\n'
                                    f'printf "%s\\n" "{name}" "$@" > "{tmp_path}/argv"\n')
        (bin_dir / name).chmod(0o755)

    def run_script(script, env=None, args=()):
        environment = {k: v for k, v in os.environ.items() if k not in ("MODEL", "TASK", "MODE", "OPTIM", "LR", "EPS")}
        environment.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PRECISION="")
        environment.update(env or {})
        (tmp_path / "argv").unlink(missing_ok=True)
        done = subprocess.run(["bash", str(ROOT / script), *args], env=environment, capture_output=True, text=True,
                              cwd=tmp_path)
        argv = (tmp_path / "argv").read_text().splitlines() if (tmp_path / "argv").exists() else None
        return done, argv
    return run_script


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_icl_defaults_run_offline_and_extras_override(recorder):
    done, argv = recorder("icl.sh", args=["--num_train", "0"])
    assert done.returncode == 0
    assert flag(argv, "--model_name") == "smollm2-135m" and flag(argv, "--task_name") == "SST2"
    assert flag(argv, "--num_eval") == "1000"
    # the quick start's summary must not scroll away under a dump of every prompt; --verbose asks for it
    assert "--verbose" not in argv
    assert argv[-2:] == ["--num_train", "0"]  # last occurrence wins in the parser


def test_mezo_defaults_are_the_reference(recorder):
    done, argv = recorder("mezo.sh", env={"TASK": "SST2"})
    assert done.returncode == 0
    tag = "mezo-ft-20000-16-1e-6-1e-3-0"   # MeZO's README grid top for full parameters
    # no --output_dir: run.py gives every configuration its own folder (data sizes included), so a rerun resumes
    # only its own checkpoints
    assert flag(argv, "--tag") == tag and "--output_dir" not in argv
    for name, value in [("--trainer", "zo"), ("--zo_optim", "mezo"), ("--learning_rate", "1e-6"), ("--zo_eps", "1e-3"),
                        ("--per_device_train_batch_size", "16"), ("--lr_scheduler_type", "constant"),
                        ("--num_train", "1000"), ("--num_dev", "500"), ("--num_eval", "1000"), ("--max_steps", "20000"),
                        ("--eval_steps", "4000"), ("--save_steps", "4000"), ("--train_set_seed", "0")]:
        assert flag(argv, name) == value, name
    # the objective is the task table's default, applied by run.py
    assert "--load_best_model_at_end" in argv and "--train_as_classification" not in argv


@pytest.mark.parametrize("mode,lr,eps,extra", [("ft", "1e-4", "1e-3", []), ("prefix", "1e-4", "1e-2", ["--prefix_tuning"]),
                                               ("lora", "1e-2", "1e-1", ["--lora"])])
def test_zo_adamu_uses_the_paper_defaults_per_mode(recorder, mode, lr, eps, extra):
    done, argv = recorder("mezo.sh", env={"OPTIM": "zo_adamu", "MODE": mode, "TASK": "RTE"})
    assert done.returncode == 0
    assert flag(argv, "--learning_rate") == lr and flag(argv, "--zo_eps") == eps
    assert flag(argv, "--tag") == f"zo_adamu-{mode}-20000-16-{lr}-{eps}-0"
    assert all(e in argv for e in extra)


def test_mezo_task_overrides_and_user_flags_last(recorder):
    done, argv = recorder("mezo.sh", env={"TASK": "Copa", "LR": "1e-6"}, args=["--max_steps", "10"])
    assert flag(argv, "--num_dev") == "100" and flag(argv, "--learning_rate") == "1e-6"  # Copa's dev size (tasks.py)
    assert argv[-2:] == ["--max_steps", "10"]
    done, argv = recorder("mezo.sh", env={"TASK": "Copa", "DEV": "50"})
    assert flag(argv, "--num_dev") == "50"
    done, argv = recorder("mezo.sh", env={"TASK": "copa"})
    assert done.returncode == 2 and "Did you mean 'Copa'" in done.stderr and argv is None
    done, argv = recorder("mezo.sh", env={"OPTIM": "adam"})
    assert done.returncode == 2 and "unknown OPTIM=adam" in done.stderr


def test_finetune_overrides(recorder):
    done, argv = recorder("finetune.sh", env={"TASK": "MultiRC"})
    assert flag(argv, "--trainer") == "regular" and flag(argv, "--per_device_train_batch_size") == "2"
    assert flag(argv, "--gradient_accumulation_steps") == "4" and flag(argv, "--num_train_epochs") == "5"
    assert flag(argv, "--tag") == "ft-5-2-1e-5-0"
    assert flag(argv, "--evaluation_strategy") == "epoch" and "--load_best_model_at_end" in argv


def test_finetune_fsdp_needs_nproc_and_launches_torchrun(recorder):
    done, argv = recorder("finetune_fsdp.sh")
    assert done.returncode == 2 and "set NPROC" in done.stderr
    done, argv = recorder("finetune_fsdp.sh", env={"NUM_GPU": "4", "MODE": "lora"})
    assert done.returncode == 0 and argv[0] == "torchrun" and "--nproc_per_node=4" in argv
    assert flag(argv, "--fsdp") == "full_shard auto_wrap" and "--save_only_model" in argv
    assert "--fp16" not in argv  # PRECISION= (fp32), as on a machine without GPUs
    assert flag(argv, "--per_device_train_batch_size") == "1" and flag(argv, "--gradient_accumulation_steps") == "8"
    assert flag(argv, "--tag") == "fsdp-lora-5-8-1e-5-0" and "--lora" in argv
    done, argv = recorder("finetune_fsdp.sh", env={"NPROC": "2", "PRECISION": "--fp16"})
    assert done.returncode == 0 and "--nproc_per_node=2" in argv and "--fp16" in argv


@pytest.mark.parametrize("optim", ["lozo", "fzoo", "hizoo"])
def test_mezo_takes_any_optimizer_with_its_registry_defaults(recorder, optim):
    from zo import registry as zo_methods
    done, argv = recorder("mezo.sh", env={"OPTIM": optim, "MODE": "lora", "TASK": "RTE"})
    lr, eps = (zo_methods.short(v) for v in zo_methods.mode_defaults(optim, "lora"))
    assert done.returncode == 0 and flag(argv, "--zo_optim") == optim
    assert flag(argv, "--learning_rate") == lr and flag(argv, "--zo_eps") == eps
