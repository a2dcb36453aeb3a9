"""Prompt templates of the MeZO large-model suite (spec §3).

The strings produced here must match MeZO character for character: scores are
compared with the paper's numbers, and a single extra space or newline changes
the tokenisation and hence the option log-likelihoods.

Contract (spec §3.1):
* ``encode(sample)``      the prompt without the answer;
* ``verbalize(s, c)``     the prompt with candidate ``c`` filled in; the text it
                          adds after ``encode`` is the scored *option*;
* ``encode_sfc`` / ``verbalize_sfc``: the same pair for surface-form
  calibration (SFC), which scores the option without the task context.

The caller (``encode_prompt``) strips only ``' '`` from both ends, so trailing
spaces returned here (e.g. Copa's ``" because "``) are intentional and harmless,
while trailing newlines are significant and kept.

Templates only read ``sample.data`` (the raw Hugging Face row, except for
SQuAD/DROP whose rows ``tasks.py`` flattens to ``answers: list[str]``).
"""

from __future__ import annotations

from typing import Any, Protocol


class SampleLike(Protocol):
    """Structural type of ``tasks.Sample``; avoids importing tasks.py here."""

    data: dict


class Template:
    """Base template; defaults are those of the original base class."""

    # Revision of the prompt format, bumped whenever a template's output
    # changes, so stored results can be tied to the prompts that made them.
    version: str = "1"

    def encode(self, sample: SampleLike) -> str:
        raise NotImplementedError

    def verbalize(self, sample: SampleLike, candidate: Any) -> str:
        return candidate

    def encode_sfc(self, sample: SampleLike) -> str:
        return "<mask>"

    def verbalize_sfc(self, sample: SampleLike, candidate: Any) -> str:
        return candidate


class PromptThenWordTemplate(Template):
    """Prompt ending in a question, answered by a single verbalised word.

    encode = prompt; verbalize = prompt + answer_sep + word; SFC scores the
    bare word against an empty context. Most SuperGLUE templates are this.
    """

    # Maps candidate -> answer word; None means the candidate already is the
    # word (BoolQ's candidates are the strings "Yes"/"No").
    verbalizer: dict | None = None
    answer_sep: str = ""

    def prompt(self, sample: SampleLike) -> str:
        raise NotImplementedError

    def word(self, candidate: Any) -> str:
        return candidate if self.verbalizer is None else self.verbalizer[candidate]

    def encode(self, sample):
        return self.prompt(sample)

    def verbalize(self, sample, candidate):
        return self.prompt(sample) + self.answer_sep + self.word(candidate)

    def encode_sfc(self, sample):
        return ""

    def verbalize_sfc(self, sample, candidate):
        return self.word(candidate)


class SST2Template(PromptThenWordTemplate):
    verbalizer = {0: "terrible", 1: "great"}
    answer_sep = " "
    # SFC keeps the cue phrase: the bare word alone is a different option.
    sfc_prompt = " It was"

    def prompt(self, sample):
        return f"{sample.data['sentence'].strip()} It was"

    def encode_sfc(self, sample):
        return self.sfc_prompt

    def verbalize_sfc(self, sample, candidate):
        return f"{self.sfc_prompt} {self.word(candidate)}"


class CopaTemplate(Template):
    """Premise + conjunction, continued by the chosen alternative.

    The alternative is a full sentence ("He dropped a hammer..."), so its
    first word is lower-cased to read as a continuation; only the pronoun "I"
    (the exact word, so "I'm" is still lower-cased) keeps its capital.
    """

    conjunctions = {"cause": " because ", "effect": " so "}
    # "correct" is what MeZO runs; the others are ablations of the original.
    capitalization_modes = ("correct", "bug", "upper", "lower")

    def __init__(self, capitalization: str = "correct"):
        if capitalization not in self.capitalization_modes:
            raise ValueError(
                f"capitalization must be one of {self.capitalization_modes}, got {capitalization!r}"
            )
        self.capitalization = capitalization

    def conjunction(self, sample) -> str:
        question = sample.data["question"]
        if question not in self.conjunctions:
            raise ValueError(f"Copa question must be 'cause' or 'effect', got {question!r}")
        return self.conjunctions[question]

    def prompt(self, sample) -> str:
        premise = sample.data["premise"].rstrip()
        # Only one final period goes: the conjunction continues the sentence.
        if premise.endswith("."):
            premise = premise[:-1]
        text = premise + self.conjunction(sample)
        if self.capitalization == "upper":
            return text.upper()
        if self.capitalization == "lower":
            return text.lower()
        return text

    def capitalize(self, candidate: str) -> str:
        if self.capitalization == "correct":
            first, sep, rest = candidate.partition(" ")
            return (first if first == "I" else first.lower()) + sep + rest
        if self.capitalization == "upper":
            return candidate.upper()
        if self.capitalization == "lower":
            return candidate.lower()
        return candidate

    def encode(self, sample):
        return self.prompt(sample)

    def verbalize(self, sample, candidate):
        return self.prompt(sample) + self.capitalize(candidate)

    def encode_sfc(self, sample):
        return self.conjunction(sample).strip()

    def verbalize_sfc(self, sample, candidate):
        return f"{self.conjunction(sample).strip()} {self.capitalize(candidate)}"


class _BoolQBase(PromptThenWordTemplate):
    """``{passage} {Question}`` + a version-specific separator."""

    question_suffix: str = ""

    @staticmethod
    def question(sample) -> str:
        # BoolQ questions are stored lower-case without "?"; normalise them
        # into a well-formed question.
        q = sample.data["question"]
        if not q.endswith("?"):
            q += "?"
        return q[0].upper() + q[1:]

    def prompt(self, sample):
        return f"{sample.data['passage']} {self.question(sample)}{self.question_suffix}"


class BoolQTemplate(_BoolQBase):
    """V1 (MeZO template version 0): answer follows after a space."""

    answer_sep = " "


class BoolQTemplateV2(_BoolQBase):
    """V2 (MeZO template version 1).

    The original wrote an escaped ``\\n\\n``: the prompt ends with the four
    characters backslash, n, backslash, n, and no real newline. Kept as is
    because that is what the model saw.
    """

    question_suffix = "\\n\\n"


class BoolQTemplateV3(_BoolQBase):
    """V3 (MeZO template version 2): the default for BoolQ."""

    question_suffix = "\n"


BoolQTemplateV1 = BoolQTemplate

# MeZO selects BoolQ templates by a 0-based "version" index, which is
# unrelated to the ``version`` attribute above and off by one from the class
# names; this table removes that trap.
BOOLQ_TEMPLATE_BY_MEZO_VERSION = {0: BoolQTemplate, 1: BoolQTemplateV2, 2: BoolQTemplateV3}


class MultiRCTemplate(PromptThenWordTemplate):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, sample):
        d = sample.data
        return (
            f"{d['paragraph']}\nQuestion: {d['question']}\n"
            f"I found this answer \"{d['answer']}\". Is that correct? Yes or No?\n"
        )


class CBTemplate(PromptThenWordTemplate):
    verbalizer = {0: "Yes", 1: "No", 2: "Maybe"}

    def prompt(self, sample):
        d = sample.data
        return f"Suppose {d['premise']} Can we infer that \"{d['hypothesis']}\"? Yes, No, or Maybe?\n"


class WICTemplate(PromptThenWordTemplate):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, sample):
        d = sample.data
        return (
            f"Does the word \"{d['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{d['sentence1']}\n{d['sentence2']}\n"
        )


class WSCTemplate(PromptThenWordTemplate):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, sample):
        d = sample.data
        # The pronoun is quoted mid-sentence, so a sentence-initial "He" is
        # lower-cased; the referent span is left as written.
        return (
            f"{d['text']}\nIn the previous sentence, does the pronoun "
            f"\"{d['span2_text'].lower()}\" refer to {d['span1_text']}? Yes or No?\n"
        )


class RTETemplate(PromptThenWordTemplate):
    verbalizer = {0: "Yes", 1: "No"}

    def prompt(self, sample):
        d = sample.data
        return f"{d['premise']}\nDoes this mean that \"{d['hypothesis']}\" is true? Yes or No?\n"


def _entity(candidate: Any) -> str:
    # ICL demos verbalise with ``correct_candidate``, which for ReCoRD is the
    # list of gold answers; the first one stands for all.
    return candidate[0] if isinstance(candidate, list) else candidate


class ReCoRDTemplateGPT3(Template):
    """GPT-3 style: highlights become a bullet list and the filled-in query
    is scored as the next bullet. Default for ReCoRD."""

    def passage(self, sample) -> str:
        return sample.data["passage"].replace("@highlight\n", "- ")

    def filled_query(self, sample, candidate) -> str:
        return sample.data["query"].replace("@placeholder", _entity(candidate))

    def encode(self, sample):
        return f"{self.passage(sample)}\n-"

    def verbalize(self, sample, candidate):
        return f"{self.passage(sample)}\n- {self.filled_query(sample, candidate)}"

    def encode_sfc(self, sample):
        return "-"

    def verbalize_sfc(self, sample, candidate):
        return f"- {self.filled_query(sample, candidate)}"


class ReCoRDTemplate(Template):
    """Question-answer variant; unused by the MeZO recipes.

    Unlike the GPT-3 variant it passes a list candidate through unchanged, as
    the original did. Its SFC pair ("Answer:" / "Answer: {c}") is not in the
    spec text but is what the original returns.
    """

    def encode(self, sample):
        d = sample.data
        return f"{d['passage']}\n{d['query']}\nQuestion: what is the \"@placeholder\"\nAnswer:"

    def verbalize(self, sample, candidate):
        return f"{self.encode(sample)} {candidate}"

    def encode_sfc(self, sample):
        return "Answer:"

    def verbalize_sfc(self, sample, candidate):
        return f"Answer: {candidate}"


class _GenerationTemplate(Template):
    """Free-form QA: the target is the first gold answer plus a newline.

    The newline teaches the model to stop, which generation relies on. The
    candidate argument is ignored because there are no candidates. SFC is
    undefined without candidates, so it raises.
    """

    def prompt(self, sample) -> str:
        raise NotImplementedError

    def encode(self, sample):
        return self.prompt(sample)

    def verbalize(self, sample, candidate=None):
        return f"{self.prompt(sample)} {sample.data['answers'][0]}\n"

    def encode_sfc(self, sample):
        raise NotImplementedError(f"{type(self).__name__} has no SFC variant (generation task)")

    def verbalize_sfc(self, sample, candidate):
        raise NotImplementedError(f"{type(self).__name__} has no SFC variant (generation task)")


class SQuADv2Template(_GenerationTemplate):
    """Used for SQuAD v1.1; the "v2" in the name is historical."""

    def prompt(self, sample):
        d = sample.data
        return f"Title: {d['title']}\nContext: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"


class DROPTemplate(_GenerationTemplate):
    def prompt(self, sample):
        d = sample.data
        # ``context`` holds DROP's passage (renamed by tasks.py).
        return f"Passage: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"


TEMPLATES: dict[str, type[Template]] = {
    cls.__name__: cls
    for cls in (
        SST2Template,
        CopaTemplate,
        BoolQTemplate,
        BoolQTemplateV2,
        BoolQTemplateV3,
        MultiRCTemplate,
        CBTemplate,
        WICTemplate,
        WSCTemplate,
        RTETemplate,
        ReCoRDTemplateGPT3,
        ReCoRDTemplate,
        SQuADv2Template,
        DROPTemplate,
    )
}
