"""Hyper-parameters are declared once (zo.hparams): every per-method --zo_* flag, its default, range, help and the
methods it applies to come from the declarations; each constructor takes the declared default and checks the declared
range; and a run's identity is unchanged by the move to declarations (pinned ids, computed on commit 3c2ea36)."""
import dataclasses

import pytest
import torch
from torch import nn

import args
import zo
from zo import hparams
from zo import registry as zo_methods

TRAIN = ["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--max_steps", "100"]
CORE_FLAGS = {"zo_optim", "zo_eps", "zo_direction", "zo_num_directions", "zo_parallel", "zo_exact_restore",
              "zo_keep_direction", "zo_carry_perturbation", "zo_cuda_graphs", "zo_stochastic_rounding",
              "zo_probe", "zo_offload"}


def test_every_per_method_flag_is_derived_from_the_declarations():
    fields = {f.name: f for f in dataclasses.fields(args.ZOArguments)}
    derived = {flag.name: flag for flag in zo_methods.flags()}
    assert set(fields) - CORE_FLAGS == set(derived), "a per-method flag is declared by hand in args.py"
    for name, flag in derived.items():
        users = [(cls, h) for cls in zo_methods.OPTIMIZERS.values() for h in hparams.declarations(cls)
                 if h.flag_name == name]
        assert tuple(cls.name for cls, _ in users) == flag.methods
        first = users[0][1]
        defaults = {h.default for _, h in users}
        assert fields[name].default == (first.default if len(defaults) == 1 else None), name
        suite = fields[name].metadata["suite"]
        assert (suite["low"], suite["high"], suite["above"], suite["choices"]) == (
            first.low, first.high, first.above, first.choices), name
        assert suite["only_with"] == ("zo.zo_optim", flag.methods), name
        text = fields[name].metadata["help"]
        assert first.help in text and all(cls.title in text for cls, _ in users), name
        if len(defaults) > 1:   # each method's own default is in the help
            assert all(f"{cls.title} {h.default}" in text for cls, h in users), name


def test_each_constructor_takes_the_declared_defaults_and_ranges():
    model = nn.Linear(3, 3)
    for cls in zo_methods.OPTIMIZERS.values():
        opt = cls(model.parameters(), lr=1e-3)
        for h in hparams.declarations(cls):
            if h.via is None:
                assert getattr(opt, h.arg) == h.default, (cls.name, h.arg)
            if h.via is None and h.kind in (int, float) and (h.low is not None or h.above is not None):
                bound = h.low if h.low is not None else h.above
                with pytest.raises(ValueError, match=rf"Invalid {cls.title} {h.arg}="):
                    cls(model.parameters(), lr=1e-3, **{h.arg: bound - 1})


def test_shared_flags_are_declared_once_and_each_method_gives_its_default():
    rank = {cls.name: h.default for cls in zo_methods.OPTIMIZERS.values() for h in hparams.declarations(cls)
            if h.name == "rank"}
    assert rank == {"lozo": 2, "lozo_m": 2, "subzero": 8}
    interval = {cls.name: h.flag_name for cls in zo_methods.OPTIMIZERS.values() for h in hparams.declarations(cls)
                if h.name == "interval"}
    assert interval == {"lozo": "zo_nu", "lozo_m": "zo_nu", "subzero": "zo_T"}
    config = args.parse([*TRAIN, "--zo_optim", "subzero", "--zo_T", "7"])
    assert config.zo.optimizer_kwargs(100)["interval"] == 7 and "rank" not in config.zo.optimizer_kwargs(100)
    config = args.parse([*TRAIN, "--zo_optim", "lozo_m", "--zo_beta1", "0.5"])
    assert config.zo.optimizer_kwargs(100)["beta"] == 0.5
    with pytest.raises(args.UsageError, match="--zo_beta1 only applies with --zo_optim zo_adam|lozo_m"):
        args.parse([*TRAIN, "--zo_optim", "mezo", "--zo_beta1", "0.5"])


def test_the_optimizer_built_from_flags_holds_the_flag_values():
    config = args.parse([*TRAIN, "--zo_optim", "zo_adam", "--zo_beta2", "0.99", "--zo_adam_eps", "1e-6"])
    opt = config.zo.optimizer_class()(nn.Linear(2, 2).parameters(), lr=1e-3, **config.zo.optimizer_kwargs(100))
    assert (opt.beta1, opt.beta2, opt.adam_eps) == (0.9, 0.99, 1e-6)
    config = args.parse([*TRAIN, "--zo_optim", "zo_adamu", "--zo_state_dtype", "bfloat16", "--zo_t1", "3"])
    opt = config.zo.optimizer_class()(nn.Linear(2, 2).parameters(), lr=1e-3, **config.zo.optimizer_kwargs(100))
    assert opt.state_dtype == torch.bfloat16 and opt.schedule.T1 == 3 and opt.schedule.T3 == 100


# Run ids of these command lines on commit 3c2ea36 (before the hyper-parameters were declared in zo/): a run resumes
# its checkpoints only under the same id, so the flags' names and defaults must keep them.
PINNED = [
    ([], "3aeec0b1"),
    (TRAIN, "e32bca96"),
    (TRAIN + ["--zo_optim", "zo_adamu", "--zo_t1", "3", "--zo_phi_beta2", "1.2", "--zo_unsigned_momentum",
              "--zo_state_dtype", "bfloat16"], "6b6eb6d4"),
    (TRAIN + ["--zo_optim", "zo_sgd_mmt", "--zo_mu", "0.8"], "9d390489"),
    (TRAIN + ["--zo_optim", "zo_adam", "--zo_beta1", "0.85", "--zo_beta2", "0.99", "--zo_adam_eps", "1e-6"],
     "79608874"),
    (TRAIN + ["--zo_optim", "hizoo", "--zo_alpha", "1e-6"], "991294aa"),
    (TRAIN + ["--zo_optim", "lozo", "--zo_rank", "4", "--zo_nu", "20"], "25d9ce50"),
    (TRAIN + ["--zo_optim", "lozo_m", "--zo_beta1", "0.7"], "9ef5cecd"),
    (TRAIN + ["--zo_optim", "subzero", "--zo_T", "100", "--zo_rank", "4"], "0dc37b32"),
    (TRAIN + ["--zo_optim", "fzoo", "--zo_num_directions", "4", "--zo_direction", "gaussian"], "a68d5599"),
]


@pytest.mark.parametrize("argv,run_id", PINNED, ids=[str(i) for i in range(len(PINNED))])
def test_run_ids_are_those_of_the_starting_commit(argv, run_id, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert args.parse(argv).run_id() == run_id


def test_the_registry_module_runs_from_any_directory(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    done = subprocess.run([sys.executable, "-m", "zo.registry", "defaults", "zo_adamu", "lora"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout == "DEFAULT_LR=1e-2\nDEFAULT_EPS=1e-1\n" and not done.stderr
    assert zo.OPTIMIZERS is zo_methods.OPTIMIZERS
