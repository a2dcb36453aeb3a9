"""Cost of one zeroth-order step against its two forward passes, against a reference-style step, and its memory.

On one model and one batch, in one process, after warm-up, the median over `--reps` interleaved repetitions of
    F         one forward pass of the training loss (utils.training_loss: LM head only on the option positions),
              under torch.inference_mode
    S_mezo    one real MeZO step (probe at θ+εu and θ-εu with that same loss, then the update)
    S_adamu   one real ZO-AdaMU step
    S_NAME    with --optimizers: one real step of each named ZO optimizer (zo_methods.OPTIMIZERS), whose cost is
              reported against its own forwards (step_over_forwards) and against two (step_over_2fwd)
    S_mezo_MODE  with --probe_modes: one MeZO step whose probes perturb inside the modules' forwards (zo.probe:
              forward = two forward passes, onepass = one forward of the doubled batch)
    D         with onepass among --probe_modes: one forward of the doubled batch (2B rows), under inference_mode
    R         one MeZO step written exactly as the reference code does it: global torch.manual_seed, torch.normal
              of every tensor in the parameter dtype, `param.data = param.data + ...`, four noise sweeps, and the
              reference's loss (LM head over every position, cross-entropy masked to the option tokens)
    F_ref     one forward pass of that reference loss (so R's sweeps can be told apart from its forwards)
and the peak memory of inference alone and of each optimizer's training: the RSS high-water mark of a fresh
subprocess per measurement on CPU (VmHWM of /proc/self/status, reset after the model is loaded; ru_maxrss where
there is no /proc: on Linux a child spawned by a large parent inherits the parent's ru_maxrss through vfork/exec),
torch.cuda.max_memory_allocated on GPU (reset after loading).

    python bench/zo_step.py                                   # embedded model, 16 x 64 SST2 tokens, full-parameter
    python bench/zo_step.py --threads 1 --reps 7
    python bench/zo_step.py --keep_direction                  # adds the opt-in keep_direction figures (separate keys)
    python bench/zo_step.py --carry_perturbation              # adds the opt-in carried-perturbation figures (ditto)
    python bench/zo_step.py --compare_cuda_graphs             # CUDA: adds MeZO's steps without CUDA graphs (ditto)
    python bench/zo_step.py --model random:opt-13b --dtype float16 --seq 256      # GPU: random-weight OPT-13B shape
        (16-bit weights get an exact-restore copy by default, which doubles their memory: add --exact_restore never
        for MeZO's own memory footprint)
    python bench/zo_step.py --mode lora                       # or prefix (needs lora.py / prefix.py)
    python bench/zo_step.py --threads 1 --baseline 4e1682b    # also the optimizers of an older commit, same loop
    python bench/zo_step.py --threads 1 --breakdown           # where a step's time goes beyond its two forwards
    python bench/zo_step.py --threads 1 --optimizers all      # every optimizer: step cost and peak memory
    python bench/zo_step.py --probe_modes all --dtype float32,bfloat16,float16   # issue 22's table: per probe mode
        (inplace, forward, onepass) and weight dtype (one run per dtype, in a child process each): step / 2F, step / D,
        the step's excess over 2F and over D in weight sweeps (one sweep = (S_mezo - 2F) / 3, the in-place step's
        three sweeps), peak memory / inference (onepass also / inference at the doubled batch)

--baseline COMMIT checks that commit out (`git worktree add --detach` into a temporary folder) and times its
optimizers in a child process that runs that commit's code: MeZO and ZO-AdaMU (S_mezo_base, S_adamu_base) and each of
--optimizers the commit has (S_NAME_base), on a copy of the same model and batch, one repetition of each between the
current code's repetitions in this process, so both are measured under the same load.  Any commit works: the child
finds the optimizers in the layout of its commit (zo/ package, zo_methods.py, or zo.py holding MeZO and ZO-AdaMU).
The child holds a second copy of the model (on a GPU: twice the model's memory).
--breakdown times, inside the current optimizers' steps, each sweep (perturb +ε, perturb -2ε, update) and the two loss
closures; the rest of the step (probe bookkeeping, g, the step's Python) is what is left.
Compile time of the C kernels (once per rule, cached on disk) is reported apart (kernel_builds), never in a step.

The batch: 16 rows of exactly --seq real SST2 tokens, each row the encoded prompt + gold option of one training
example (the loss target) preceded by as many earlier training examples as fit (truncated on the left), so every
position is a real token. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
import tasks  # noqa: E402
import utils  # noqa: E402
import zo  # noqa: E402
from zo import registry as zo_methods  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# random-weight models built from a config (no download): name -> OPTConfig kwargs
RANDOM_OPT = {
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4),   # tests of the script
}
LR, EPS, WD = 1e-7, 1e-3, 0.0


def device_name(threads: int) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads})"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- setup
def load(args):
    dtype = DTYPES[args.dtype]
    tokenizer = models.load_tokenizer(args.tokenizer or (models.EMBEDDED_ALIAS if args.model.startswith("random:")
                                                         else args.model))
    if args.model.startswith("random:"):
        from transformers import AutoModelForCausalLM, OPTConfig
        name = args.model.split(":", 1)[1]
        if name not in RANDOM_OPT:
            raise SystemExit(f"unknown random model {name!r}; choose from {sorted(RANDOM_OPT)}")
        shape = RANDOM_OPT[name]
        config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=shape["hidden_size"],
                           do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2, **shape)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
    else:
        model = models.load_model(args.model, float16=dtype == torch.float16, bfloat16=dtype == torch.bfloat16)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    if args.mode == "lora":
        try:
            from lora import apply_lora
        except ImportError as error:
            raise SystemExit(f"--mode lora unavailable: cannot import lora.apply_lora ({error})")
        model = apply_lora(model)
    elif args.mode == "prefix":
        try:
            from prefix import apply_prefix_tuning
        except ImportError as error:
            raise SystemExit(f"--mode prefix unavailable: cannot import prefix.apply_prefix_tuning ({error})")
        model = apply_prefix_tuning(model)
    model.eval()
    batch = build_batch(args, tokenizer, tokens, model)
    return model, batch


def build_batch(args, tokenizer, tokens, model):
    task = tasks.load_task("SST2", args.data_dir)
    samples = task.sample_subset("train", 0, min(len(task.samples["train"]), 64 * args.batch))
    records = utils.build_train_records(task, samples, tokenizer, tokens, utils.Objective(), max_length=args.seq)
    vocab = model.get_input_embeddings().num_embeddings
    rows, it = [], iter(records)
    for _ in range(args.batch):
        last = next(it)
        ids, option_len = list(last["input_ids"]), last["option_len"]
        while len(ids) < args.seq:  # earlier real examples as left context
            ids = list(next(it)["input_ids"]) + ids
        ids = [i % vocab for i in ids[-args.seq:]]
        rows.append({"input_ids": ids, "option_len": min(option_len, args.seq - 1)})
    batch = utils.TrainCollator(tokens.pad_id, pad_to_multiple_of=1)(rows)
    device = models.model_device(model)
    assert batch["input_ids"].shape == (args.batch, args.seq) and bool(batch["attention_mask"].all())
    return {k: v.to(device) for k, v in batch.items()}


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def optimizer_kwargs(name, args, **extra) -> dict:
    """The constructor keywords of every measured optimizer (FZOO keeps its own Rademacher unless --direction)."""
    kw = dict(lr=LR, eps=EPS, exact_restore={"auto": None, "always": True, "never": False}[args.exact_restore],
              rng=args.rng, cuda_graphs=not args.no_cuda_graphs)
    if args.direction is not None or name != "fzoo":
        kw["direction"] = args.direction or "gaussian"
    if name == "zo_adamu":
        kw.update(state_dtype=DTYPES[args.zo_state_dtype] if args.zo_state_dtype else None)
    kw.update(extra)
    return kw


def make_optimizer(name, model, args, **extra):
    """An optimizer of the registry ("adamu" is zo_adamu) at the benchmark's settings."""
    name = "zo_adamu" if name == "adamu" else name
    kw = optimizer_kwargs(name, args, **extra)
    if name == "zo_adamu":
        kw["schedule"] = zo_methods.AdaMUSchedule.for_max_steps(1000)
    return zo_methods.get(name)(zo.param_groups_for_model(model, WD), **kw)


# The child of --baseline: runs in a checkout of the baseline commit, steps that commit's optimizers on the parent's
# model and batch, one timed step per request on stdin ("NAME" -> its seconds on stdout; "" ends it).
BASELINE_CHILD = r"""
import importlib, inspect, json, sys, time
import torch
worktree, current, job = sys.argv[1:4]
sys.path.insert(0, current)
import utils                                # the loss of the current code, as the parent's steps use
for name in [n for n in sys.modules if n.split(".")[0] not in sys.builtin_module_names
             and (getattr(sys.modules[n], "__file__", "") or "").startswith(current)]:
    del sys.modules[name]                   # utils keeps what it bound; the baseline imports its own modules
sys.path[0] = worktree
import zo                                   # the baseline's optimizers, from its own checkout
try:
    registry = importlib.import_module("zo.registry")
except ImportError:
    try:
        registry = importlib.import_module("zo_methods")
    except ImportError:
        registry = None
def get(name):
    if registry is not None:
        return registry.OPTIMIZERS.get(name)
    return {"mezo": getattr(zo, "MeZO", None), "zo_adamu": getattr(zo, "ZOAdaMU", None)}.get(name)
schedule_of = (registry or zo).AdaMUSchedule
spec = torch.load(job, weights_only=False)
model, batch, settings = spec["model"], spec["batch"], spec["settings"]
torch.set_num_threads(settings["threads"])
objective = utils.Objective()
closure = lambda: utils.training_loss(model, batch, objective)
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
def build(cls, kw):
    taken = set()
    for klass in cls.__mro__:               # what the constructor takes, through **kwargs to its bases
        if "__init__" in vars(klass):
            parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            taken |= {p.name for p in parameters}
            if not any(p.kind == p.VAR_KEYWORD for p in parameters):
                break
    kw = {k: v for k, v in kw.items() if k in taken or "hyperparameters" in taken}
    return cls(zo.param_groups_for_model(model, settings["weight_decay"]), **kw)
steps, found = {}, []
for name, kw in settings["optimizers"].items():
    cls = get(name)
    if cls is None:
        continue
    if name == "zo_adamu":
        kw = dict(kw, schedule=schedule_of.for_max_steps(1000))
    optimizer = build(cls, kw)
    steps[name] = (lambda optimizer: lambda: optimizer.step(closure))(optimizer)
    found.append(name)
for step in steps.values():
    for _ in range(settings["warmup"]):
        step()
print(json.dumps(found), flush=True)
for line in sys.stdin:
    name = line.strip()
    if not name:
        break
    sync()
    begin = time.perf_counter()
    steps[name]()
    sync()
    print(time.perf_counter() - begin, flush=True)
"""


class Baseline:
    """The optimizers of another commit, stepped in a child process that runs that commit's code on a copy of this
    process's model and batch (`git worktree add` of COMMIT in a temporary folder, removed at close())."""

    def __init__(self, commit: str, model, batch, args, names):
        import tempfile
        self.folder = Path(tempfile.mkdtemp(prefix="zo-baseline-"))
        self.worktree = self.folder / "tree"
        done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(self.worktree), commit],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"--baseline {commit}: cannot check it out ({done.stderr.strip()}); give a commit of "
                             "this repository")
        job = self.folder / "job.pt"
        settings = {"threads": args.threads, "warmup": args.warmup, "weight_decay": WD,
                    "optimizers": {name: optimizer_kwargs(name, args) for name in names}}
        torch.save({"model": model, "batch": batch, "settings": settings}, job)
        self.child = subprocess.Popen([sys.executable, "-c", BASELINE_CHILD, str(self.worktree), str(ROOT), str(job)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.child.stdout.readline()
        if not line:
            self.close()
            raise SystemExit(f"--baseline {commit}: the child process running that commit failed (its error above)")
        self.names = json.loads(line)

    def step_fn(self, name):
        def timed_step():
            self.child.stdin.write(name + "\n")
            self.child.stdin.flush()
            return float(self.child.stdout.readline())
        return timed_step

    def close(self):
        if self.child.poll() is None:
            self.child.stdin.write("\n")
            self.child.stdin.flush()
            self.child.wait(timeout=60)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.worktree)],
                       capture_output=True)
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------- the four measurements
def forward_fn(model, batch):
    objective = utils.Objective()

    def run():
        with torch.inference_mode():
            return utils.training_loss(model, batch, objective)
    return run


def reference_loss(model, batch):
    """MeZO's forward_wrap_with_option_len: full logits, then cross-entropy on the option tokens only."""
    logits = model(**{k: batch[k] for k in utils.MODEL_INPUTS}).logits
    labels = batch["input_ids"].clone()
    width = labels.shape[1]
    is_option = torch.arange(width, device=labels.device)[None, :] >= (width - batch["option_len"])[:, None]
    labels[~is_option] = -100
    shift_logits, shift_labels = logits[:, :-1].contiguous(), labels[:, 1:].contiguous()
    return torch.nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1),
                                             ignore_index=-100)


def reference_forward_fn(model, batch):
    def run():
        with torch.inference_mode():
            return reference_loss(model, batch)
    return run


def doubled(batch):
    """The batch twice over (rows [0, B) then the same rows again), as a one-pass probe feeds the model."""
    n = batch["input_ids"].shape[0]
    return {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in batch.items()}


def probe_step_fn(mode, model, batch, args):
    """A MeZO step with forward-time probes: the optimizer is attached to `model` (its wrappers pass through whenever
    this optimizer is not probing, so the other measurements on the same model see the plain forward)."""
    optimizer = make_optimizer("mezo", model, args, probe_mode=mode)
    optimizer.attach(model)
    objective = utils.Objective()
    loss = lambda m: utils.training_loss(m, batch, objective)  # noqa: E731
    step = lambda: optimizer.step(lambda: optimizer.forward_probe.losses(model, loss))  # noqa: E731
    step.optimizer = optimizer   # its last_rounded_away goes in the report
    return step


def zo_step_fn(optimizer, model, batch):
    objective = utils.Objective()
    closure = lambda: utils.training_loss(model, batch, objective)  # noqa: E731
    step = lambda: optimizer.step(closure)  # noqa: E731
    step.optimizer = optimizer   # its last_rounded_away goes in the report
    return step


def breakdown_step_fn(optimizer, model, batch, record):
    """A step whose sweeps (optimizer.timings) and loss closures are timed; appends one dict per step to `record`."""
    objective = utils.Objective()
    closures = []

    def closure():
        begin = time.perf_counter()
        loss = utils.training_loss(model, batch, objective)
        closures.append(time.perf_counter() - begin)
        return loss

    def step():
        optimizer.timings, closures[:] = [], []
        begin = time.perf_counter()
        optimizer.step(closure)
        total = time.perf_counter() - begin
        sweeps = [t for _, t in optimizer.timings]
        record.append({"step": total, "closures": list(closures), "sweeps": sweeps,
                       "rest": total - sum(closures) - sum(sweeps)})
        optimizer.timings = None
    return step


def reference_step_fn(model, batch, args):
    """MeZO's reference trainer step (zo_perturb_parameters / zo_step / zo_update), verbatim in its arithmetic."""
    named = trainable(model)
    eps, lr, wd = EPS, LR, WD

    def zo_perturb_parameters(random_seed, scaling_factor=1):
        torch.manual_seed(random_seed)
        for name, param in named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * eps

    def zo_forward():
        model.eval()
        with torch.inference_mode():
            return reference_loss(model, batch).detach()

    def step():
        zo_random_seed = np.random.randint(1000000000)
        zo_perturb_parameters(zo_random_seed, scaling_factor=1)
        loss1 = zo_forward()
        zo_perturb_parameters(zo_random_seed, scaling_factor=-2)
        loss2 = zo_forward()
        projected_grad = ((loss1 - loss2) / (2 * eps)).item()
        zo_perturb_parameters(zo_random_seed, scaling_factor=1)
        torch.manual_seed(zo_random_seed)  # zo_update
        for name, param in named:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - lr * (projected_grad * z + wd * param.data)
            else:
                param.data = param.data - lr * (projected_grad * z)
        return loss1
    return step


def timed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure_times(model, batch, args):
    fns = {"F": forward_fn(model, batch),
           "S_mezo": zo_step_fn(make_optimizer("mezo", model, args), model, batch),
           "S_adamu": zo_step_fn(make_optimizer("adamu", model, args), model, batch)}
    if args.keep_direction:
        fns["S_mezo_keep"] = zo_step_fn(make_optimizer("mezo", model, args, keep_direction=True), model, batch)
        fns["S_adamu_keep"] = zo_step_fn(make_optimizer("adamu", model, args, keep_direction=True), model, batch)
    if args.carry_perturbation:  # steady state: each step starts from the perturbation the previous one carried
        fns["S_mezo_carry"] = zo_step_fn(make_optimizer("mezo", model, args, carry_perturbation=True), model, batch)
        fns["S_adamu_carry"] = zo_step_fn(make_optimizer("adamu", model, args, carry_perturbation=True), model, batch)
    if args.compare_cuda_graphs:  # MeZO's steps with one Python-side kernel launch per tensor and sweep (MeZO only:
        # every ZO-AdaMU optimizer holds a parameter-sized momentum, and two more would not fit beside a 13B model)
        fns["S_mezo_eager"] = zo_step_fn(make_optimizer("mezo", model, args, cuda_graphs=False), model, batch)
        if args.carry_perturbation:
            fns["S_mezo_carry_eager"] = zo_step_fn(
                make_optimizer("mezo", model, args, carry_perturbation=True, cuda_graphs=False), model, batch)
    for name in args.optimizers:
        fns[f"S_{name}"] = zo_step_fn(make_optimizer(name, model, args), model, batch)
    for mode in args.probe_modes:
        if mode != "inplace":
            fns[f"S_mezo_{mode}"] = probe_step_fn(mode, model, batch, args)
    if "onepass" in args.probe_modes:
        fns["D"] = forward_fn(model, doubled(batch))
    remote = {}   # measured in the --baseline child: its steps report their own seconds
    if args.baseline:
        baseline = Baseline(args.baseline, model, batch, args, ["mezo", "zo_adamu", *args.optimizers])
        for name in baseline.names:
            remote["S_adamu_base" if name == "zo_adamu" else f"S_{name}_base"] = baseline.step_fn(name)
    breakdown = {}
    if args.breakdown:
        for name in ("mezo", "adamu"):
            breakdown[name] = []
            fns[f"B_{name}"] = breakdown_step_fn(make_optimizer(name, model, args), model, batch, breakdown[name])
    if not args.no_reference:
        fns["F_ref"] = reference_forward_fn(model, batch)
        fns["R"] = reference_step_fn(model, batch, args)
    for name, fn in fns.items():  # warm-up (allocator, first-touch, one-off builds)
        for _ in range(args.warmup):
            fn()
    times = {name: [] for name in [*fns, *remote]}
    for rep in range(args.reps):  # interleaved, so load from other processes hits every measurement alike
        for name, fn in fns.items():
            times[name].append(timed(fn))
        for name, fn in remote.items():
            times[name].append(fn())
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr, flush=True)
    for record in breakdown.values():
        del record[:len(record) - args.reps]   # the timed repetitions only
    if args.baseline:
        baseline.close()
    # the share of the last step's updates that rounded to nothing (None where the weights are fp32)
    rounded = {name: None if fn.optimizer.last_rounded_away is None else round(float(fn.optimizer.last_rounded_away), 6)
               for name, fn in fns.items() if hasattr(fn, "optimizer")}
    return {name: statistics.median(v) for name, v in times.items()}, times, breakdown, rounded


# ------------------------------------------------------------------------------------------------ memory
def memory_child(args):
    """Runs in a fresh process: load, then either inference only or `--mem_steps` training steps; print the peak."""
    torch.set_num_threads(args.threads)
    model, batch = load(args)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_rss_high_water()
    what = args.memory_child
    if what == "inference":
        fn = forward_fn(model, batch)
    elif what == "reference":
        fn = reference_step_fn(model, batch, args)
    elif what.startswith("opt:"):
        fn = zo_step_fn(make_optimizer(what[4:], model, args), model, batch)
    elif what.startswith("probe:"):
        fn = probe_step_fn(what[6:], model, batch, args)
    elif what == "inference_doubled":
        fn = forward_fn(model, doubled(batch))
    else:
        name, _, variant = what.partition("_")
        fn = zo_step_fn(make_optimizer(name, model, args, keep_direction=variant == "keep",
                                       carry_perturbation=variant == "carry"), model, batch)
    for _ in range(args.mem_steps):
        fn()
    sync()
    print(json.dumps({"peak_bytes": int(torch.cuda.max_memory_allocated() if cuda else rss_high_water())}))


def reset_rss_high_water() -> None:
    """Start the RSS high-water mark afresh after loading, as the GPU's peak statistics are reset: the loader's
    transient peak (a 16-bit model is converted from the fp32 file, mapped meanwhile) would otherwise hide the peak
    of the steps measured.  Linux's clear_refs; elsewhere nothing (the load's peak then counts)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_high_water() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_memory(args, what):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_child", what, "--model", args.model,
           "--batch", str(args.batch), "--seq", str(args.seq), "--mode", args.mode, "--dtype", args.dtype,
           "--threads", str(args.threads), "--mem_steps", str(args.mem_steps),
           "--exact_restore", args.exact_restore, "--rng", args.rng]
    if args.no_cuda_graphs:
        cmd += ["--no_cuda_graphs"]
    if args.direction:
        cmd += ["--direction", args.direction]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    if args.zo_state_dtype:
        cmd += ["--zo_state_dtype", args.zo_state_dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"memory measurement {what!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


# -------------------------------------------------------------------------------------------------- main
def main():
    default_data = os.environ.get(tasks.DATA_DIR_ENV) or (
        str(ROOT.parent / "shared" / "data") if (ROOT.parent / "shared" / "data").is_dir() else None)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED_ALIAS,
                        help=f"hub id / folder / {models.EMBEDDED_ALIAS}, or random:{{{','.join(RANDOM_OPT)}}}")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: the model's; the embedded one's for random: models)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--mode", choices=["ft", "lora", "prefix"], default="ft")
    parser.add_argument("--dtype", default="float32",
                        help=f"weight dtype, or several comma-separated (one child run each): {', '.join(DTYPES)}")
    parser.add_argument("--probe_modes", default="inplace",
                        help=f"MeZO's probe modes to measure, comma-separated, or all: {', '.join(zo.PROBE_MODES)}")
    parser.add_argument("--direction", choices=list(zo.DIRECTIONS), default=None,
                        help="default: Gaussian (FZOO: its Rademacher)")
    parser.add_argument("--optimizers", default="",
                        help="comma-separated --zo_optim names, or all: also time and measure each one's step "
                             "(mezo and zo_adamu are always measured as S_mezo / S_adamu)")
    parser.add_argument("--zo_state_dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--exact_restore", choices=["auto", "always", "never"], default="auto",
                        help="the optimizers' exact_restore (auto: stash copies of 16-bit weights only)")
    parser.add_argument("--rng", choices=list(zo.RNGS), default="auto",
                        help="noise source (auto: the counter stream on CPU, and on CUDA where Triton is installed)")
    parser.add_argument("--keep_direction", action="store_true", help="also measure the opt-in keep_direction mode")
    parser.add_argument("--carry_perturbation", action="store_true",
                        help="also measure the opt-in carry_perturbation mode (update fused with the next +εu)")
    parser.add_argument("--no_cuda_graphs", action="store_true",
                        help="sweep with one kernel launch per tensor instead of replaying captured CUDA graphs")
    parser.add_argument("--compare_cuda_graphs", action="store_true",
                        help="also measure MeZO's steps with eager launches (CUDA), in the same run")
    parser.add_argument("--baseline", default=None, metavar="COMMIT",
                        help="also time the optimizers of COMMIT (e.g. 3c2ea36), in a child process that runs a "
                             "checkout of it, alternating with the current code's repetitions")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each sweep and loss closure inside the current optimizers' steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per measurement (CUDA graphs: the 1st runs eagerly, the 2nd captures)")
    parser.add_argument("--mem_steps", type=int, default=3)
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--no_reference", action="store_true")
    parser.add_argument("--data_dir", default=default_data)
    parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtypes = [d for d in args.dtype.split(",") if d]
    if not dtypes or set(dtypes) - set(DTYPES):
        parser.error(f"--dtype {args.dtype!r}: choose one or more (comma-separated) of {', '.join(DTYPES)}")
    modes = list(zo.PROBE_MODES) if args.probe_modes == "all" else [m for m in args.probe_modes.split(",") if m]
    if not modes or set(modes) - set(zo.PROBE_MODES):
        parser.error(f"--probe_modes {args.probe_modes!r}: choose all, or from {', '.join(zo.PROBE_MODES)}")
    args.probe_modes = ["inplace", *[m for m in modes if m != "inplace"]]   # in place: S_mezo, the reference
    if len(dtypes) > 1:
        return by_dtype(dtypes)
    names = list(zo_methods.OPTIMIZERS) if args.optimizers == "all" else [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(zo_methods.OPTIMIZERS))
    if unknown:
        parser.error(f"--optimizers: unknown {unknown}; choose from all, {', '.join(zo_methods.OPTIMIZERS)}")
    args.optimizers = [n for n in names if n not in ("mezo", "zo_adamu")]
    for name in args.optimizers:  # a method that refuses these settings says so now, not after the model loads
        try:
            make_optimizer(name, torch.nn.Linear(2, 2), args)
        except ValueError as error:
            parser.error(f"--optimizers {name} with --exact_restore {args.exact_restore}: {error}")
    if args.memory_child:
        return memory_child(args)

    torch.set_num_threads(args.threads)
    model, batch = load(args)
    n_train = sum(p.numel() for _, p in trainable(model))
    median, samples, breakdown, rounded = measure_times(model, batch, args)
    F = median["F"]
    report = {"device": device_name(args.threads), "threads": args.threads, "model": args.model, "mode": args.mode,
              "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "direction": args.direction,
              "exact_restore": args.exact_restore, "rng": args.rng, "cuda_graphs": not args.no_cuda_graphs,
              "zo_kernels": zo.kernels_available(),
              "triton_kernels": zo.triton_available(),
              "trainable_params": n_train, "reps": args.reps,
              "seconds_median": {k: round(v, 4) for k, v in median.items()},
              "step_over_2fwd_mezo": round(median["S_mezo"] / (2 * F), 4),
              "step_over_2fwd_adamu": round(median["S_adamu"] / (2 * F), 4)}
    if "R" in median:
        report["mezo_over_reference"] = round(median["S_mezo"] / median["R"], 4)
        report["reference_over_2fwd_ref"] = round(median["R"] / (2 * median["F_ref"]), 4)
        report["reference_sweep_seconds"] = round((median["R"] - 2 * median["F_ref"]) / 4, 4)
        # the same comparison with R's forwards replaced by ours: the sweeps alone (derived, not measured)
        report["mezo_over_reference_same_forward"] = round(
            median["S_mezo"] / (median["R"] - 2 * median["F_ref"] + 2 * F), 4)
    # per-repetition figures (S and F of the same round) are less sensitive to slow drifts in machine load
    def paired(name, fn):
        return round(statistics.median(fn(s, f) for s, f in zip(samples[name], samples["F"])), 4)
    report["paired_median"] = {f"step_over_2fwd_{k}": paired(f"S_{k}", lambda s, f: s / (2 * f))
                               for k in ("mezo", "adamu")}
    for k in ("mezo", "adamu"):  # 3 sweeps per step; ZO-AdaMU's sweeps draw two noise streams
        report[f"sweep_seconds_{k}"] = paired(f"S_{k}", lambda s, f: (s - 2 * f) / 3)
    if args.baseline:
        report["baseline"] = {"commit": args.baseline, **{
            f"step_over_2fwd_{k}": round(median[f"S_{k}_base"] / (2 * F), 4) for k in ("mezo", "adamu")}}
        report["baseline"]["paired_median"] = {f"step_over_2fwd_{k}": paired(f"S_{k}_base", lambda s, f: s / (2 * f))
                                               for k in ("mezo", "adamu")}
        report["baseline"]["sweep_seconds"] = {k: paired(f"S_{k}_base", lambda s, f: (s - 2 * f) / 3)
                                               for k in ("mezo", "adamu")}
        report["baseline"]["optimizers"] = {
            name: {"paired_step_over_mine": round(statistics.median(
                b / s for b, s in zip(samples[f"S_{name}_base"], samples[f"S_{name}"])), 4)}
            for name in args.optimizers if f"S_{name}_base" in samples}
        if "R" in median:
            report["baseline"]["mezo_over_reference"] = round(median["S_mezo_base"] / median["R"], 4)
    if breakdown:
        report["breakdown_seconds_median"] = {
            name: {"step": round(statistics.median(r["step"] for r in recs), 4),
                   "closure_plus": round(statistics.median(r["closures"][0] for r in recs), 4),
                   "closure_minus": round(statistics.median(r["closures"][1] for r in recs), 4),
                   "sweep_perturb_plus": round(statistics.median(r["sweeps"][0] for r in recs), 4),
                   "sweep_perturb_minus": round(statistics.median(r["sweeps"][1] for r in recs), 4),
                   "sweep_update": round(statistics.median(r["sweeps"][2] for r in recs), 4),
                   "rest": round(statistics.median(r["rest"] for r in recs), 4),
                   "closures_over_2fwd": round(statistics.median(sum(r["closures"]) for r in recs) / (2 * F), 4),
                   # 1 + (sweeps + rest) / 2F of the same repetition: the step's own cost with its two forwards
                   # taken as the standalone F's, free of the forward's run-to-run noise
                   "derived_step_over_2fwd": round(statistics.median(
                       1 + (sum(r["sweeps"]) + r["rest"]) / (2 * f) for r, f in zip(recs, samples["F"])), 4)}
            for name, recs in breakdown.items()}
    if len(args.probe_modes) > 1:
        sweep = report["sweep_seconds_mezo"]
        report["D_over_2fwd"] = round(median["D"] / (2 * F), 4) if "D" in median else None
        report["probe_modes"] = {}
        for mode in args.probe_modes:
            key = "S_mezo" if mode == "inplace" else f"S_mezo_{mode}"
            entry = report["probe_modes"][mode] = {
                "step_over_2fwd": round(median[key] / (2 * F), 4),
                "paired_step_over_2fwd": paired(key, lambda s, f: s / (2 * f)),
                "excess_over_2fwd_sweeps": round((median[key] - 2 * F) / sweep, 3) if sweep > 0 else None,
                "rounded_away": rounded.get(key)}
            if "D" in median:
                entry["step_over_D"] = round(median[key] / median["D"], 4)
                entry["excess_over_D_sweeps"] = round((median[key] - median["D"]) / sweep, 3) if sweep > 0 else None
    if args.optimizers:
        # every optimizer in one table: its forwards a step, the step against those forwards and against two
        report["optimizers"] = {"mezo": {"forwards": 2}, "zo_adamu": {"forwards": 2}}
        for name in args.optimizers:
            forwards = zo_methods.forward_passes(name)
            report["optimizers"][name] = {
                "forwards": forwards, "step_over_2fwd": round(median[f"S_{name}"] / (2 * F), 4),
                "step_over_forwards": round(median[f"S_{name}"] / (forwards * F), 4),
                "paired_step_over_2fwd": paired(f"S_{name}", lambda s, f: s / (2 * f))}
        for name, key in (("mezo", "S_mezo"), ("zo_adamu", "S_adamu")):
            report["optimizers"][name].update(step_over_2fwd=round(median[key] / (2 * F), 4),
                                              step_over_forwards=round(median[key] / (2 * F), 4))
    report["kernel_builds"] = zo.kernel_builds()
    report["load_average"] = os.getloadavg()
    if args.compare_cuda_graphs:
        report["eager_launches"] = {f"step_over_2fwd_mezo{v}": round(median[f"S_mezo{v}_eager"] / (2 * F), 4)
                                    for v in ("", "_carry") if f"S_mezo{v}_eager" in median}
        report["eager_launches"]["sweep_seconds_mezo"] = paired("S_mezo_eager", lambda s, f: (s - 2 * f) / 3)
    for variant, flag in (("keep", "keep_direction"), ("carry", "carry_perturbation")):
        if getattr(args, flag):
            report[flag] = {f"step_over_2fwd_{k}": round(median[f"S_{k}_{variant}"] / (2 * F), 4)
                            for k in ("mezo", "adamu")}
            report[flag]["paired_median"] = {
                f"step_over_2fwd_{k}": paired(f"S_{k}_{variant}", lambda s, f: s / (2 * f)) for k in ("mezo", "adamu")}
    if not args.no_memory:
        del model, batch   # the children measure from scratch; on a GPU this process's tensors would crowd them out
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kinds = ["inference", "mezo", "adamu"] + ([] if args.no_reference else ["reference"])
        if args.keep_direction:
            kinds += ["mezo_keep", "adamu_keep"]
        if args.carry_perturbation:
            kinds += ["mezo_carry", "adamu_carry"]
        kinds += [f"probe:{m}" for m in args.probe_modes if m != "inplace"]
        kinds += ["inference_doubled"] if "onepass" in args.probe_modes else []
        peak = {k: measure_memory(args, k) for k in kinds}
        inf = peak["inference"]
        report["peak_mb"] = {k: round(v / 2**20, 1) for k, v in peak.items()}
        report["mem_over_inference_mezo"] = round(peak["mezo"] / inf, 4)
        report["mem_over_inference_adamu"] = round(peak["adamu"] / inf, 4)
        state_dtype = DTYPES[args.zo_state_dtype] if args.zo_state_dtype else DTYPES[args.dtype]
        momentum_bytes = n_train * state_dtype.itemsize
        report["mem_target_adamu"] = round(1.05 + momentum_bytes / inf, 4)
        for name in args.optimizers:
            peak[name] = measure_memory(args, f"opt:{name}")
            report["peak_mb"][name] = round(peak[name] / 2**20, 1)
        if args.optimizers:
            for name, key in (("mezo", "mezo"), ("zo_adamu", "adamu"), *((n, n) for n in args.optimizers)):
                report["optimizers"][name]["mem_over_inference"] = round(peak[key] / inf, 4)
        if "reference" in peak:
            report["mem_over_inference_reference"] = round(peak["reference"] / inf, 4)
        for mode in report.get("probe_modes", {}):
            peak_mode = peak["mezo" if mode == "inplace" else f"probe:{mode}"]
            report["probe_modes"][mode]["mem_over_inference"] = round(peak_mode / inf, 4)
            if "inference_doubled" in peak:
                report["probe_modes"][mode]["mem_over_inference_doubled"] = round(
                    peak_mode / peak["inference_doubled"], 4)
        for variant, flag in (("keep", "keep_direction"), ("carry", "carry_perturbation")):
            if getattr(args, flag):
                report[flag].update(mem_over_inference_mezo=round(peak[f"mezo_{variant}"] / inf, 4),
                                    mem_over_inference_adamu=round(peak[f"adamu_{variant}"] / inf, 4))
    print(json.dumps(report))


def by_dtype(dtypes):
    """One child run of this script per weight dtype (the model is loaded in each); their reports under
    "by_dtype", and the probe modes' figures side by side under "probe_table"."""
    argv, reports = sys.argv[1:], {}
    at = argv.index("--dtype") if "--dtype" in argv else None
    for dtype in dtypes:
        child = argv[:at] + ["--dtype", dtype] + argv[at + 2:] if at is not None else argv + ["--dtype", dtype]
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"--dtype {dtype} failed:\n{out.stderr[-3000:]}")
        print(out.stderr, file=sys.stderr, end="", flush=True)
        reports[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    table = {dtype: r.get("probe_modes", {}) for dtype, r in reports.items()}
    print(json.dumps({"by_dtype": reports, "probe_table": table}))


if __name__ == "__main__":
    main()
