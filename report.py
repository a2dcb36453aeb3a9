"""Tables and plots from a folder of result files: the best configuration of every method, chosen on the dev set.

    python report.py                                  # every result under result/, as a Markdown table
    python report.py result/grid --csv best.csv --plot result/grid/plots --all

Result files (run.py's, found recursively; checkpoint folders are not searched) are grouped by task, model, mode
(ft, lora, prefix, head, probe; icl without training) and optimizer. Within a group, a *configuration* is everything
that defines a run (its identity, args.py) except its seeds (--seed, --train_set_seed, --data_seed) and its --tag
(the scripts write the seed into the tag), plus the prompt version the result records ("prompt_version": results of
two versions of a task's prompts are never one configuration); the runs of one configuration are its seeds. Each
group's configuration with the highest mean of the selection metric is reported, with the test metric as mean ±
sample standard deviation over its seeds, in percent.

Selection uses a dev metric (`--select dev_accuracy`; the default `auto` is dev_ + the group's test metric), because a
configuration picked on the test set reports an optimistic test number. Selecting on a test metric is refused unless
`--allow_test_selection` is given. A configuration without the selection metric (a run without --num_dev) cannot be
chosen; a group whose only configuration lacks it is reported as it is, marked "only configuration".

Ties on the selection metric go to the configuration with more seeds, then to the lower final dev loss (the last
eval_loss its runs logged), then to the first label; the table says when a tie was broken.

Each row also shows what the selected configuration cost and how it went: the gain over zero-shot (an ICL result with
--num_train 0 for the same task and model, found in the same folders), optimizer steps, training forward passes
(steps x the method's forward passes a step; first-order rows count a forward and a backward per step), seconds per
training forward pass and peak memory (from the result's "training" record), its dev curve (mean over seeds at each
evaluation), and flags: "diverged" (a non-finite training loss, or a last logged loss above 1.5x the lowest one),
"edge: lowest LR" / "edge: highest LR" (the selected LR is an end of the group's LR grid: extend the grid), and for a
group, "moved nothing" (every configuration's test metric equals zero-shot).  Configurations that lost are listed with
the same columns by --all.

Results of different code (git commit, or a dirty checkout) are not mixed in one table: report.py refuses, naming the
commits, unless --allow_mixed_code is given, which marks each row with its code.

`--plot DIR` (needs matplotlib: `pip install matplotlib`) writes, per group, the training loss and the dev metric
against steps and against training forward passes, one line per configuration (mean over seeds; band: min-max), from
the trainer_state.json in each run's folder (the result file's run_dir), and best_test.png: the selected configuration's
test metric per method. The same logged values reach TensorBoard with `--report_to tensorboard`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metrics import VALID_METRICS

SEED_FLAGS = ("seed", "train_set_seed", "data_seed")
PROMPT_VERSION = "prompt_version"     # a result's record of its task's prompt format (templates.Template.version)
NOT_RECORDED = "not recorded"         # its value in results written before it was recorded
IGNORED_FLAGS = SEED_FLAGS + ("tag",)
SKIPPED_NAMES = {"trainer_state.json", "run_config.json", "checkpoint_complete.json", "config.json",
                 "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"}
MATPLOTLIB_MISSING = ("--plot needs matplotlib, an optional extra of this suite: install it with "
                      "`pip install matplotlib` (the table above needs nothing more). No plots were written.")


DIVERGED_RATIO = 1.5   # a last logged training loss above this multiple of the lowest one marks a divergence


class ReportError(ValueError):
    """A bad request (the message names the value and the fix); exit status 2."""


@dataclass
class Run:
    path: Path
    data: dict

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def test_metric(self) -> str | None:
        return next((m for m in VALID_METRICS if isinstance(self.data.get(m), (int, float))), None)

    @property
    def seed(self) -> str:
        """The train-set seed, or "train-set seed/trainer seed" where the two differ (mezo.sh keeps --seed 42)."""
        train_set, trainer = self.data.get("train_set_seed", self.config.get("train_set_seed")), self.config.get("seed")
        if train_set is None or trainer is None or train_set == trainer:
            return str(train_set if train_set is not None else trainer if trainer is not None else "")
        return f"{train_set}/{trainer}"

    def metric(self, name: str) -> float | None:
        value = self.data.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def code(self) -> str:
        """The code that produced the run: its git commit (10 characters), "+dirty" for a modified checkout."""
        record = self.data.get("provenance") or {}
        return str(record.get("git_commit", "not recorded"))[:10] + ("+dirty" if record.get("git_dirty") else "")

    def training(self, name: str) -> float | None:
        value = (self.data.get("training") or {}).get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass
class Configuration:
    key: tuple
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    def values(self, metric: str) -> list[float]:
        return [v for v in (r.metric(metric) for r in self.runs) if v is not None]


@dataclass
class Group:
    task: str
    model: str
    mode: str
    optimizer: str
    configurations: list[Configuration] = field(default_factory=list)
    best: Configuration | None = None
    why: str = ""          # how the best was chosen, or why none was
    tie: str = ""          # which configurations tied with the best, and what broke the tie

    @property
    def name(self) -> str:
        return f"{self.task} {self.model} {self.mode} {self.optimizer}"

    @property
    def test_metric(self) -> str:
        return next((r.test_metric for c in self.configurations for r in c.runs if r.test_metric), "accuracy")


# --- reading -------------------------------------------------------------------------------------------------------

def find_results(folders: list[Path]) -> tuple[list[Run], list[str]]:
    """Every result file under the folders, and a note for each JSON that looked like one but could not be read."""
    runs, notes = [], []
    for folder in folders:
        if not folder.exists():
            raise ReportError(f"{folder} does not exist; pass the folder that holds the result files (run.py writes "
                              f"them to result/, grid.sh to its OUT folder).")
        paths = [folder] if folder.is_file() else sorted(folder.rglob("*.json"))
        for path in paths:
            if path.name in SKIPPED_NAMES or path.name.startswith(".") or in_checkpoint(path, folder):
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                notes.append(f"skipped {path}: {error}")
                continue
            if isinstance(data, dict) and isinstance(data.get("config"), dict) and "run_id" in data:
                runs.append(Run(path, data))
    return runs, notes


def in_checkpoint(path: Path, folder: Path) -> bool:
    """Whether `path`, found under `folder`, lies in a checkpoint-N folder (runs.checkpoint_step: the suite's one
    reading of checkpoint names)."""
    import runs  # here, not at the top: `report.py --help` and `import report` stay free of torch and transformers
    return path != folder and any(runs.checkpoint_step(part) is not None
                                  for part in path.relative_to(folder).parent.parts)


def identity_flags() -> dict[str, object] | None:
    """Flags that define a run (args.py), each with the default at which it does not count (identity="changed": a
    flag added later, absent from older results) or a marker that it always counts; None where args.py cannot be
    imported (then every recorded flag counts)."""
    try:
        import dataclasses

        import args
    except ImportError:
        return None
    names = {}
    for _, cls in args.GROUPS:
        for f in dataclasses.fields(cls):
            suite = f.metadata.get("suite")
            if f.init and (suite["identity"] if suite is not None else f.name not in args.HF_NOT_IDENTITY):
                names[f.name] = f.default if suite is not None and suite["identity"] == "changed" else _ALWAYS
    return names


_ALWAYS = object()


def _counts(flags: dict | None, name: str, value) -> bool:
    """Whether a recorded flag tells configurations apart (identity_flags)."""
    if flags is None:
        return True
    return name in flags and (flags[name] is _ALWAYS or value != flags[name])


def mode_of(config: dict) -> str:
    """As args.RunConfig.mode, from a recorded configuration."""
    if config.get("trainer", "none") == "none":
        return "icl"
    for flag, mode in (("lora", "lora"), ("prefix_tuning", "prefix"), ("head_tuning", "head"),
                       ("linear_probing", "probe")):
        if config.get(flag):
            return mode
    return "ft"


def optimizer_of(config: dict) -> str:
    trainer = config.get("trainer", "none")
    if trainer == "zo":
        return config.get("zo_optim", "mezo")
    if trainer == "regular":
        return str(config.get("optim", "adamw")).replace("OptimizerNames.", "")
    return "none"


def group_runs(runs: list[Run]) -> list[Group]:
    flags = identity_flags()
    groups: dict[tuple, Group] = {}
    for run in runs:
        config = run.config
        model = Path(str(config.get("model_name", "?")).rstrip("/")).name
        gkey = (config.get("task_name", "?"), model, mode_of(config), optimizer_of(config))
        group = groups.setdefault(gkey, Group(*gkey))
        ckey = tuple(sorted([(k, json.dumps(v, sort_keys=True)) for k, v in config.items()
                             if k not in IGNORED_FLAGS and _counts(flags, k, v)]
                            # not a flag, and it changes every prompt: never one configuration across versions
                            + [(PROMPT_VERSION, json.dumps(run.data.get(PROMPT_VERSION, NOT_RECORDED)))]))
        configuration = next((c for c in group.configurations if c.key == ckey), None)
        if configuration is None:
            configuration = Configuration(ckey)
            group.configurations.append(configuration)
        configuration.runs.append(run)
    for group in groups.values():
        label_configurations(group)
    return sorted(groups.values(), key=lambda g: (g.task, g.model, g.mode, g.optimizer))


SHORT = {"learning_rate": "lr", "zo_eps": "eps", "per_device_train_batch_size": "bs", "max_steps": "steps",
         "num_train": "ntrain", "num_dev": "ndev", "num_eval": "neval"}


def _value_text(text: str) -> str:
    value = json.loads(text)
    return f"{value:g}" if isinstance(value, float) else str(value)


def label_configurations(group: Group) -> None:
    """Name each configuration by the flags that differ within its group (always its LR, and ε for ZO)."""
    keys = [dict(c.key) for c in group.configurations]
    varying = sorted({k for d in keys for k in d if len({d.get(k) for d in keys}) > 1})
    zo_runs = any(json.loads(d.get("trainer", '"none"')) == "zo" for d in keys)
    always = ["learning_rate"] + (["zo_eps"] if zo_runs else [])
    if group.mode == "icl":
        always = ["num_train"]
    shown = always + [k for k in varying if k not in always]
    for configuration, values in zip(group.configurations, keys):
        configuration.label = " ".join(f"{SHORT.get(k, k)}={_value_text(values[k])}" for k in shown if k in values)
    group.configurations.sort(key=lambda c: c.label)


# --- selection -----------------------------------------------------------------------------------------------------

def selection_metric(select: str, group: Group) -> str:
    return f"dev_{group.test_metric}" if select == "auto" else select


def check_selection(select: str, allow_test: bool, runs: list[Run]) -> None:
    if select == "auto" or select.startswith("dev_"):
        return
    test_metrics = sorted({r.test_metric for r in runs if r.test_metric})
    if allow_test:
        return
    dev = ", ".join(f"dev_{m}" for m in test_metrics) or "dev_accuracy"
    raise ReportError(f"--select {select} is not a dev metric: choosing configurations on the test set makes the "
                      f"reported test numbers optimistic. Select on a dev metric ({dev}; runs need --num_dev to "
                      f"have one), or pass --allow_test_selection to do it knowingly.")


def final_dev_loss(configuration: Configuration) -> float | None:
    """The mean over runs of the last eval_loss each logged (None where a run logged none)."""
    losses = []
    for run in configuration.runs:
        state = trainer_state(run)
        logged = [e["eval_loss"] for e in (state or {}).get("log_history", []) if isinstance(e.get("eval_loss"),
                                                                                           (int, float))]
        if not logged:
            return None
        losses.append(float(logged[-1]))
    return statistics.fmean(losses) if losses else None


def select_best(group: Group, metric: str) -> None:
    scored = [(statistics.fmean(c.values(metric)), len(c.values(metric)), c) for c in group.configurations
              if c.values(metric)]
    if scored:
        top = max(score[:2] for score in scored)   # the highest mean, then more seeds
        tied = [c for mean, n, c in scored if (mean, n) == top]
        best = tied[0]   # labels are sorted: the first label, unless the dev loss tells them apart
        if len(tied) > 1:
            losses = [final_dev_loss(c) for c in tied]
            if all(loss is not None for loss in losses):
                best = tied[losses.index(min(losses))]
        group.best = best
        group.why = f"best mean {metric} of {len(scored)} configuration{'s' * (len(scored) > 1)}"
        if len(tied) > 1:
            others = ", ".join(c.label for c in tied if c is not best)
            broken = "the lower final dev loss" if all(final_dev_loss(c) is not None for c in tied) else "label order"
            group.tie = f"tied with {others}, broken by {broken}"
            group.why += "; " + group.tie
        missing = len(group.configurations) - len(scored)
        if missing:
            group.why += f"; {missing} without {metric} not considered"
    elif len(group.configurations) == 1:
        group.best = group.configurations[0]
        group.why = f"only configuration (no {metric})"
    else:
        group.why = (f"no configuration has {metric}; {len(group.configurations)} configurations left unranked "
                     f"(train with --num_dev, or --select another metric)")


# --- what a configuration cost and how it went ---------------------------------------------------------------------

def zero_shot(groups: list[Group]) -> dict[tuple[str, str], Configuration]:
    """(task, model) -> the zero-shot configuration (an ICL result with --num_train 0), where the folders hold one."""
    found = {}
    for g in groups:
        if g.mode != "icl":
            continue
        for c in g.configurations:
            if all(int(r.config.get("num_train") or 0) == 0 for r in c.runs) and c.values(g.test_metric):
                found[(g.task, g.model)] = c
    return found


def learning_rate(configuration: Configuration) -> float | None:
    value = configuration.runs[0].config.get("learning_rate")
    return float(value) if isinstance(value, (int, float)) else None


def diverged(configuration: Configuration) -> bool:
    """A run of the configuration logged a non-finite training loss, or ended above DIVERGED_RATIO x its lowest."""
    for run in configuration.runs:
        losses = [v for _, v in curves(run, "eval_loss").get("loss", [])]
        if losses and (not all(map(math.isfinite, losses)) or losses[-1] > DIVERGED_RATIO * min(losses)):
            return True
    return False


def skipped_steps(run: Run) -> int:
    """ZO steps skipped for a non-finite loss, as the run's log last counted them."""
    logged = [e["skipped_steps"] for e in (trainer_state(run) or {}).get("log_history", [])
              if isinstance(e.get("skipped_steps"), (int, float))]
    return int(logged[-1]) if logged else 0


def flags(group: Group, configuration: Configuration, mixed_code: bool) -> list[str]:
    marks = ["diverged"] if diverged(configuration) else []
    rates = sorted({lr for lr in map(learning_rate, group.configurations) if lr is not None})
    lr = learning_rate(configuration)
    if configuration is group.best and len(rates) > 1 and lr in (rates[0], rates[-1]):
        marks.append(f"edge: {'lowest' if lr == rates[0] else 'highest'} LR")
    skipped = [skipped_steps(r) for r in configuration.runs]
    if any(skipped):
        marks.append(f"{int(max(skipped))} steps skipped")
    if mixed_code:
        marks.append("code " + "/".join(sorted({r.code for r in configuration.runs})))
    return marks


def moved_nothing(group: Group, reference: Configuration | None) -> bool:
    """Every configuration's test metric equals zero-shot's (to 0.05 points): the method changed no prediction."""
    if reference is None or group.mode == "icl":
        return False
    base = statistics.fmean(reference.values(group.test_metric))
    means = [statistics.fmean(c.values(group.test_metric)) for c in group.configurations
             if c.values(group.test_metric)]
    return bool(means) and all(abs(m - base) < 5e-4 for m in means)


def cost(configuration: Configuration) -> dict[str, str]:
    """Steps, training forward passes, seconds per forward pass and peak memory of a configuration (mean over its
    runs; memory: the largest)."""
    config = configuration.runs[0].config
    steps = [r.training("global_step") for r in configuration.runs]
    steps = [s for s in steps if s is not None] or [float(config.get("max_steps") or 0)]
    step = statistics.fmean(steps)
    per_step = forwards_per_step(config)
    forwards = f"{step * per_step:.0f}" + (" (+ as many backward)" if config.get("trainer") == "regular" else "")
    per_forward = [v for v in (r.training("seconds_per_forward") for r in configuration.runs) if v is not None]
    peak = [v for v in (r.training("peak_rss_mb") for r in configuration.runs) if v is not None]
    cuda = [v for v in (r.training("peak_cuda_allocated_mb") for r in configuration.runs) if v is not None]
    memory = (f"{max(peak):.0f}" if peak else "–") + (f" (CUDA {max(cuda):.0f})" if cuda else "")
    return {"steps": f"{step:.0f}", "forwards": forwards,
            "per_forward": f"{statistics.fmean(per_forward):.2f}" if per_forward else "–", "memory": memory}


def dev_curve(configuration: Configuration, metric: str) -> str:
    """The dev metric at each evaluation during training, mean over the runs, in %."""
    key = "eval_" + metric[len("dev_"):] if metric.startswith("dev_") else "eval_" + metric
    curve = _mean_curve([curves(r, key).get("dev", []) for r in configuration.runs])
    return ", ".join(f"{100 * v:.1f}" for v in curve[1]) if curve else "–"


def gain(group: Group, configuration: Configuration, reference: Configuration | None) -> str:
    if reference is None or group.mode == "icl" or not configuration.values(group.test_metric):
        return "–"
    delta = statistics.fmean(configuration.values(group.test_metric)) - statistics.fmean(
        reference.values(group.test_metric))
    return f"{100 * delta:+.1f}"


# --- output --------------------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def percent(values: list[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def seeds_text(configuration: Configuration) -> str:
    seeds = sorted(r.seed for r in configuration.runs)
    return f"{len(seeds)} (seeds {', '.join(seeds)})" if seeds and all(seeds) else str(len(seeds))


COST_HEADER = "Δ zero-shot | steps | forward passes | s / forward | peak RSS MB | dev curve | flags |"


def _cost_cells(g: Group, c: Configuration, metric: str, reference, mixed_code: bool, group_flags=()) -> str:
    spent = cost(c)
    marks = flags(g, c, mixed_code) + list(group_flags)
    return (f" {gain(g, c, reference)} | {spent['steps']} | {spent['forwards']} | {spent['per_forward']} | "
            f"{spent['memory']} | {dev_curve(c, metric)} | {'; '.join(marks)} |")


def markdown_table(groups: list[Group], select: str, mixed_code: bool = False) -> str:
    references = zero_shot(groups)
    lines = ["| task | model | mode | optimizer | metric | best configuration | selected by | dev | test | runs | "
             "configurations | " + COST_HEADER, "|" + "---|" * 18]
    for g in groups:
        metric = selection_metric(select, g)
        c = g.best
        if c is None:
            runs = sum(len(x.runs) for x in g.configurations)
            lines.append(f"| {g.task} | {g.model} | {g.mode} | {g.optimizer} | {g.test_metric} | – | {g.why} | – | "
                         f"– | {runs} | {len(g.configurations)} |" + " – |" * 7)
            continue
        reference = references.get((g.task, g.model))
        selected_by = (metric + (f"; {g.tie}" if g.tie else "")) if g.why.startswith("best") else g.why
        lines.append(f"| {g.task} | {g.model} | {g.mode} | {g.optimizer} | {g.test_metric} | {c.label or '–'} | "
                     f"{selected_by} | {percent(c.values(metric))} | {percent(c.values(g.test_metric))} | "
                     f"{seeds_text(c)} | {len(g.configurations)} |" + _cost_cells(
                         g, c, metric, reference, mixed_code, ["moved nothing"] if moved_nothing(g, reference) else []))
    return "\n".join(lines)


def all_configurations_table(groups: list[Group], select: str, mixed_code: bool = False) -> str:
    references = zero_shot(groups)
    lines = ["| task | model | mode | optimizer | configuration | dev | test | runs | selected | " + COST_HEADER,
             "|" + "---|" * 16]
    for g in groups:
        metric = selection_metric(select, g)
        for c in g.configurations:
            lines.append(f"| {g.task} | {g.model} | {g.mode} | {g.optimizer} | {c.label or '–'} | "
                         f"{percent(c.values(metric))} | {percent(c.values(g.test_metric))} | {seeds_text(c)} | "
                         f"{'yes' if c is g.best else ''} |" + _cost_cells(g, c, metric, references.get(
                             (g.task, g.model)), mixed_code))
    return "\n".join(lines)


def code_problem(runs: list[Run]) -> str | None:
    """Why the runs cannot share one table: they come from different code."""
    codes = {}
    for run in runs:
        codes.setdefault(run.code, []).append(run.path.name)
    if len(codes) < 2:
        return None
    listed = "; ".join(f"{code}: {len(names)} run{'s' * (len(names) > 1)} (e.g. {names[0]})"
                       for code, names in sorted(codes.items()))
    return (f"the results come from different code ({listed}): a table mixing them compares code as well as methods. "
            f"Rerun the odd ones from one checkout (a pinned worktree: git worktree add DIR COMMIT), report the "
            f"folders apart, or pass --allow_mixed_code to mark each row with its code.")


def provenance_summary(runs: list[Run]) -> str:
    """Which code versions and devices produced the runs (one line each), so a mixed table is visible as such."""
    commits, devices = {}, {}
    for run in runs:
        record = run.data.get("provenance") or {}
        commit = str(record.get("git_commit", "not recorded"))[:10] + (" (dirty)" if record.get("git_dirty") else "")
        commits[commit] = commits.get(commit, 0) + 1
        device = str(record.get("device", "not recorded"))
        devices[device] = devices.get(device, 0) + 1
    return f"Code: {_counted(commits)}. Devices: {_counted(devices)}."


def _counted(counts: dict[str, int]) -> str:
    return "; ".join(f"{k} ({v} run{'s' * (v > 1)})" for k, v in sorted(counts.items()))


def write_csv(path: Path, groups: list[Group], select: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    references = zero_shot(groups)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["task", "model", "mode", "optimizer", "configuration", "selected_by", "select_metric",
                         "select_mean", "select_std", "test_metric", "test_mean", "test_std", "runs", "seeds",
                         "configurations", "wall_time_s_mean", "zero_shot_gain", "steps", "forward_passes",
                         "seconds_per_forward", "peak_rss_mb", "dev_curve", "flags", "result_files"])
        for g in groups:
            c = g.best
            metric = selection_metric(select, g)
            if c is None:
                writer.writerow([g.task, g.model, g.mode, g.optimizer, "", g.why, metric, "", "", g.test_metric, "",
                                 "", sum(len(x.runs) for x in g.configurations), "", len(g.configurations), "", "",
                                 "", "", "", "", "", "", ""])
                continue
            spent, reference = cost(c), references.get((g.task, g.model))
            dev_mean, dev_std = mean_std(c.values(metric))
            test_mean, test_std = mean_std(c.values(g.test_metric))
            walls = [r.data.get("provenance", {}).get("wall_time_s") for r in c.runs]
            walls = [w for w in walls if isinstance(w, (int, float))]
            writer.writerow([g.task, g.model, g.mode, g.optimizer, c.label, g.why, metric, _num(dev_mean),
                             _num(dev_std), g.test_metric, _num(test_mean), _num(test_std), len(c.runs),
                             " ".join(sorted(r.seed for r in c.runs)), len(g.configurations),
                             _num(statistics.fmean(walls) if walls else None), gain(g, c, reference),
                             spent["steps"], spent["forwards"], spent["per_forward"], spent["memory"],
                             dev_curve(c, metric), "; ".join(flags(g, c, False)),
                             " ".join(str(r.path) for r in c.runs)])


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# --- curves and plots ----------------------------------------------------------------------------------------------

def trainer_state(run: Run) -> dict | None:
    """The run folder's trainer_state.json (written when training ends) or its newest checkpoint's, whichever logged
    more (a rerun that only re-evaluates a finished run may leave a shorter state in the folder)."""
    run_dir = run.data.get("run_dir")
    if not run_dir:
        return None
    folder = Path(run_dir)
    if not folder.is_absolute():
        folder = run.path.parent / folder
    import runs  # as in in_checkpoint
    candidates = [folder / "trainer_state.json"] + [p / "trainer_state.json" for _, p in runs.checkpoints(folder)[:1]]
    states = []
    for candidate in candidates:
        try:
            state = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            states.append(state)
    return max(states, key=lambda s: len(s.get("log_history") or []), default=None)


def forwards_per_step(config: dict) -> int:
    """Training forward passes per optimizer step and accumulated batch: the ZO optimizer's count for its directions
    (zo_methods.forward_passes; a two-point probe takes 2 a direction), 1 for first-order training (which also runs a
    backward)."""
    accumulation = int(config.get("gradient_accumulation_steps") or 1)
    if config.get("trainer") != "zo":
        return accumulation
    from zo import registry as zo_methods
    name = config.get("zo_optim") or "mezo"
    if name not in zo_methods.OPTIMIZERS:
        raise SystemExit(f"report.py: a result names --zo_optim {name!r}, which this version does not know "
                         f"({', '.join(zo_methods.OPTIMIZERS)}); report it with the code that produced it")
    return zo_methods.forward_passes(name, config.get("zo_num_directions")) * accumulation


def curves(run: Run, dev_key: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of the training loss and the dev metric logged during training."""
    state = trainer_state(run)
    if state is None:
        return {}
    loss, dev = [], []
    for entry in state.get("log_history", []):
        step = entry.get("step")
        if step is None:
            continue
        if isinstance(entry.get("loss"), (int, float)):
            loss.append((step, float(entry["loss"])))
        if isinstance(entry.get(dev_key), (int, float)):
            dev.append((step, float(entry[dev_key])))
    return {"loss": loss, "dev": dev}


def _mean_curve(series: list[list[tuple[int, float]]]):
    """Mean, min and max over the runs at the steps every run logged."""
    series = [s for s in series if s]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(step for step, _ in s) for s in series)))
    if not steps:
        return None
    values = [[dict(s)[step] for s in series] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def import_pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers and batch jobs
    import matplotlib.pyplot as plt
    return plt


def _file_name(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in p) for p in parts) + ".png"


def plot(groups: list[Group], select: str, folder: Path) -> tuple[list[Path], list[str]]:
    """PNG files written and notes on runs without curves. ImportError without matplotlib."""
    plt = import_pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for g in groups:
        metric = selection_metric(select, g)
        dev_key = "eval_" + metric[len("dev_"):] if metric.startswith("dev_") else "eval_" + metric
        figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
        drawn = False
        for c in g.configurations:
            per_run = [curves(r, dev_key) for r in c.runs]
            missing = [r.path.name for r, cv in zip(c.runs, per_run) if not cv]
            if missing:
                notes.append(f"{g.name} {c.label}: no trainer_state.json for {', '.join(missing)} (run_dir missing "
                             f"or moved)")
            scale = forwards_per_step(c.runs[0].config)
            best = c is g.best
            for row, (kind, title) in enumerate((("loss", "training loss"), ("dev", f"dev {metric[4:] or metric}"))):
                curve = _mean_curve([cv.get(kind, []) for cv in per_run])
                if curve is None:
                    continue
                steps, mean, low, high = curve
                drawn_runs = sum(bool(cv.get(kind)) for cv in per_run)
                runs = f"n={drawn_runs}" + (f" of {len(c.runs)}" if drawn_runs < len(c.runs) else "")
                label = f"{c.label or 'run'} ({runs})" + (" selected" if best else "")
                for col, x in enumerate((steps, [s * scale for s in steps])):
                    ax = axes[row][col]
                    line, = ax.plot(x, mean, marker="o" if kind == "dev" else None, markersize=3,
                                    linewidth=2.4 if best else 1.3, label=label)
                    if len(c.runs) > 1:
                        ax.fill_between(x, low, high, alpha=0.15, color=line.get_color())
                    ax.set_ylabel(title)
                    ax.set_xlabel("optimizer step" if col == 0 else "training forward passes")
                    ax.grid(alpha=0.3)
                drawn = True
        if not drawn:
            plt.close(figure)
            notes.append(f"{g.name}: no curves to plot")
            continue
        for row, what in zip(axes, ("training loss (log it with --logging_steps N)",
                                    "dev metric (evaluate with --eval_strategy steps and --num_dev)")):
            for ax in row:
                if ax.get_lines():
                    ax.legend(fontsize=7)
                else:   # nothing logged: say so instead of an empty 0-1 frame
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", fontsize=9, transform=ax.transAxes)
        figure.suptitle(f"{g.task} · {g.model} · {g.mode} · {g.optimizer} (mean over seeds; band: min–max)")
        figure.tight_layout()
        path = folder / _file_name(g.task, g.model, g.mode, g.optimizer, "curves")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    references = zero_shot(groups)   # drawn as a line, not a bar
    chosen = [g for g in groups if g.best is not None and g.best.values(g.test_metric)
              and g.best is not references.get((g.task, g.model))]
    if chosen:
        figure, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(chosen) + 2), 4.5))
        means = [100 * statistics.fmean(g.best.values(g.test_metric)) for g in chosen]
        errors = [100 * (mean_std(g.best.values(g.test_metric))[1] or 0.0) for g in chosen]
        names = [f"{g.task}\n{g.mode} {g.optimizer}" + (f"\n{g.model}" if len({x.model for x in chosen}) > 1 else "")
                 for g in chosen]
        bars = ax.bar(range(len(chosen)), means, yerr=errors, capsize=4, color="#4c72b0")
        for bar, g, m in zip(bars, chosen, means):
            ax.annotate(f"{m:.1f}\nn={len(g.best.runs)}", (bar.get_x() + bar.get_width() / 2, m), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(range(len(chosen)), names, fontsize=8)
        ax.set_ylabel("test metric (%), mean ± std over seeds")
        for (task, model), reference in sorted(references.items()):   # the zero-shot line of each task shown
            if any((g.task, g.model) == (task, model) for g in chosen):
                level = 100 * statistics.fmean(reference.values(next(g.test_metric for g in chosen
                                                                      if (g.task, g.model) == (task, model))))
                ax.axhline(level, color="#c44e52", linestyle="--", linewidth=1.2,
                           label=f"zero-shot {task}" + (f" {model}" if len(references) > 1 else "") + f": {level:.1f}")
        if ax.get_lines():
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title("Best configuration per method\n(chosen by "
                     f"{'the dev metric' if select == 'auto' else select}; test set reported)", fontsize=10)
        ax.set_ylim(0, max(100.0, max(m + e for m, e in zip(means, errors)) * 1.1))
        figure.tight_layout()
        path = folder / "best_test.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written, notes


# --- command line --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("result")],
                        help="folders (searched recursively) or result files; default: result/")
    parser.add_argument("--select", default="auto",
                        help="metric that picks each group's configuration: auto (dev_ + the task metric), or a name "
                             "such as dev_accuracy or dev_f1")
    parser.add_argument("--allow_test_selection", action="store_true",
                        help="allow --select with a test metric (optimistic test numbers; off by default)")
    parser.add_argument("--csv", type=Path, help="also write the table of best configurations to this CSV file")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG curves and a bar chart here "
                                                                  "(needs matplotlib)")
    parser.add_argument("--all", action="store_true", help="also list every configuration, not only the best")
    parser.add_argument("--allow_mixed_code", action="store_true",
                        help="report results of different code (git commits, dirty checkouts) in one table, each row "
                             "marked with its code (refused by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        runs, notes = find_results(options.folders)
        if not runs:
            raise ReportError(f"No result files under {', '.join(map(str, options.folders))}. run.py writes them to "
                              f"result/ (or --result_file), grid.sh to its OUT folder; pass that folder.")
        check_selection(options.select, options.allow_test_selection, runs)
        mixed = code_problem(runs)
        if mixed and not options.allow_mixed_code:
            raise ReportError(mixed)
    except ReportError as error:
        print(f"report.py: {error}", file=sys.stderr)
        return 2
    groups = group_runs(runs)
    for g in groups:
        select_best(g, selection_metric(options.select, g))
    print(f"{len(runs)} result files, {len(groups)} groups. Selected by "
          f"{'dev_<task metric>' if options.select == 'auto' else options.select} (mean over seeds); dev and test in "
          f"%, mean ± sample std over seeds.\n")
    print(markdown_table(groups, options.select, bool(mixed)))
    if options.all:
        print("\nEvery configuration:\n")
        print(all_configurations_table(groups, options.select, bool(mixed)))
    print("\n" + provenance_summary(runs))
    if options.csv:
        write_csv(options.csv, groups, options.select)
        print(f"wrote {options.csv}")
    status = 0
    if options.plot:
        try:
            written, plot_notes = plot(groups, options.select, options.plot)
        except ImportError:
            print(f"report.py: {MATPLOTLIB_MISSING}", file=sys.stderr)
            written, plot_notes, status = [], [], 1
        notes += plot_notes
        for path in written:
            print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
