"""How a command line becomes flag values, independent of which flags exist (args.py declares those):

* `flag(...)`: a dataclass field for one flag with its help, accepted values, range and the setting it belongs to;
* `normalise`: legacy spellings rewritten (RENAMED, INVERTED, DOUBLE_NEGATIVE, RETIRED) and negative numbers glued to
  their flag (argparse would read `-1e-3` as a flag);
* `screen`: the flags argparse cannot parse (unknown, with a "did you mean"; a value of the wrong type or choice) taken
  out and reported, so that one run of the parser reports every problem;
* `Parser` and `HelpFormatter`: Hugging Face's dataclass parser with our help text (ranges, choices, each default
  once) that raises `UsageError` instead of exiting.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from argparse import SUPPRESS, ArgumentDefaultsHelpFormatter, ArgumentTypeError, _StoreFalseAction
from dataclasses import field

from transformers import HfArgumentParser

__all__ = ["UsageError", "flag", "Parser", "HelpFormatter", "normalise", "screen", "unknown_flag", "range_text",
           "condition_text", "RENAMED", "INVERTED", "DOUBLE_NEGATIVE", "RETIRED", "SYNONYMS"]


class UsageError(ValueError):
    """A command this suite cannot run as given: invalid flags (args.py), or a folder, checkpoint or result path the
    run cannot use (runs.py). `problems` lists each one with the value and the fix, one entry a problem (its details
    on lines of their own, within the entry)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def report(self, outcome: str) -> str:
        """The message for the user: "N problems with this command; <outcome>:", then each problem, the lines of one
        problem indented under its first (a problem counts once, however many lines it has)."""
        count = len(self.problems)
        return (f"{count} problem{'s' * (count != 1)} with this command; {outcome}:\n  "
                + "\n  ".join(p.replace("\n", "\n    ") for p in self.problems))


def flag(default, help: str, *, choices=None, low=None, high=None, above=None, only_with=None, identity=True):
    """A dataclass field for one flag. low/high: inclusive bounds, above: exclusive lower bound (None: unset is
    allowed). only_with = ("group.field", allowed values): the flag means something only with that setting.
    identity=False: the flag does not change what a run computes (logging, where results go), so a checkpoint may be
    resumed with another value; identity="changed": it counts only when set away from its default (a flag added
    after runs existed, whose default computes what they computed, so their run ids stay)."""
    extra = {"choices": choices, "low": low, "high": high, "above": above, "only_with": only_with,
             "identity": identity}
    return field(default=default, metadata={"help": help, "suite": extra})

# Old spellings: a plain rename, or an inverted boolean (--no_reparam was "no MLP reparameterisation").
RENAMED = {"--evaluation_strategy": "--eval_strategy"}
INVERTED = {"--no_reparam": "--prefix_reparam", "--zo_unsigned_momentum": "--zo_signed_momentum",
            "--no_eval": "--final_eval"}
DOUBLE_NEGATIVE = {"--no_no_reparam": "--prefix_reparam"}
RETIRED = {"--save_on_interrupt": "SIGTERM, SIGINT and SIGUSR1 always save a checkpoint and stop"}
# Unknown flags that people type for a known one (difflib finds typos, not synonyms).
SYNONYMS = {"lr": "learning_rate", "eps": "zo_eps", "epsilon": "zo_eps", "bs": "per_device_train_batch_size",
            "batch_size": "per_device_train_batch_size", "steps": "max_steps", "epochs": "num_train_epochs",
            "model": "model_name", "task": "task_name", "optimizer": "zo_optim", "zo_optimizer": "zo_optim",
            "num_demos": "num_train", "output": "output_dir", "out": "output_dir"}
_BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")
_NUMBER = re.compile(r"^-(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf|nan)$", re.IGNORECASE)


class Parser(HfArgumentParser):
    """HfArgumentParser over flag dataclasses that shows each flag's accepted values and range in its help, keeps
    argparse from guessing abbreviations (`--lr` silently matching `--lr_scheduler_type`), raises instead of exiting on
    a bad value, and ends its help with `appendix()` (a table that keeps its lines)."""

    def __init__(self, dataclasses_, *, usage: str, description: str, appendix=lambda: ""):
        super().__init__(list(dataclasses_), usage=usage, description=description, allow_abbrev=False,
                         formatter_class=HelpFormatter)
        self.appendix = appendix

    @staticmethod
    def _parse_dataclass_field(parser, dataclass_field):
        suite = dataclass_field.metadata.get("suite")
        if suite is not None:  # our metadata is not argparse's: fold it into the help text
            helptext = dataclass_field.metadata["help"] + _describe_limits(suite)
            dataclass_field = _with_metadata(dataclass_field, {"help": helptext})
        HfArgumentParser._parse_dataclass_field(parser, dataclass_field)
        complement = parser._option_string_actions.get(f"--no_{dataclass_field.name}")
        if complement is not None and complement.dest == dataclass_field.name:
            # Hugging Face repeats the flag's own help here, which reads as if --no_X did what --X does
            complement.help = f"The same as --{dataclass_field.name} false."
        if dataclass_field.type == bool | None:
            # "unset: decided elsewhere" booleans still take the bare `--flag` form for true, as every boolean does
            action = parser._option_string_actions[f"--{dataclass_field.name}"]
            action.nargs, action.const = "?", True

    def error(self, message):
        raise UsageError([message])

    def format_help(self) -> str:  # argparse would reflow an epilog into one paragraph
        appendix = self.appendix()
        return f"{super().format_help()}\n{appendix}\n" if appendix else super().format_help()


class HelpFormatter(ArgumentDefaultsHelpFormatter):
    """Each flag's default once: a help text that states its default in its own words ("default: $ZO_DATA_DIR ...")
    gets no "(default: None)" after it, and a --no_X flag (Hugging Face adds one for each boolean that defaults to
    true) none of its own (argparse would show False, the value it stores; --X shows the default). A default that
    would print as nothing or as blank space (an empty text, a newline) is quoted."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or "%(default)" in text or action.default is SUPPRESS or not action.option_strings
                or isinstance(action, _StoreFalseAction)):
            return text
        shown = action.default
        if isinstance(shown, str) and (not shown.strip() or not shown.isprintable()):
            shown = repr(shown)
        return f"{text} (default: {str(shown).replace('%', '%%')})"  # the help text is %-formatted next


def _with_metadata(original: dataclasses.Field, metadata: dict) -> dataclasses.Field:
    copy = dataclasses.field(default=original.default, default_factory=original.default_factory, metadata=metadata)
    copy.name, copy.type = original.name, original.type
    return copy


def _describe_limits(suite: dict) -> str:
    parts = []
    if suite["choices"]:
        parts.append("choices: " + ", ".join(map(str, suite["choices"])))
    if suite["low"] is not None or suite["above"] is not None or suite["high"] is not None:
        parts.append(range_text(suite["low"], suite["high"], suite["above"]))
    if suite["only_with"]:
        parts.append("with " + condition_text(*suite["only_with"]))
    return f" [{'; '.join(parts)}]" if parts else ""


def range_text(low, high, above) -> str:
    if above is not None:
        lower = f"> {above}"
    elif low is not None:
        lower = f">= {low}"
    else:
        lower = ""
    upper = f"<= {high}" if high is not None else ""
    return " and ".join(p for p in (lower, upper) if p)


def condition_text(path: str, allowed: tuple) -> str:
    name = path.split(".")[1]
    if allowed == (True,):
        return f"--{name}"
    return f"--{name} " + "|".join(map(str, allowed))

def normalise(argv: list[str], options: dict, problems: list[str]) -> list[str]:
    """Legacy spellings rewritten; a negative number after a flag glued to it with '=' (argparse takes '-1e-3' for a
    flag)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name in RENAMED:
            out.append(RENAMED[name] + eq + inline)
        elif name in INVERTED or name in DOUBLE_NEGATIVE:
            value = True
            if eq:
                value = _bool_or_none(inline)
            elif i + 1 < len(argv) and _bool_or_none(argv[i + 1]) is not None:
                value = _bool_or_none(argv[i + 1])
                i += 1
            if value is None:
                problems.append(f"{name} {inline!r}: expected true or false.")
            else:
                target = INVERTED.get(name) or DOUBLE_NEGATIVE[name]
                out.append(f"{target}={str(value if name in DOUBLE_NEGATIVE else not value).lower()}")
        elif name in RETIRED:
            if not eq and i + 1 < len(argv) and _bool_or_none(argv[i + 1]) is not None:
                i += 1
            # accepted so that old grid scripts keep running; it changes nothing
        elif (_NUMBER.match(token) and out and out[-1].startswith("--") and "=" not in out[-1]
              and _takes_value(options.get(out[-1]))):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
        i += 1
    return out


def _takes_value(action) -> bool:
    return action is not None and action.nargs != 0


def _bool_or_none(text: str):
    lowered = text.lower()
    if lowered not in _BOOL_WORDS:
        return None
    return _BOOL_WORDS.index(lowered) < 5


def screen(argv: list[str], options: dict, problems: list[str]) -> tuple[list[str], set[str]]:
    """argv without the flags that cannot be parsed (each reported), and the destinations given on it."""
    kept: list[str] = []
    given: set[str] = set()
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-") or token in ("-", "--"):
            problems.append(f"Unexpected argument {token!r}: every value follows its flag (--flag VALUE).")
            i += 1
            continue
        name, eq, inline = token.partition("=")
        action = options.get(name)
        if action is None:
            problems.append(unknown_flag(name, options))
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):  # its value(s)
                i += 1
            continue
        values, consumed = _values_of(action, argv, i, inline if eq else None)
        bad = _check_values(name, action, values, eq)
        if bad:
            problems.append(bad)
        else:
            kept.extend(argv[i:i + consumed])
            given.add(action.dest)
        i += consumed
    return kept, given


def _values_of(action, argv, i, inline) -> tuple[list[str], int]:
    """The values of the flag at argv[i] and how many tokens it spans, as argparse will read them."""
    if inline is not None:
        return [inline], 1
    following = []
    j = i + 1
    while j < len(argv) and not argv[j].startswith("-"):
        following.append(argv[j])
        j += 1
    if action.nargs == 0:
        return [], 1
    if action.nargs is None:
        return following[:1] or [None], 1 + min(1, len(following))
    if action.nargs == "?":
        return following[:1], 1 + min(1, len(following))
    return following, 1 + len(following)  # "+" / "*"


def _check_values(name: str, action, values: list, inline: bool) -> str | None:
    if action.nargs == 0:
        if inline:
            return f"{name} takes no value (remove '={values[0]}')."
        return None
    if action.nargs == "+" and not values:
        return f"{name} expects at least one value."
    for value in values:
        if value is None:
            return f"{name} expects a value."
        try:
            converted = action.type(value) if action.type is not None else value
        except (ValueError, TypeError, ArgumentTypeError, KeyError):
            return f"{name} {value!r}: {_expected(action)}."
        if action.choices is not None and converted not in action.choices:
            return f"{name} {value!r}: {_expected(action)}."
    return None


def _expected(action) -> str:
    if action.choices is not None:
        return "choose one of " + ", ".join(map(str, action.choices))
    kind = getattr(action.type, "__name__", "")
    return {"int": "expected an integer", "float": "expected a number (e.g. 1e-3 or -0.5)",
            "string_to_bool": "expected true or false"}.get(kind, f"not a valid value ({kind or 'text'})")


def unknown_flag(name: str, options: dict) -> str:
    bare = name.lstrip("-")
    known = sorted({o for o in options if o.startswith("--") and "-" not in o[2:]})
    if bare in SYNONYMS:
        return f"Unknown flag {name}. Did you mean --{SYNONYMS[bare]}? (`python run.py --help` lists every flag.)"
    hints = difflib.get_close_matches(name.replace("-", "_").replace("__", "--", 1), known, n=3, cutoff=0.75)
    hints += [o for o in known if o.endswith("_" + bare) and o not in hints][:3]
    hint = f" Did you mean {' or '.join(hints[:3])}?" if hints else ""
    return f"Unknown flag {name}.{hint} (`python run.py --help` lists every flag.)"
