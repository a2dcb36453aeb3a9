"""Command-line entry point: zero-shot / in-context-learning evaluation and fine-tuning of causal LMs.

    python run.py --task_name SST2 --num_train 4 --num_eval 100            # 4-shot ICL on the embedded model
    python run.py --help                                                   # every flag, HF TrainingArguments too

Every Hugging Face `TrainingArguments` flag is accepted next to the suite's own flags (`SuiteArguments`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments, set_seed

logger = logging.getLogger("run")


@dataclass
class SuiteArguments(TrainingArguments):
    # --- task and data ---
    task_name: str = field(default="SST2", metadata={"help": "SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, "
                                                              "SQuAD or DROP (case-sensitive)."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with <task>/<split>.jsonl[.gz] in Hugging Face field layout (default: $ZO_DATA_DIR; unset: "
                "the hub, then the small bundled sample)."})
    hub_dataset: str | None = field(default=None, metadata={
        "help": "Override the task's hub repository: 'path' or 'path:config'."})
    num_train: int = field(default=0, metadata={"help": "ICL: demonstrations per prompt. Training: training examples."})
    num_dev: int | None = field(default=None, metadata={"help": "Dev examples, carved from the tail of the train draw "
                                                                 "(training only)."})
    num_eval: int | None = field(default=None, metadata={"help": "Test examples sampled from the validation split "
                                                                  "(default: all)."})
    num_train_sets: int | None = field(default=None, metadata={"help": "Number of train/demo sets, seeds 0..N-1."})
    train_set_seed: int | None = field(default=None, metadata={"help": "One train/demo set drawn with this seed "
                                                                        "(takes precedence over --num_train_sets)."})
    result_file: str | None = field(default=None, metadata={"help": "Result JSON path (default: an automatic name "
                                                                     "under result/)."})
    # --- model ---
    model_name: str = field(default="smollm2-135m", metadata={
        "help": "Hugging Face hub id or local folder; 'smollm2-135m' is the embedded offline default."})
    load_float16: bool = field(default=False, metadata={"help": "Load the weights in float16."})
    load_bfloat16: bool = field(default=False, metadata={"help": "Load the weights in bfloat16."})
    load_int8: bool = field(default=False, metadata={"help": "Load 8-bit weights (bitsandbytes; inference only)."})
    max_length: int = field(default=2048, metadata={"help": "Maximum tokens per sequence; prompts are truncated "
                                                             "from the left."})
    no_auto_device: bool = field(default=False, metadata={"help": "On CUDA, do not spread the model with "
                                                                   "device_map='auto' (required for FSDP)."})
    untie_emb: bool = field(default=False, metadata={"help": "Untie the input and output embeddings."})
    opt_bos_fix: bool = field(default=True, metadata={
        "help": "For OPT models (config.model_type == 'opt') start prompts with id 0 as the MeZO papers did; "
                "--no_opt_bos_fix keeps OPT's own BOS."})
    # --- evaluation ---
    sfc: bool = field(default=False, metadata={"help": "Surface-form-competition calibration (prompt without demos)."})
    icl_sfc: bool = field(default=False, metadata={"help": "SFC calibration whose prompt keeps the demonstrations."})
    sampling: bool = field(default=False, metadata={"help": "Generation: sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Generation temperature (with --sampling)."})
    num_beams: int = field(default=1, metadata={"help": "Generation beams."})
    top_k: int | None = field(default=None, metadata={"help": "Generation top-k (with --sampling)."})
    top_p: float = field(default=0.95, metadata={"help": "Generation top-p (with --sampling)."})
    max_new_tokens: int = field(default=50, metadata={"help": "Generation budget, also reserved out of --max_length."})
    eos_token: str = field(default="\n", metadata={"help": "Extra stop text for generation (its last token)."})
    verbose: bool = field(default=False, metadata={"help": "Log prompt, candidates and scores of every example."})
    no_eval: bool = field(default=False, metadata={"help": "Skip the final evaluation and the result file."})
    tag: str = field(default="", metadata={"help": "Appended to the result file name."})
    # --- training (shared by the regular and ZO trainers) ---
    trainer: str = field(default="none", metadata={
        "help": "none: zero-shot/ICL evaluation; regular: first-order HF Trainer; zo: zeroth-order (MeZO/ZO-AdaMU)."})
    only_train_option: bool = field(default=True, metadata={"help": "LM loss on the option tokens only."})
    train_as_classification: bool = field(default=False, metadata={
        "help": "Cross-entropy over the candidates' length-normalised option log-likelihoods."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh instead of resuming from the last checkpoint-* in --output_dir."})
    save_model: bool = field(default=False, metadata={"help": "Save the trained model to --output_dir."})
    save_on_interrupt: bool = field(default=False, metadata={"help": "On SIGUSR1, checkpoint and stop."})
    non_diff: bool = field(default=False, metadata={"help": "Non-differentiable objective (ZO only)."})
    linear_probing: bool = field(default=False, metadata={"help": "Fit a logistic-regression head on frozen "
                                                                   "features."})
    lp_early_stopping: bool = field(default=False, metadata={"help": "Linear probing: tol 0.01, max_iter 1000."})
    head_tuning: bool = field(default=False, metadata={"help": "Train only the output head."})
    # --- ZO ---
    zo_eps: float = field(default=1e-3, metadata={"help": "ZO perturbation scale epsilon."})
    zo_optim: str = field(default="mezo", metadata={"help": "ZO optimizer: mezo (ZO-SGD) or zo_adamu."})
    zo_direction: str = field(default="gaussian", metadata={"help": "Perturbation distribution: gaussian or "
                                                                     "rademacher."})
    zo_t1: int | None = field(default=None, metadata={"help": "ZO-AdaMU: end of the warm-up (default 0.0512 x "
                                                               "max_steps, i.e. 1024 at 20k steps)."})
    zo_t2: int | None = field(default=None, metadata={"help": "ZO-AdaMU: end of the annealing (default 0.8 x "
                                                               "max_steps)."})
    zo_t3: int | None = field(default=None, metadata={"help": "ZO-AdaMU: schedule horizon (default max_steps)."})
    zo_phi_alpha: float = field(default=1.0, metadata={"help": "ZO-AdaMU: annealing rate of alpha."})
    zo_phi_beta1: float = field(default=0.1, metadata={"help": "ZO-AdaMU: annealing rate of beta1."})
    zo_phi_beta2: float = field(default=1.5, metadata={"help": "ZO-AdaMU: annealing rate of beta2."})
    zo_alpha_floor: float | None = field(default=None, metadata={
        "help": "ZO-AdaMU: keep alpha >= this after T2 (the paper text's alpha = 0.5)."})
    zo_unsigned_momentum: bool = field(default=False, metadata={
        "help": "ZO-AdaMU: store m = u as in the paper's Algorithm 1 instead of the released code's sign(g) u."})
    zo_exact_restore: str = field(default="auto", metadata={
        "help": "Keep a copy of the weights during a step so probes restore them exactly: auto (16-bit weights only, "
                "where rounding drift is large), always (fp32 too; one parameter-sized buffer) or never (MeZO's "
                "memory; fp32 drift stays ~1e-7)."})
    zo_keep_direction: bool = field(default=False, metadata={
        "help": "Keep each step's direction in memory: one noise sweep per step instead of three, at the cost of "
                "one parameter-sized buffer (small models)."})
    zo_carry_perturbation: bool = field(default=False, metadata={
        "help": "Fuse each update with the next step's first perturbation: two weight sweeps per step instead of "
                "three on CUDA with Triton (same results elsewhere, no gain). The weights rest perturbed between "
                "steps and are restored before evaluation, saving and the end of training."})
    zo_cuda_graphs: bool = field(default=True, metadata={
        "help": "On CUDA with Triton, capture each kind of weight sweep once as a CUDA graph and replay it every "
                "step (one launch instead of one per tensor; identical results). --no_zo_cuda_graphs launches each "
                "tensor's kernel from Python."})
    zo_state_dtype: str | None = field(default=None, metadata={
        "help": "ZO-AdaMU momentum dtype: float32, bfloat16 or float16 (default: the parameter dtype)."})
    # --- PEFT ---
    prefix_tuning: bool = field(default=False, metadata={"help": "Prefix tuning."})
    num_prefix: int = field(default=5, metadata={"help": "Prefix key/value positions per layer."})
    no_reparam: bool = field(default=True, metadata={"help": "No MLP reparameterisation of the prefix."})
    prefix_init_by_real_act: bool = field(default=True, metadata={"help": "Initialise prefixes from real key/values "
                                                                           "of random tokens."})
    lora: bool = field(default=False, metadata={"help": "LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "Comma-separated module names for LoRA (default: chosen from the model type)."})
    save_merged: bool = field(default=False, metadata={"help": "With --lora --save_model: save merged full weights "
                                                                "instead of the adapter."})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = os.path.join("result", "output")
        super().__post_init__()


TRAINERS = ("none", "regular", "zo")
ZO_OPTIMIZERS = ("mezo", "zo_adamu")
STATE_DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """An invalid flag or combination; the message names the value and the fix."""


def normalise_argv(argv: list[str]) -> list[str]:
    """Accept the legacy --evaluation_strategy spelling so old grid scripts keep working."""
    out = []
    for arg in argv:
        if arg == "--evaluation_strategy":
            arg = "--eval_strategy"
        elif arg.startswith("--evaluation_strategy="):
            arg = "--eval_strategy=" + arg.split("=", 1)[1]
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> SuiteArguments:
    parser = HfArgumentParser(SuiteArguments)
    return parser.parse_args_into_dataclasses(args=normalise_argv(sys.argv[1:] if argv is None else argv))[0]


def validate(args: SuiteArguments, spec) -> None:
    if args.trainer not in TRAINERS:
        raise UsageError(f"--trainer {args.trainer!r} is not available; choose one of {', '.join(TRAINERS)}.")
    if args.trainer == "none" and args.num_dev is not None:
        raise UsageError(f"--num_dev {args.num_dev} only applies to training; with --trainer none drop --num_dev "
                         f"(the dev set is carved from the training draw).")
    if spec.generation and (args.sfc or args.icl_sfc):
        raise UsageError(f"--sfc/--icl_sfc calibrate classification scores; task {spec.name} is a generation task. "
                         f"Drop the flag.")
    if args.num_train < 0:
        raise UsageError(f"--num_train {args.num_train} must be >= 0.")
    if args.load_float16 and args.load_bfloat16:
        raise UsageError("--load_float16 and --load_bfloat16 both given; choose one.")
    if args.trainer == "none":
        return
    if args.train_set_seed is None and args.num_train_sets is None:
        raise UsageError(f"--trainer {args.trainer} needs --train_set_seed S (or --num_train_sets N) to draw the "
                         f"training set.")
    if args.num_train <= 0:
        raise UsageError(f"--trainer {args.trainer} needs --num_train > 0 (got {args.num_train}).")
    if args.load_int8:
        raise UsageError("--load_int8 is for inference only; drop it to train (or use --trainer none).")
    if args.lora and args.head_tuning:
        raise UsageError("--lora and --head_tuning both given; choose one parameter-efficient mode.")
    if args.lora and args.prefix_tuning:
        raise UsageError("--lora and --prefix_tuning both given; choose one parameter-efficient mode.")
    if args.head_tuning and args.prefix_tuning:
        raise UsageError("--head_tuning and --prefix_tuning both given; choose one parameter-efficient mode.")
    if args.linear_probing and (args.lora or args.prefix_tuning or args.head_tuning or args.non_diff
                                or not args.only_train_option):
        raise UsageError("--linear_probing fits a head on frozen features of the option tokens; it cannot be "
                         "combined with --lora/--prefix_tuning/--head_tuning/--non_diff/--no_only_train_option.")
    if args.linear_probing and args.train_as_classification:
        raise UsageError("--linear_probing fits a head on the option tokens; drop --train_as_classification "
                         "(pass --train_as_classification False).")
    if args.train_as_classification and not args.only_train_option:
        raise UsageError("--train_as_classification scores the option tokens; it cannot be combined with "
                         "--no_only_train_option.")
    if args.prefix_tuning and not args.no_reparam and args.prefix_init_by_real_act:
        raise UsageError("--no_no_reparam (MLP reparameterisation) cannot start from real activations; also pass "
                         "--no_prefix_init_by_real_act.")
    if args.load_float16 and args.fp16 and args.trainer == "regular":
        raise UsageError("--load_float16 with --fp16 AMP cannot train (AMP cannot unscale fp16 gradients): load fp32 "
                         "weights with --fp16, or use --bf16 / --load_bfloat16.")
    if args.load_best_model_at_end and args.num_dev is None:
        raise UsageError("--load_best_model_at_end selects checkpoints on the dev set; pass --num_dev N (the test "
                         "subset must never drive checkpoint selection).")
    if args.trainer == "zo":
        if args.zo_eps <= 0:
            raise UsageError(f"--zo_eps {args.zo_eps} must be > 0 (MeZO uses 1e-3 for full fine-tuning).")
        if args.zo_optim not in ZO_OPTIMIZERS:
            raise UsageError(f"--zo_optim {args.zo_optim!r} is unknown; choose one of {', '.join(ZO_OPTIMIZERS)}.")
        if args.zo_direction not in ("gaussian", "rademacher"):
            raise UsageError(f"--zo_direction {args.zo_direction!r} is unknown; choose gaussian or rademacher.")
        if args.zo_exact_restore not in ("auto", "always", "never"):
            raise UsageError(f"--zo_exact_restore {args.zo_exact_restore!r} is unknown; choose auto, always or never.")
        if args.zo_state_dtype is not None and args.zo_state_dtype not in STATE_DTYPES:
            raise UsageError(f"--zo_state_dtype {args.zo_state_dtype!r} is unknown; choose one of "
                             f"{', '.join(STATE_DTYPES)}.")
        if args.zo_optim == "zo_adamu" and args.max_steps > 0:
            import zo
            try:
                zo.AdaMUSchedule.for_max_steps(args.max_steps, **schedule_overrides(args))
            except ValueError as error:
                raise UsageError(f"ZO-AdaMU schedule: {error}. Pass --zo_t1 < --zo_t2 <= --zo_t3.") from None
        if args.zo_carry_perturbation and args.zo_keep_direction:
            raise UsageError("--zo_carry_perturbation and --zo_keep_direction do not combine (a kept direction "
                             "already costs one noise sweep per step); drop one of them.")
        if args.fsdp or args.deepspeed:
            raise UsageError("ZO training perturbs whole parameters in place; FSDP/DeepSpeed sharding is not "
                             "meaningful for it. Drop --fsdp/--deepspeed (ZO needs only inference memory).")
    elif args.non_diff:
        raise UsageError("--non_diff optimises a non-differentiable metric and needs --trainer zo.")
    if args.fsdp:
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--fsdp {args.fsdp!r} shards the model over CUDA GPUs, and this machine has none "
                             f"(torch.cuda.is_available() is False). Drop --fsdp (finetune.sh trains on one device).")
    if args.non_diff and args.train_as_classification and spec.generation:
        raise UsageError("--non_diff on a generation task scores generations; pass --train_as_classification False.")


def result_file_name(args: SuiteArguments, suffix: str) -> str:
    parts = [args.task_name, os.path.basename(args.model_name.rstrip("/"))]
    if args.sfc:
        parts.append("sfc")
    if args.icl_sfc:
        parts.append("icl_sfc")
    if args.num_eval is not None:
        parts.append(f"sampleeval{args.num_eval}")
    if args.num_train > 0:
        parts.append(f"ntrain{args.num_train}")
    if args.num_dev is not None:
        parts.append(f"ndev{args.num_dev}")
    if args.tag:
        parts.append(args.tag)
    return os.path.join("result", "-".join(parts) + f"-{suffix}.json")


def write_json_atomic(path: str, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees a half-written result."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=4, default=str)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def resolved_config(args: SuiteArguments) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    # Imports after parsing keep `--help` and flag errors fast.
    import evaluator
    import models
    import tasks

    try:
        spec = tasks.get_task_spec(args.task_name)
        validate(args, spec)
        set_seed(args.seed)
        task = tasks.load_task(args.task_name, args.data_dir, args.hub_dataset)
        _, train_sets = task.sample_train_sets(args.num_train, args.num_dev, args.num_eval,
                                               args.num_train_sets, args.train_set_seed)
        tokenizer = models.load_tokenizer(args.model_name)
        model = load_model(args)
        tokens = models.tokenizer_settings(tokenizer, model.config, opt_bos_fix=args.opt_bos_fix)
    except (UsageError, tasks.DataError, models.ModelLoadError, ValueError) as error:
        logger.error("%s", error)
        return 2

    settings = evaluator.EvalSettings(
        max_length=args.max_length, sfc=args.sfc, icl_sfc=args.icl_sfc, batch_size=args.per_device_eval_batch_size,
        verbose=args.verbose, generation=evaluator.GenerationOptions(
            max_new_tokens=args.max_new_tokens, sampling=args.sampling, temperature=args.temperature,
            num_beams=args.num_beams, top_p=args.top_p, top_k=args.top_k, max_length=args.max_length,
            eos_token=args.eos_token))
    base = {"config": resolved_config(args), "data_source": task.source}

    if args.trainer != "none":
        for set_index, train_samples in enumerate(train_sets):
            seed = args.train_set_seed if args.train_set_seed is not None else set_index
            eval_samples = task.sample_subset("validation", seed, args.num_eval)
            if set_index > 0:  # every train set starts from the pretrained weights
                model = load_model(args)
            result = train_and_evaluate(args, task, model, tokenizer, tokens, train_samples, eval_samples,
                                        settings, set_index, len(train_sets))
            if result is not None:
                metrics, records, sizes = result
                finish(args, metrics, records, base | {"train_set_seed": seed, "sizes": sizes},
                       f"trainset{set_index}")
    elif args.train_set_seed is not None or args.num_train_sets is not None:
        for set_index, train_samples in enumerate(train_sets):
            seed = args.train_set_seed if args.train_set_seed is not None else set_index
            eval_samples = task.sample_subset("validation", seed, args.num_eval)
            metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, [train_samples] * len(eval_samples),
                                                  eval_samples, settings)
            sizes = {"train": len(train_samples), "dev": 0, "eval": len(eval_samples)}
            finish(args, metrics, records, base | {"train_set_seed": seed, "sizes": sizes}, f"trainset{set_index}")
    else:
        eval_samples = task.sample_subset("validation", 0, args.num_eval)
        metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, train_sets, eval_samples, settings)
        sizes = {"train": args.num_train, "dev": 0, "eval": len(eval_samples)}
        finish(args, metrics, records, base | {"sizes": sizes}, "onetrainpereval")
    return 0


def load_model(args: SuiteArguments):
    """The pretrained model with the requested parameter-efficient mode applied and everything else frozen."""
    import models
    model = models.load_model(args.model_name, float16=args.load_float16, bfloat16=args.load_bfloat16,
                              int8=args.load_int8, untie_emb=args.untie_emb, auto_device=not args.no_auto_device)
    if args.trainer == "none":
        return model
    if args.lora:
        import lora
        targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
        model = lora.apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, target_modules=targets)
    elif args.prefix_tuning:
        import prefix
        model = prefix.apply_prefix_tuning(model, num_prefix=args.num_prefix, reparam=not args.no_reparam,
                                           init_by_real_act=args.prefix_init_by_real_act, seed=args.seed)
    elif args.head_tuning:
        import heads
        heads.enable_head_tuning(model)
    return model


def schedule_overrides(args) -> dict:
    """ZO-AdaMU schedule fields given on the command line (the rest scale with max_steps)."""
    given = dict(T1=args.zo_t1, T2=args.zo_t2, T3=args.zo_t3, phi_alpha=args.zo_phi_alpha, phi_beta1=args.zo_phi_beta1,
                 phi_beta2=args.zo_phi_beta2, alpha_floor=args.zo_alpha_floor)
    return {k: v for k, v in given.items() if v is not None}


def split_dev(args, train_samples):
    """Dev is the tail of the train draw, as in the reference."""
    if args.num_dev is None:
        return train_samples, None
    train, dev = train_samples[:len(train_samples) - args.num_dev], train_samples[len(train_samples) - args.num_dev:]
    if not train:
        raise UsageError(f"No training examples left: the split has {len(train_samples)} rows and --num_dev "
                         f"{args.num_dev} takes them all.")
    return train, dev


def build_trainer(args, task, model, tokenizer, tokens, train_samples, dev_samples, settings, output_dir: str):
    """The HF Trainer (regular or ZO) for one train set, with dev evaluation by the task metric."""
    import copy

    import trainer_zo
    import utils

    objective = utils.Objective(classification=args.train_as_classification, only_option=args.only_train_option,
                                non_diff=args.non_diff)
    build = lambda samples: utils.ListDataset(utils.build_train_records(  # noqa: E731
        task, samples, tokenizer, tokens, objective, args.max_length, args.max_new_tokens))
    training_args = copy.copy(args)
    training_args.output_dir = output_dir
    training_args.remove_unused_columns = False   # records carry option lengths the model does not take
    import torch
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    if dev_samples is None and args.eval_strategy != "no":
        logger.warning("No --num_dev: evaluation during training is turned off so the test subset never drives "
                       "checkpoint selection.")
        training_args.eval_strategy = "no"
    common = dict(model=model, args=training_args, train_dataset=build(train_samples),
                  eval_dataset=build(dev_samples) if dev_samples else None,
                  data_collator=utils.TrainCollator(tokens.pad_id), objective=objective,
                  task_eval=trainer_zo.TaskEval(task, dev_samples or [], tokenizer, tokens, settings))
    if args.trainer != "zo":
        return trainer_zo.SuiteTrainer(**common)
    training_args.max_grad_norm = 0.0   # there are no gradients to clip
    schedule = schedule_overrides(args)
    zo_config = trainer_zo.ZOConfig(
        optimizer=args.zo_optim, eps=args.zo_eps, direction=args.zo_direction, schedule=schedule,
        signed_momentum=not args.zo_unsigned_momentum, keep_direction=args.zo_keep_direction,
        carry_perturbation=args.zo_carry_perturbation, cuda_graphs=args.zo_cuda_graphs,
        exact_restore={"auto": None, "always": True, "never": False}[args.zo_exact_restore],
        state_dtype=getattr(torch, args.zo_state_dtype) if args.zo_state_dtype else None)
    return trainer_zo.ZOTrainer(zo_config=zo_config, **common)


def train_and_evaluate(args, task, model, tokenizer, tokens, train_samples, eval_samples, settings, set_index,
                       num_sets):
    """Train on one train set (dev carved from its tail), then evaluate test and dev without demonstrations."""
    from transformers.trainer_utils import get_last_checkpoint

    import utils

    train_samples, dev_samples = split_dev(args, train_samples)
    output_dir = os.path.join(args.output_dir, f"trainset{set_index}") if num_sets > 1 else args.output_dir
    if args.linear_probing:
        objective = utils.Objective(only_option=True)
        records = utils.build_train_records(task, train_samples, tokenizer, tokens, objective, args.max_length)
        fit_probe(args, model, utils.ListDataset(records), tokens, output_dir)
        return evaluate_after_training(args, task, model, tokenizer, tokens, train_samples, dev_samples,
                                       eval_samples, settings)
    trainer = build_trainer(args, task, model, tokenizer, tokens, train_samples, dev_samples, settings, output_dir)
    checkpoint = args.resume_from_checkpoint
    if checkpoint is None and os.path.isdir(output_dir) and not args.overwrite_output_dir:
        checkpoint = get_last_checkpoint(output_dir)
        if checkpoint:
            logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    if args.save_model:
        save_trained_model(args, trainer, output_dir)
    return evaluate_after_training(args, task, trainer.model, tokenizer, tokens, train_samples, dev_samples,
                                   eval_samples, settings)


def fit_probe(args, model, dataset, tokens, output_dir: str) -> None:
    """Linear probing replaces training: a logistic-regression head fitted on frozen option-token features."""
    import torch

    import heads
    import utils
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=False,
                                         collate_fn=utils.TrainCollator(tokens.pad_id))
    probe = heads.fit_linear_probe(model, loader, early_stopping=args.lp_early_stopping)
    heads.apply_linear_probe(model, probe)
    logger.info("Linear probe: C=%s over %d class tokens", probe.C, len(probe.class_token_ids))
    if args.save_model:
        os.makedirs(output_dir, exist_ok=True)
        probe.save(os.path.join(output_dir, "linear_probe.pt"))


def evaluate_after_training(args, task, model, tokenizer, tokens, train_samples, dev_samples, eval_samples,
                            settings):
    """Test metrics without demonstrations, plus dev metrics under a dev_ prefix."""
    import evaluator
    if args.no_eval:
        return None
    model.eval()
    metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, [[]] * len(eval_samples), eval_samples,
                                          settings)
    if dev_samples:
        dev_metrics, _ = evaluator.evaluate(model, tokenizer, tokens, task, [[]] * len(dev_samples), dev_samples,
                                            settings)
        metrics |= {f"dev_{k}": v for k, v in dev_metrics.items()}
    sizes = {"train": len(train_samples), "dev": len(dev_samples or []), "eval": len(eval_samples)}
    return metrics, records, sizes


def save_trained_model(args, trainer, output_dir: str) -> None:
    """Full weights for full fine-tuning; only the adapter/prefix for parameter-efficient modes."""
    model = trainer.model
    if args.lora:
        import lora
        (lora.save_merged if args.save_merged else lora.save_adapter)(model, output_dir)
    elif args.prefix_tuning:
        import prefix
        prefix.save_prefix(model, output_dir)
    else:
        trainer.save_model(output_dir)


def finish(args: SuiteArguments, metrics: dict, records: list[dict], extra: dict, suffix: str) -> None:
    logger.info("===== %s: %s =====", args.task_name, json.dumps(metrics))
    if args.no_eval or args.process_index != 0:
        return
    path = args.result_file or result_file_name(args, suffix)
    write_json_atomic(path, metrics | extra | {"predictions": records})
    logger.info("Wrote %s", path)


if __name__ == "__main__":
    sys.exit(main())
