"""Every flag of run.py, declared once, and the one validation step that checks them all.

    config = args.parse(sys.argv[1:])   # UsageError with every problem at once; nothing has run or been written

Flags come in groups (task and data, model, evaluation, training, parameter-efficient modes, zeroth-order), one
dataclass each, whose fields carry the help text, the accepted values (`choices`), the range of numbers (`low`, `high`,
`above`) and, where a flag only means something with another setting, that setting (`only_with`) next to the default.
Hugging Face's `TrainingArguments` come last (their ranges are in `HF_RANGES`). `parse`
* rewrites legacy spellings (`--evaluation_strategy`, `--no_reparam`, `--zo_unsigned_momentum`, `--no_eval`) and
  negative numbers (`--learning_rate -1e-3`, which argparse would read as a flag),
* refuses unknown flags with a "did you mean", values of the wrong type or outside their range, flags given without
  the setting they belong to, and every cross-flag rule of `check`,
and reports all problems together. `RunConfig.identity()` is what defines a run: the run's output folder and result
name derive from it, and a checkpoint is resumed only by a run of the same identity (runs.py).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments

import cli
import parallel
import tasks
import zo
import zo.offload
from zo import registry as zo_methods
from cli import UsageError, condition_text, flag, normalise, range_text, screen

USAGE = "python run.py [--task_name TASK] [--model_name MODEL] [--trainer none|regular|zo] [flags ...]"
DESCRIPTION = ("Zero-shot / in-context-learning evaluation and first- or zeroth-order fine-tuning of causal LMs. The "
               "suite's own flag groups come first, Hugging Face's TrainingArguments last.")


# --- the flag groups --------------------------------------------------------------------------------------------

@dataclass
class TaskArguments:
    _argument_group_name = "Task and data"
    task_name: str = flag("SST2", "Task (case-sensitive).", choices=tuple(tasks.TASKS))
    data_dir: str | None = flag(None, "Folder with <task>/<split>.jsonl[.gz] in Hugging Face field layout (default: "
                                      "$ZO_DATA_DIR; unset: the hub, then the small bundled sample).")
    hub_dataset: str | None = flag(None, "Override the task's hub repository: 'path' or 'path:config'.")
    num_train: int = flag(0, "ICL: demonstrations per prompt. Training: training examples.", low=0)
    num_dev: int | None = flag(None, "Dev examples, carved from the tail of the train draw (training only).", low=1)
    num_eval: int | None = flag(None, "Test examples sampled from the validation split (default: all).", low=1)
    num_train_sets: int | None = flag(None, "Number of train/demo sets, seeds 0..N-1.", low=1)
    train_set_seed: int | None = flag(None, "One train/demo set drawn with this seed (takes precedence over "
                                            "--num_train_sets).", low=0)
    result_file: str | None = flag(None, "Result JSON path (default: an automatic name under result/).",
                                   identity=False)
    tag: str = flag("", "Appended to the result file and run folder names.")


@dataclass
class ModelArguments:
    _argument_group_name = "Model"
    model_name: str = flag("smollm2-135m", "Hugging Face hub id or local folder; 'smollm2-135m' is the embedded "
                                           "offline default.")
    load_float16: bool = flag(False, "Load the weights in float16.")
    load_bfloat16: bool = flag(False, "Load the weights in bfloat16.")
    load_int8: bool = flag(False, "Load 8-bit weights (bitsandbytes; inference only).")
    max_length: int = flag(2048, "Maximum tokens per sequence; prompts are truncated from the left.", low=2)
    auto_device: bool = flag(True, "On CUDA, spread the model over the visible GPUs with device_map='auto' "
                                   "(--no_auto_device: one device, as FSDP needs).")
    untie_emb: bool = flag(False, "Untie the input and output embeddings.")
    opt_bos_fix: bool = flag(True, "For OPT models (config.model_type == 'opt') start prompts with id 0 as the MeZO "
                                   "papers did; --no_opt_bos_fix keeps OPT's own BOS.")


@dataclass
class EvalArguments:
    _argument_group_name = "Evaluation"
    sfc: bool = flag(False, "Surface-form-competition calibration (prompt without demos).")
    icl_sfc: bool = flag(False, "SFC calibration whose prompt keeps the demonstrations.")
    sampling: bool = flag(False, "Generation: sample instead of greedy decoding.")
    temperature: float = flag(1.0, "Generation temperature (with --sampling).", above=0.0,
                              only_with=("evaluation.sampling", (True,)))
    num_beams: int = flag(1, "Generation beams.", low=1)
    top_k: int | None = flag(None, "Generation top-k (with --sampling).", low=1, only_with=("evaluation.sampling", (True,)))
    top_p: float = flag(0.95, "Generation top-p (with --sampling).", above=0.0, high=1.0,
                        only_with=("evaluation.sampling", (True,)))
    max_new_tokens: int = flag(50, "Generation budget, also reserved out of --max_length.", low=1)
    eos_token: str = flag("\n", "Extra stop text for generation (its last token).")
    verbose: bool = flag(False, "Log prompt, candidates and scores of every example.", identity=False)
    final_eval: bool = flag(True, "Evaluate on the test subset after training and write the result file "
                                  "(--no_final_eval skips both).", identity=False,
                            only_with=("train.trainer", ("regular", "zo")))


@dataclass
class TrainArguments:
    _argument_group_name = "Training (shared by the regular and the ZO trainer)"
    trainer: str = flag("none", "none: zero-shot/ICL evaluation; regular: first-order HF Trainer; zo: zeroth-order.",
                        choices=("none", "regular", "zo"))
    only_train_option: bool = flag(True, "LM loss on the option tokens only (--no_only_train_option: every token).")
    train_as_classification: bool | None = flag(
        None, "Cross-entropy over the candidates' length-normalised option log-likelihoods (default: the task's "
              "entry in tasks.py, as MeZO's scripts: on for classification tasks except Copa and ReCoRD).")
    non_diff: bool = flag(False, "Non-differentiable objective: minus the task metric of the model's own predictions "
                                 "(ZO only).", only_with=("train.trainer", ("zo",)))
    linear_probing: bool = flag(False, "Fit a logistic-regression head on frozen features.",
                                only_with=("train.trainer", ("regular",)))
    lp_early_stopping: bool = flag(False, "Linear probing: tol 0.01, max_iter 1000.",
                                   only_with=("train.linear_probing", (True,)))
    head_tuning: bool = flag(False, "Train only the output head.", only_with=("train.trainer", ("regular", "zo")))
    save_model: bool = flag(False, "Save the trained model (or adapter) to the run folder.",
                            only_with=("train.trainer", ("regular", "zo")), identity=False)
    overwrite_output_dir: bool = flag(False, "Start afresh: delete the run folder's checkpoints instead of resuming "
                                             "from the newest complete one.", identity=False)


@dataclass
class PeftArguments:
    _argument_group_name = "Parameter-efficient modes"
    prefix_tuning: bool = flag(False, "Prefix tuning.", only_with=("train.trainer", ("regular", "zo")))
    num_prefix: int = flag(5, "Prefix key/value positions per layer.", low=1, only_with=("peft.prefix_tuning", (True,)))
    prefix_reparam: bool = flag(False, "MLP reparameterisation of the prefix (needs --no_prefix_init_by_real_act).",
                                only_with=("peft.prefix_tuning", (True,)))
    prefix_init_by_real_act: bool = flag(True, "Initialise prefixes from real key/values of random tokens.",
                                         only_with=("peft.prefix_tuning", (True,)))
    lora: bool = flag(False, "LoRA.", only_with=("train.trainer", ("regular", "zo")))
    lora_alpha: int = flag(16, "LoRA alpha.", above=0, only_with=("peft.lora", (True,)))
    lora_r: int = flag(8, "LoRA rank.", low=1, only_with=("peft.lora", (True,)))
    lora_target_modules: str | None = flag(None, "Comma-separated module names for LoRA (default: chosen from the "
                                                 "model type).", only_with=("peft.lora", (True,)))
    save_merged: bool = flag(False, "With --lora --save_model: save merged full weights instead of the adapter.",
                             only_with=("peft.lora", (True,)), identity=False)


class HFArguments(TrainingArguments):
    """Hugging Face's TrainingArguments, unchanged; a group of their own so that --help lists them last."""
    _argument_group_name = "Hugging Face TrainingArguments (learning rate, steps, batch size, saving, logging ...)"


ZO = ("train.trainer", ("zo",))


def _methods(*names: str) -> tuple:
    """only_with for a flag that means something to the named optimizers alone."""
    unknown = set(names) - set(zo_methods.OPTIMIZERS)
    if unknown:
        raise ValueError(f"flags declared for unknown optimizers {sorted(unknown)}")
    return ("zo.zo_optim", names)


_OPTIM_HELP = f"ZO optimizer (forward passes a step; memory beyond inference): {zo_methods.describe_all()}."


@dataclass
class _ZOCoreArguments:
    """The flags of the ZO core, which every method takes; the methods' own follow (ZOArguments)."""
    _argument_group_name = "Zeroth-order optimizers (--trainer zo)"
    zo_optim: str = flag("mezo", _OPTIM_HELP, choices=tuple(zo_methods.OPTIMIZERS), only_with=ZO)
    zo_eps: float = flag(1e-3, "Perturbation scale epsilon.", above=0.0, only_with=ZO)
    zo_direction: str | None = flag(None, "Perturbation distribution (default: the optimizer's, Rademacher for "
                                          "fzoo, Gaussian for the others).", choices=zo.DIRECTIONS, only_with=ZO)
    zo_num_directions: int | None = flag(None, zo_methods.directions_help(), low=1, only_with=ZO)
    zo_parallel: str = flag(
        "data", "With several processes: data (each rank probes the step's directions on its shard of the batch; the "
                 "losses are all-reduced) or directions (every rank takes the whole batch and probes "
                 "--zo_num_directions / world of the directions; the (direction, g) pairs are all-reduced).",
        choices=("data", "directions"), only_with=ZO)
    zo_exact_restore: str = flag(
        "auto", "Keep a copy of the weights during a step so probes restore them exactly: auto (16-bit weights "
                "only, where rounding drift is large), always (fp32 too; one parameter-sized buffer) or never "
                "(MeZO's memory; fp32 drift stays ~1e-7).", choices=("auto", "always", "never"), only_with=ZO)
    zo_probe: str = flag(
        "inplace", "How a probe perturbs the weights: inplace (writes θ±εu into the weights and restores them: three "
                   "weight sweeps a step; 16-bit weights need the stash of --zo_exact_restore auto), forward (each "
                   "module computes with θ±εu as a temporary while its forward runs; the weights change only in the "
                   "update: no stash, no drift, inference memory) or onepass (forward, with both signs in one forward "
                   "of the doubled batch: first half θ+εu, second θ-εu; not with --non_diff or mixture-of-experts "
                   "models).", choices=zo.PROBE_MODES, only_with=ZO, identity="unless_default")
    zo_keep_direction: bool = flag(False, "Keep each step's direction in memory: one noise sweep per step instead "
                                          "of three, for one parameter-sized buffer (small models).", only_with=ZO)
    zo_carry_perturbation: bool = flag(
        False, "Fuse each update with the next step's first perturbation: two weight sweeps per step instead of "
               "three where one kernel does both. The weights rest perturbed between steps and are restored before "
               "evaluation, saving and the end of training.", only_with=ZO)
    zo_cuda_graphs: bool = flag(True, "On CUDA with Triton, replay each kind of weight sweep as a captured CUDA "
                                      "graph (identical results; --no_zo_cuda_graphs launches per tensor).",
                                only_with=ZO, identity=False)
    zo_stochastic_rounding: bool = flag(
        False, "Round each update of 16-bit weights (--load_float16 / --load_bfloat16) to the weight dtype at random, "
               "up with probability the fraction of an ulp, from bits drawn from the step's seed (reproducible, "
               "bit-identical on resume), instead of to nearest, where steps below half an ulp vanish (the training "
               "log's update_rounded_away is the share that did). float32 weights are never rounded: no effect on "
               "them (LoRA adapters of a 16-bit model may be float32). Not with the low-rank methods (lozo, lozo_m, "
               "subzero).", only_with=ZO, identity="unless_default")

    zo_offload: str = flag(
        "none", "Where the weights rest: none (on the device) or cpu (one GPU: the model's decoder blocks and their "
                "optimizer state in pinned host memory, streamed block by block while the previous block computes; "
                "each step's update is applied to a block when it next arrives; embeddings, final norm and head stay "
                "on the GPU). Needs --zo_probe onepass (or forward) and an element-wise method (not hizoo, fzoo, "
                "zo_sgd_cons, lozo, lozo_m, subzero); one process, not with --fsdp. Without CUDA the blocks stream to a "
                "CPU stand-in (the same code, no memory saved). Identical results (the resident run's bits), so not "
                "part of a run's identity: a checkpoint resumes streamed or resident.", choices=zo.offload.OFFLOAD_MODES,
        only_with=ZO, identity=False)

    def optimizer_class(self):
        return zo_methods.get(self.zo_optim)

    def known_class(self):
        """The optimizer class, or None for a --zo_optim outside the registry: validation reports that once, as an
        unavailable choice, and its other checks skip what needs the class."""
        return zo_methods.OPTIMIZERS.get(self.zo_optim)

    def num_directions(self) -> int:
        """Directions a step: --zo_num_directions, or the optimizer's default."""
        return self.zo_num_directions or self.optimizer_class().default_directions

    def optimizer_kwargs(self, max_steps: int) -> dict:
        """Keyword arguments of the chosen optimizer's constructor (besides params, lr, weight_decay and seed): the
        core's from the flags above, the method's from its declared hyper-parameters (zo.registry.keywords)."""
        restore = {"auto": None, "always": True, "never": False}[self.zo_exact_restore]
        kwargs = dict(eps=self.zo_eps, exact_restore=restore, probe_mode=self.zo_probe,
                      keep_direction=self.zo_keep_direction, carry_perturbation=self.zo_carry_perturbation,
                      cuda_graphs=self.zo_cuda_graphs)
        if self.zo_stochastic_rounding:   # only when on: the constructors of methods that refuse it never see it
            kwargs["stochastic_rounding"] = True
        if self.zo_direction is not None:
            kwargs["direction"] = self.zo_direction
        if "num_directions" in accepted_keywords(self.optimizer_class()):
            kwargs["num_directions"] = self.num_directions()
        return kwargs | zo_methods.keywords(self.zo_optim, vars(self), max_steps=max_steps)


accepted_keywords = zo_methods.accepted_keywords


def _method_flag(declared: zo_methods.Flag) -> tuple:
    """A dataclass field for a per-method flag, from the methods' declarations (zo.hparams)."""
    kind = declared.kind if declared.default is not None else declared.kind | None
    return declared.name, kind, flag(declared.default, declared.help, choices=declared.choices, low=declared.low,
                                     high=declared.high, above=declared.above, only_with=_methods(*declared.methods))


# The core's flags, then every method's hyper-parameters as flags (their defaults, ranges and help declared once).
ZOArguments = dataclasses.make_dataclass("ZOArguments", [_method_flag(f) for f in zo_methods.flags()],
                                         bases=(_ZOCoreArguments,))
ZOArguments.__module__ = __name__


GROUPS = (("task", TaskArguments), ("model", ModelArguments), ("evaluation", EvalArguments),
          ("train", TrainArguments), ("peft", PeftArguments), ("zo", ZOArguments), ("hf", HFArguments))

# Ranges of the Hugging Face flags this suite relies on: (low, high, exclusive low); None leaves a side open.
HF_RANGES = {
    "learning_rate": (0.0, None, False), "weight_decay": (0.0, None, False), "num_train_epochs": (0.0, None, True),
    "per_device_train_batch_size": (1, None, False), "per_device_eval_batch_size": (1, None, False),
    "gradient_accumulation_steps": (1, None, False), "warmup_steps": (0, None, False), "seed": (0, None, False),
    "logging_steps": (0, None, True), "eval_steps": (0, None, True), "save_steps": (0, None, True),
    "save_total_limit": (1, None, False), "max_grad_norm": (0.0, None, False), "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False), "adam_epsilon": (0.0, None, True),
}
# Hugging Face flags that do not change what a run computes: logging, reporting, where and how often it saves or
# evaluates, data-loader plumbing. Every other flag is part of a run's identity (a new flag is, until listed here).
HF_NOT_IDENTITY = frozenset({
    "output_dir", "logging_dir", "logging_strategy", "logging_first_step", "logging_steps", "logging_nan_inf_filter",
    "log_on_each_node", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps", "eval_delay",
    "eval_on_start", "per_device_eval_batch_size", "eval_do_concat_batches", "eval_use_gather_object",
    "eval_accumulation_steps", "batch_eval_metrics", "prediction_loss_only", "include_num_input_tokens_seen",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node", "enable_jit_checkpoint",
    "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
    "hub_revision", "resume_from_checkpoint", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "skip_memory_metrics", "local_rank", "ddp_timeout", "debug", "do_train", "do_eval", "do_predict",
    "torch_empty_cache_steps", "restore_callback_states_from_checkpoint", "remove_unused_columns",
})

class Parser(cli.Parser):
    """The parser of run.py's flags; its help ends with every ZO method's default LR / ε per mode and their sources."""

    def __init__(self):
        super().__init__([cls for _, cls in GROUPS], usage=USAGE, description=DESCRIPTION,
                         appendix=zo_methods.defaults_table)


# --- the parsed configuration ------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    task: TaskArguments
    model: ModelArguments
    evaluation: EvalArguments
    train: TrainArguments
    peft: PeftArguments
    zo: ZOArguments
    hf: HFArguments
    given: frozenset = frozenset()     # flag names on the command line (after legacy spellings were rewritten)
    argv: tuple = ()                   # the command line as given, for the resume command
    fsdp: tuple = ()                   # the --fsdp options as typed (Hugging Face folds them into fsdp_config)

    @property
    def training(self) -> bool:
        return self.train.trainer != "none"

    @property
    def mode(self) -> str:
        """What trains: ft (everything), lora, prefix, head, probe (linear probing), or icl (nothing)."""
        if not self.training:
            return "icl"
        return ("lora" if self.peft.lora else "prefix" if self.peft.prefix_tuning else "head" if self.train.head_tuning
                else "probe" if self.train.linear_probing else "ft")

    def fields(self, include_hf: bool = True):
        """(group name, field name, value, counts for identity) of every flag."""
        for name, cls in GROUPS:
            if name == "hf" and not include_hf:
                continue
            group = getattr(self, name)
            for f in dataclasses.fields(cls):
                if not f.init:
                    continue
                suite = f.metadata.get("suite")
                counts = suite["identity"] if suite is not None else f.name not in HF_NOT_IDENTITY
                if counts == "unless_default":   # a flag added later: runs without it keep the run ids they had
                    counts = getattr(group, f.name) != f.default
                yield name, f.name, getattr(group, f.name), counts

    def as_dict(self) -> dict:
        """Every flag's value, JSON-safe (recorded in result files)."""
        return {f: _jsonable(v) for _, f, v, _ in self.fields()}

    def identity(self) -> dict:
        """The flags that define what the run computes, and the number of processes (each trains on its share of
        every batch: resumed with another number, a run would continue as another run)."""
        return {f: _jsonable(v) for _, f, v, counts in self.fields() if counts} | {
            "world_size": parallel.launched_world_size()}

    def run_id(self) -> str:
        return identity_hash(self.identity())


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# --- parsing -----------------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> RunConfig:
    """The run's configuration; UsageError lists every problem with the command line."""
    problems: list[str] = []
    parser = Parser()
    options = parser._option_string_actions  # argparse's table of option strings -> actions
    argv = list(argv)
    normalised = normalise(argv, options, problems)
    screened, given = screen(normalised, options, problems)
    namespace, remaining = parser.parse_known_args(screened)
    if remaining:  # screen() should have caught these; never drop an argument silently
        problems.append(f"Unexpected arguments {remaining}.")
    values = vars(namespace)
    out_of_range = check_fields(values, given)
    problems += out_of_range.values()
    # A refused value takes no part in the cross-flag rules: they see the flag's default (so that none of them fails
    # on the value, or speaks of a value nobody typed), and what they say of the flag is left out (its problem is
    # reported once, for its value). The cross-flag rules still run, so one try shows every problem.
    unparsed = {options[name].dest for name in _flag_names(normalised) if name in options} - given  # screen() refused
    refused = set(out_of_range) | unparsed
    defaults = _defaults()
    for name in out_of_range:
        values[name] = defaults[name]
    if parallel.launched_world_size() > 1 and not torch.cuda.is_available():
        values["use_cpu"] = True  # several CPU processes: gloo and DistributedDataParallel's CPU path
    fsdp = _fsdp_options(values.get("fsdp"))
    fsdp_refused = fsdp_launch_problems(fsdp)
    if fsdp_refused:  # Hugging Face would fail first, setting up a process group for it, with a less useful message
        problems += fsdp_refused
        values["fsdp"] = ""
        refused.add("fsdp")
    else:  # transformers takes fsdp=True and the options in fsdp_config (--fsdp as a string is deprecated there)
        values["fsdp"] = True if fsdp else None
        if fsdp and "fsdp_config" not in given:  # a given --fsdp_config is refused by fsdp_problems
            values["fsdp_config"] = _fsdp_config(fsdp)
    instances = {}
    for name, cls in GROUPS:
        inputs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}
        try:
            instances[name] = cls(**inputs)
        except ValueError as error:  # TrainingArguments' own cross-flag rules
            problems.append(str(error).strip())
    if len(instances) < len(GROUPS):  # no configuration to apply the cross-flag rules to
        raise UsageError(_once(problems))
    config = RunConfig(**instances, given=frozenset(given), argv=tuple(argv), fsdp=fsdp)
    resolve_task_defaults(config)
    problems += [p for p in check(config) if not _names_any(p, refused)]
    if problems:
        raise UsageError(_once(problems))
    return config


def _flag_names(argv: list[str]) -> list[str]:
    """The flags of a command line, without their '=value'."""
    return [token.partition("=")[0] for token in argv if token.startswith("--")]


def _defaults() -> dict:
    """Every flag's default value."""
    found = {}
    for _, cls in GROUPS:
        for f in dataclasses.fields(cls):
            if f.init:
                found[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return found


def _names_any(problem: str, names: set[str]) -> bool:
    """Whether a problem's text names one of these flags (--name, or --no_name for a boolean)."""
    return any(re.search(rf"--(no_)?{re.escape(name)}(?!\w)", problem) for name in names)


def _once(problems: list[str]) -> list[str]:
    """Each problem once, in the order found (two checks may find the same one)."""
    return list(dict.fromkeys(problems))


def check_fields(values: dict, given: set[str]) -> dict[str, str]:
    """Ranges and choices of every flag that declares them: {flag name: its problem} for the values refused."""
    problems = {}
    for name, cls in GROUPS:
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in values:
                continue
            value = values[f.name]
            suite = f.metadata.get("suite")
            if suite is not None:
                low, high, above, choices = suite["low"], suite["high"], suite["above"], suite["choices"]
            elif f.name in HF_RANGES:
                bound, high, exclusive = HF_RANGES[f.name]
                low, above, choices = (None, bound, None) if exclusive else (bound, None, None)
            else:
                continue
            if value is None:
                continue
            if choices is not None and value not in choices:
                same = [c for c in choices if str(c).lower() == str(value).lower()]
                hint = f" Did you mean {same[0]!r}? (names are case-sensitive)" if same else ""
                problems[f.name] = (f"--{f.name} {value!r} is not available.{hint} Choose one of "
                                    f"{', '.join(map(str, choices))}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    not math.isfinite(value) or (low is not None and value < low) or
                    (above is not None and value <= above) or (high is not None and value > high)):
                problems[f.name] = f"--{f.name} {value}: must be {range_text(low, high, above)}."
    max_steps = values.get("max_steps")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        problems["max_steps"] = (f"--max_steps {max_steps}: must be >= 1 (or -1, the default, to train "
                                 f"--num_train_epochs).")
    return problems


def resolve_task_defaults(config: RunConfig) -> None:
    """Per-task defaults from the task table: the training objective, where the flag was not given."""
    if config.train.train_as_classification is None:
        spec = tasks.TASKS.get(config.task.task_name)
        wanted = bool(spec and spec.train_as_classification and config.training)
        # the task's default yields to modes that cannot use it; an explicit --train_as_classification does not
        config.train.train_as_classification = (wanted and config.train.only_train_option
                                                and not config.train.linear_probing)


def _lookup(config: RunConfig, path: str):
    group, name = path.split(".")
    return getattr(getattr(config, group), name)


def check(config: RunConfig) -> list[str]:
    """Every cross-flag rule, with the value and the fix."""
    problems = []
    task, model, train, peft, zo_args, hf = (config.task, config.model, config.train, config.peft, config.zo,
                                             config.hf)
    spec = tasks.TASKS.get(task.task_name)  # None: already reported as an unavailable choice
    for group, name, _, _ in config.fields(include_hf=False):
        condition = getattr(config, group).__dataclass_fields__[name].metadata["suite"]["only_with"]
        if name in config.given and condition and _lookup(config, condition[0]) not in condition[1]:
            problems.append(f"--{name} only applies with {condition_text(*condition)}; drop it or add that "
                            f"setting.")
    if not config.training and task.num_dev is not None:
        problems.append(f"--num_dev {task.num_dev} only applies to training; with --trainer none drop --num_dev (the "
                        f"dev set is carved from the training draw).")
    if spec is not None and spec.generation and (config.evaluation.sfc or config.evaluation.icl_sfc):
        problems.append(f"--sfc/--icl_sfc calibrate classification scores; task {spec.name} is a generation task. "
                        f"Drop the flag.")
    if model.load_float16 and model.load_bfloat16:
        problems.append("--load_float16 and --load_bfloat16 both given; choose one.")
    if not config.training:
        return problems
    if task.train_set_seed is None and task.num_train_sets is None:
        problems.append(f"--trainer {train.trainer} needs --train_set_seed S (or --num_train_sets N) to draw the "
                        f"training set.")
    if task.num_train <= 0:
        problems.append(f"--trainer {train.trainer} needs --num_train > 0 (got {task.num_train}).")
    if model.load_int8:
        problems.append("--load_int8 is for inference only; drop it to train (or use --trainer none).")
    modes = [m for m, on in (("--lora", peft.lora), ("--prefix_tuning", peft.prefix_tuning),
                             ("--head_tuning", train.head_tuning), ("--linear_probing", train.linear_probing)) if on]
    if len(modes) > 1:
        problems.append(f"{' and '.join(modes)} given; choose one parameter-efficient mode.")
    if train.linear_probing and (train.non_diff or not train.only_train_option):
        problems.append("--linear_probing fits a head on frozen features of the option tokens; it cannot be combined "
                        "with --non_diff/--no_only_train_option.")
    if train.linear_probing and train.train_as_classification:
        problems.append("--linear_probing fits a head on the option tokens; drop --train_as_classification.")
    if train.train_as_classification and not train.only_train_option:
        problems.append("--train_as_classification scores the option tokens; it cannot be combined with "
                        "--no_only_train_option.")
    if peft.prefix_tuning and peft.prefix_reparam and peft.prefix_init_by_real_act:
        problems.append("--prefix_reparam (MLP reparameterisation) cannot start from real activations; also pass "
                        "--no_prefix_init_by_real_act.")
    if model.load_float16 and hf.fp16 and train.trainer == "regular":
        problems.append("--load_float16 with --fp16 AMP cannot train (AMP cannot unscale fp16 gradients): load fp32 "
                        "weights with --fp16, or use --bf16 / --load_bfloat16.")
    if hf.load_best_model_at_end and task.num_dev is None:
        problems.append("--load_best_model_at_end selects checkpoints on the dev set; pass --num_dev N (the test "
                        "subset must never drive checkpoint selection).")
    if spec is not None and train.non_diff and train.train_as_classification and spec.generation:
        problems.append("--non_diff on a generation task scores generations; drop --train_as_classification.")
    if train.trainer == "zo":
        cls = zo_args.known_class()
        if cls and hf.max_steps > 0:
            try:   # what the method builds from its flags and the run's length (ZO-AdaMU's schedule)
                zo_args.optimizer_kwargs(hf.max_steps)
            except ValueError as error:
                problems.append(str(error))
        if zo_args.zo_stochastic_rounding:
            refused = cls and cls.stochastic_rounding_refused()
            if refused:
                problems.append(f"--zo_stochastic_rounding with --zo_optim {zo_args.zo_optim}: {refused}.")
            if not (model.load_float16 or model.load_bfloat16):
                problems.append("--zo_stochastic_rounding rounds updates of 16-bit weights; without --load_float16 or "
                                "--load_bfloat16 the weights are float32, which it leaves alone: drop it or load "
                                "16-bit weights.")
        if zo_args.zo_carry_perturbation and zo_args.zo_keep_direction:
            problems.append("--zo_carry_perturbation and --zo_keep_direction do not combine (a kept direction "
                            "already costs one noise sweep per step); drop one of them.")
        problems += direction_problems(config) + probe_problems(config) + offload_problems(config)
        if hf.deepspeed:
            problems.append("--deepspeed wraps the optimizer step in DeepSpeed's engine, which a ZO step does not "
                            "use; shard the weights with --fsdp full_shard instead (ZO sweeps each rank's shard).")
    problems += fsdp_problems(config)
    return problems


def probe_problems(config: RunConfig) -> list[str]:
    """--zo_probe forward / onepass: what presumes probes that write the weights, and what couples a doubled batch."""
    zo_args, mode = config.zo, config.zo.zo_probe
    if mode == "inplace":
        return []
    problems = []
    if "zo_exact_restore" in config.given:
        problems.append(f"--zo_exact_restore {zo_args.zo_exact_restore} with --zo_probe {mode}: forward-time probes "
                        "never write the weights, so there is nothing to restore; drop --zo_exact_restore.")
    for name, why in (("zo_carry_perturbation", "rests the weights at the next step's θ+εu"),
                      ("zo_keep_direction", "keeps the noise for the in-place sweeps")):
        if getattr(zo_args, name):
            problems.append(f"--{name} {why}, which --zo_probe {mode} never writes; drop --{name} or use --zo_probe "
                            "inplace.")
    if zo_args.zo_optim == "zo_sgd_cons":
        problems.append(f"--zo_optim zo_sgd_cons applies candidate updates to the weights and rejects them from a "
                        f"stash; --zo_probe {mode} keeps no stash: use --zo_probe inplace.")
    if config.fsdp:
        problems.append(f"--zo_probe {mode} swaps each module's parameters for perturbed temporaries, which FSDP2's "
                        "sharded parameters do not allow; drop --fsdp or use --zo_probe inplace.")
    if mode == "onepass" and config.train.non_diff:
        problems.append("--zo_probe onepass doubles the batch, but --non_diff generates (the batch's rows stop "
                        "together and every token regenerates the probe); use --zo_probe forward.")
    return problems


def offload_problems(config: RunConfig) -> list[str]:
    """--zo_offload cpu (zo.offload): one process, forward-time probes, a method whose update can wait for each block."""
    zo_args = config.zo
    if zo_args.zo_offload == "none":
        return []
    problems = []
    if zo_args.zo_probe == "inplace":
        problems.append("--zo_offload cpu streams each block once per forward, but --zo_probe inplace writes θ±εu into "
                        "every weight three times a step (every block at once); add --zo_probe onepass (one pass "
                        "per step) or forward.")
    cls = zo_args.known_class()
    refused = cls and zo.offload.refusal(cls)
    if refused:
        problems.append(f"--zo_offload cpu applies each step's element-wise update to a block when it next arrives; "
                        f"--zo_optim {zo_args.zo_optim}: {refused}. Use one of "
                        f"{', '.join(n for n, c in zo_methods.OPTIMIZERS.items() if not zo.offload.refusal(c))}, or "
                        "drop --zo_offload.")
    if config.fsdp:
        problems.append("--zo_offload cpu streams whole blocks to one GPU; --fsdp shards every tensor over the ranks "
                        "(its offload option keeps the shards in host memory): choose one.")
    world = parallel.launched_world_size()
    if world > 1:
        problems.append(f"--zo_offload cpu streams to one GPU and this launch has {world} processes; start one "
                        "process (python run.py ...), or shard with --fsdp full_shard offload instead.")
    return problems


def direction_problems(config: RunConfig) -> list[str]:
    """--zo_num_directions within the optimizer's bounds; --zo_parallel directions splits them evenly over ranks."""
    zo_args = config.zo
    cls = zo_args.known_class()
    if cls is None:
        return []  # reported as an unavailable choice
    q = zo_args.num_directions()
    problems = []
    if q < cls.min_directions:
        problems.append(f"--zo_num_directions {q}: {zo_args.zo_optim} needs at least {cls.min_directions}.")
    (limit, why), several = cls.direction_bound(), ", ".join(zo_methods.taking_several_directions())
    if limit is not None and q > limit:
        problems.append(f"--zo_num_directions {q}: {zo_args.zo_optim} probes {limit} direction a step ({why}); drop "
                        f"it, or use a method that averages several ({several}).")
    if zo_args.zo_parallel == "directions":
        world = parallel.launched_world_size()
        if q % world:
            low, high = world * max(1, q // world), world * (q // world + 1)
            problems.append(f"--zo_parallel directions: --zo_num_directions {q} does not split over {world} "
                            f"processes; use a multiple of {world} (e.g. {low} or {high}).")
        if config.fsdp:
            problems.append("--zo_parallel directions perturbs a different direction on every rank, so each needs "
                            "the whole model; drop --fsdp (or keep it with --zo_parallel data).")
    return problems


FSDP_OPTIONS = ("full_shard", "auto_wrap", "offload")


def _fsdp_options(value) -> tuple[str, ...]:
    """--fsdp as typed: "full_shard auto_wrap", or a boolean (true: full_shard)."""
    if value in (None, "", False):
        return ()
    if value is True or str(value).lower() in ("true", "1", "yes"):
        return ("full_shard",)
    if str(value).lower() in ("false", "0", "no"):
        return ()
    return tuple(str(value).split())


def _fsdp_config(options: tuple[str, ...]) -> dict:
    """The fsdp_config entries of --fsdp's options, as transformers translated its deprecated string form."""
    config = {}
    if "full_shard" in options:
        config["reshard_after_forward"] = True
    if "offload" in options:
        config["cpu_offload"] = True
    return config  # auto_wrap: FSDP2 wraps every layer anyway


def fsdp_options(config: RunConfig) -> set[str]:
    return set(config.fsdp)


def fsdp_launch_problems(options: tuple[str, ...]) -> list[str]:
    """--fsdp options this suite cannot serve, and --fsdp in a single process."""
    if not options:
        return []
    problems = []
    unsupported = sorted(set(options) - set(FSDP_OPTIONS))
    if unsupported:
        problems.append(f"--fsdp {' '.join(unsupported)} is not available: weights are sharded at rest with FSDP2 "
                        f"(every rank holds a dimension-0 shard of every tensor). Use --fsdp full_shard (add offload "
                        f"to keep the shards in CPU memory).")
    if parallel.launched_world_size() < 2:
        problems.append("--fsdp shards the model over the processes of a launch, and this is one process; start "
                        "several: torchrun --nproc_per_node N run.py ... (finetune_fsdp.sh does).")
    return problems


def fsdp_problems(config: RunConfig) -> list[str]:
    """--fsdp shards the weights with FSDP2 (torch's fully_shard, dimension 0) through transformers' own loader
    (`DistributedConfig`), on CUDA (NCCL) and on CPUs (gloo) alike; what that cannot serve is refused."""
    hf = config.hf
    if not config.fsdp:
        return []
    problems = []
    if "fsdp_config" in config.given:
        problems.append("--fsdp_config is not used: the layers are wrapped by the model's own FSDP plan in "
                        "transformers; drop --fsdp_config.")
    if hf.save_strategy != "no" and not hf.save_only_model:
        problems.append("--fsdp: transformers checkpoints a model sharded at load time without its optimizer state, "
                        "so such a run cannot resume; pass --save_only_model (checkpoints of the weights, for "
                        "--load_best_model_at_end) or --save_strategy no.")
    return problems
