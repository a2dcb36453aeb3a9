"""Golden prompt strings for every template (spec §3.2).

Expected strings are written out by hand from the spec, so any change to a
prompt, however small, fails here. Rows marked "real" are copied verbatim
from the official task data (HF field layout); the others are made up to pin
edge cases no real row exercises.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import templates as T  # noqa: E402
from tasks import Sample  # noqa: E402


def cls_sample(row, candidates):
    return Sample(id=row["idx"], data=row, candidates=candidates, correct_candidate=row["label"])


# ---------------------------------------------------------------- real rows
SST2_ROW = {"sentence": "it 's a charming and often affecting journey . ", "label": 1, "idx": 0}  # validation
SST2_SHORT_ROW = {"sentence": "bad . ", "label": 0, "idx": 203}  # validation

COPA_CAUSE_ROW = {  # train; the spec's example
    "premise": "The man broke his toe.",
    "choice1": "He got a hole in his sock.",
    "choice2": "He dropped a hammer on his foot.",
    "question": "cause",
    "idx": 236,
    "label": 1,
}
COPA_EFFECT_ROW = {  # validation
    "premise": "I doubted the salesman's pitch.",
    "choice1": "I turned his offer down.",
    "choice2": "He persuaded me to buy the product.",
    "question": "effect",
    "idx": 5,
    "label": 0,
}

BOOLQ_ROW = {  # validation (google/boolq layout)
    "question": "are they going to make a punisher season 2",
    "answer": True,
    "passage": "The season is set for release in 2019.",
}

MULTIRC_PARAGRAPH = (
    "Susan wanted to have a birthday party. She called all of her friends. She has five friends. "
    "Her mom said that Susan can invite them all to the party. Her first friend could not go to the "
    "party because she was sick. Her second friend was going out of town. Her third friend was not so "
    "sure if her parents would let her. The fourth friend said maybe. The fifth friend could go to the "
    "party for sure. Susan was a little sad. On the day of the party, all five friends showed up. Each "
    "friend had a present for Susan. Susan was happy and sent each friend a thank you card the next week. "
)
MULTIRC_ROW = {  # validation
    "paragraph": MULTIRC_PARAGRAPH,
    "question": "Did Susan's sick friend recover?",
    "answer": "Yes,she recovered",
    "idx": {"paragraph": 36, "question": 422, "answer": 2134},
    "label": 1,
}

CB_ROW = {  # validation
    "premise": "A: Your turn. B: Okay. Uh, I don't think they should abolish it.",
    "hypothesis": "they should abolish it",
    "idx": 14,
    "label": 1,
}

WIC_ROW = {  # validation
    "word": "curd",
    "sentence1": "Bean curd.",
    "sentence2": "Lemon curd.",
    "start1": 5,
    "start2": 6,
    "end1": 9,
    "end2": 10,
    "idx": 239,
    "label": 1,
}

WSC_ROW = {  # validation (wsc.fixed)
    "text": "The customer walked into the bank and stabbed one of the tellers. "
    "He was immediately taken to the hospital.",
    "span1_index": 0,
    "span2_index": 12,
    "span1_text": "The customer",
    "span2_text": "He",
    "idx": 9,
    "label": 0,
}

RTE_ROW = {  # validation
    "premise": "The girl was found in Drummondville.",
    "hypothesis": "Drummondville contains the girl.",
    "idx": 208,
    "label": 1,
}

RECORD_LEAD = (
    "(CNN) Police in Germany said Friday a New Year's Eve terror alert that closed two busy Munich "
    "train stations was prompted by the threat of suicide attacks linked to ISIS. It was not "
    "immediately clear exactly how the alert was linked to the terror group. Threats were made against "
    "the central Hauptbahnhof station and the Pasing station west of the city, Police Chief Hubertus "
    "Andrae said. The stations  were evacuated on Thursday evening and service stopped for around eight "
    "hours. Authorities told the public additional officers were being called in to find possible "
    "suspects. On Friday, 100 additional officers were still on duty, Andrae said."
)
RECORD_ROW = {  # validation
    "passage": RECORD_LEAD + "\n@highlight\nThe plot involved five to seven potential suicide attackers"
    "\n@highlight\nThe tip about the plot came from another country's intelligence agency"
    "\n@highlight\nPolice asked residents to avoid large public crowds",
    "query": "Hermann said there were no concrete indications that a terror attack could take place "
    "in @placeholder in the coming days.",
    "entities": ["Andrae", "Germany", "Hauptbahnhof", "Hubertus Andrae", "ISIS", "Munich", "New Year", "Pasing"],
    "entity_spans": {
        "text": ["Germany", "New Year", "Munich", "ISIS", "Hauptbahnhof", "Pasing", "Hubertus Andrae", "Andrae"],
        "start": [16, 38, 87, 165, 292, 321, 367, 633],
        "end": [23, 46, 93, 169, 304, 327, 382, 639],
    },
    "answers": ["Munich"],
    "idx": {"passage": 3, "query": 3},
}

SQUAD_ROW = {  # validation; note the trailing space of the question
    "id": "56f8ca289b226e1400dd1008",
    "title": "Martin_Luther",
    "context": "A piece of paper was later found on which Luther had written his last statement. "
    "The statement was in Latin, apart from \"We are beggars,\" which was in German.",
    "question": "In what language was most of the statement written? ",
    "answers": {"text": ["Latin", "Latin", "Latin"], "answer_start": [102, 102, 102]},
}
SQUAD_ROW_2 = {  # validation; golds differ
    "id": "56e1011ecd28a01900c6740b",
    "title": "Nikola_Tesla",
    "context": "On 7 January 1900, Tesla left Colorado Springs.[citation needed] His lab was torn down in "
    "1904, and its contents were sold two years later to satisfy a debt.",
    "question": "When did Tesla depart from Colorado Springs?",
    "answers": {"text": ["1900", "On 7 January 1900", "7 January 1900"], "answer_start": [13, 0, 3]},
}

DROP_PASSAGE = (  # starts with a space in the real data
    " Hoping to rebound from their loss to the Patriots, the Raiders stayed at home for a Week 16 duel "
    "with the Houston Texans.  Oakland would get the early lead in the first quarter as quarterback "
    "JaMarcus Russell completed a 20-yard touchdown pass to rookie wide receiver Chaz Schilens.  The "
    "Texans would respond with fullback Vonta Leach getting a 1-yard touchdown run, yet the Raiders "
    "would answer with kicker Sebastian Janikowski getting a 33-yard and a 30-yard field goal.  Houston "
    "would tie the game in the second quarter with kicker Kris Brown getting a 53-yard and a 24-yard "
    "field goal. Oakland would take the lead in the third quarter with wide receiver Johnnie Lee Higgins "
    "catching a 29-yard touchdown pass from Russell, followed up by an 80-yard punt return for a "
    "touchdown.  The Texans tried to rally in the fourth quarter as Brown nailed a 40-yard field goal, "
    "yet the Raiders' defense would shut down any possible attempt."
)
DROP_ROW = {  # validation
    "section_id": "nfl_1184",
    "query_id": "f37e81fa-ef7b-4583-b671-762fc433faa9",
    "passage": DROP_PASSAGE,
    "question": "Who scored the first touchdown of the game?",
    "answers_spans": {"spans": ["Chaz Schilens", "JaMarcus Russell"], "types": ["span", "span"]},
}


# Sample builders with tasks.py's conventions (spec §3 table).
def copa_sample(row):
    choices = [row["choice1"], row["choice2"]]
    return Sample(row["idx"], row, choices, choices[row["label"]])


def boolq_sample(row):
    return Sample(None, row, ["Yes", "No"], "Yes" if row["answer"] else "No")


def record_sample(row):
    return Sample(row["idx"], row, row["entities"], row["answers"])


def squad_sample(i, row):
    data = {k: row[k] for k in ("title", "context", "question")}
    data["answers"] = row["answers"]["text"]
    return Sample(i, data, None, data["answers"])


def drop_sample(i, row):
    answers = row["answers_spans"]["spans"]
    return Sample(i, {"context": row["passage"], "question": row["question"], "answers": answers}, None, answers)


# ---------------------------------------------------------------- base / registry
def test_base_template_defaults():
    t, s = T.Template(), Sample(0, {}, [0, 1], 0)
    with pytest.raises(NotImplementedError):
        t.encode(s)
    assert t.verbalize(s, "x") == "x"
    assert t.encode_sfc(s) == "<mask>"
    assert t.verbalize_sfc(s, "x") == "x"


def test_registry_names_and_versions():
    assert set(T.TEMPLATES) == {
        "SST2Template", "CopaTemplate", "BoolQTemplate", "BoolQTemplateV2", "BoolQTemplateV3",
        "MultiRCTemplate", "CBTemplate", "WICTemplate", "WSCTemplate", "RTETemplate",
        "ReCoRDTemplateGPT3", "ReCoRDTemplate", "SQuADv2Template", "DROPTemplate",
    }
    for name, cls in T.TEMPLATES.items():
        assert cls.__name__ == name and issubclass(cls, T.Template)
        assert cls().version == "1"


def test_boolq_mezo_version_index():
    # MeZO's default BoolQ "version 2" is V3.
    assert T.BOOLQ_TEMPLATE_BY_MEZO_VERSION == {0: T.BoolQTemplate, 1: T.BoolQTemplateV2, 2: T.BoolQTemplateV3}
    assert T.BoolQTemplateV1 is T.BoolQTemplate


def test_verbalizers_are_declarative():
    assert T.SST2Template.verbalizer == {0: "terrible", 1: "great"}
    assert T.MultiRCTemplate.verbalizer == {0: "No", 1: "Yes"}
    assert T.CBTemplate.verbalizer == {0: "Yes", 1: "No", 2: "Maybe"}
    assert T.WICTemplate.verbalizer == {0: "No", 1: "Yes"}
    assert T.WSCTemplate.verbalizer == {0: "No", 1: "Yes"}
    assert T.RTETemplate.verbalizer == {0: "Yes", 1: "No"}


# ---------------------------------------------------------------- SST-2
def test_sst2():
    t, s = T.SST2Template(), cls_sample(SST2_ROW, [0, 1])
    assert t.encode(s) == "it 's a charming and often affecting journey . It was"
    assert t.verbalize(s, 0) == "it 's a charming and often affecting journey . It was terrible"
    assert t.verbalize(s, 1) == "it 's a charming and often affecting journey . It was great"
    assert t.encode_sfc(s) == " It was"
    assert t.verbalize_sfc(s, 0) == " It was terrible"
    assert t.verbalize_sfc(s, 1) == " It was great"


def test_sst2_strips_sentence():
    t, s = T.SST2Template(), cls_sample(SST2_SHORT_ROW, [0, 1])
    assert t.encode(s) == "bad . It was"
    assert t.verbalize(s, 0) == "bad . It was terrible"


# ---------------------------------------------------------------- Copa
def test_copa_cause_spec_example():
    t, s = T.CopaTemplate(), copa_sample(COPA_CAUSE_ROW)
    assert t.encode(s) == "The man broke his toe because "
    assert t.verbalize(s, s.candidates[0]) == "The man broke his toe because he got a hole in his sock."
    assert t.verbalize(s, s.candidates[1]) == "The man broke his toe because he dropped a hammer on his foot."
    assert t.encode_sfc(s) == "because"
    assert t.verbalize_sfc(s, s.candidates[1]) == "because he dropped a hammer on his foot."


def test_copa_effect_keeps_pronoun_I():
    t, s = T.CopaTemplate(), copa_sample(COPA_EFFECT_ROW)
    assert t.encode(s) == "I doubted the salesman's pitch so "
    assert t.verbalize(s, s.candidates[0]) == "I doubted the salesman's pitch so I turned his offer down."
    assert t.verbalize(s, s.candidates[1]) == "I doubted the salesman's pitch so he persuaded me to buy the product."
    assert t.encode_sfc(s) == "so"
    assert t.verbalize_sfc(s, s.candidates[0]) == "so I turned his offer down."
    assert t.verbalize_sfc(s, s.candidates[1]) == "so he persuaded me to buy the product."


def _copa(premise, question="effect"):
    return Sample(0, {"premise": premise, "question": question, "choice1": "", "choice2": ""}, None, None)


def test_copa_premise_rstrip_and_single_period_removal():
    t = T.CopaTemplate()
    assert t.encode(_copa("It rained.  \n")) == "It rained so "
    assert t.encode(_copa("Wait..")) == "Wait. so "  # only one period goes
    assert t.encode(_copa("He laughed", "cause")) == "He laughed because "
    assert t.encode(_copa("Really?")) == "Really? so "


def test_copa_first_word_lowercasing_rule():
    t, s = T.CopaTemplate(), _copa("X.")
    assert t.verbalize(s, "I'm tired.") == "X so i'm tired."  # only the exact word "I" is kept
    assert t.verbalize(s, "TV shows ran.") == "X so tv shows ran."  # the whole first word
    assert t.verbalize(s, "The Eiffel Tower fell.") == "X so the Eiffel Tower fell."  # only the first word
    assert t.verbalize(s, "Gone.") == "X so gone."


def test_copa_unknown_question_and_mode():
    with pytest.raises(ValueError):
        T.CopaTemplate().encode(_copa("X.", "purpose"))
    with pytest.raises(ValueError):
        T.CopaTemplate(capitalization="title")


def test_copa_unused_capitalization_modes():
    s = copa_sample(COPA_CAUSE_ROW)
    cand = s.candidates[1]
    assert T.CopaTemplate("bug").verbalize(s, cand) == "The man broke his toe because He dropped a hammer on his foot."
    assert T.CopaTemplate("upper").verbalize(s, cand) == "THE MAN BROKE HIS TOE BECAUSE HE DROPPED A HAMMER ON HIS FOOT."
    assert T.CopaTemplate("lower").verbalize(s, cand) == "the man broke his toe because he dropped a hammer on his foot."


# ---------------------------------------------------------------- BoolQ
def test_boolq_v1():
    t, s = T.BoolQTemplate(), boolq_sample(BOOLQ_ROW)
    assert t.encode(s) == "The season is set for release in 2019. Are they going to make a punisher season 2?"
    assert t.verbalize(s, "Yes") == "The season is set for release in 2019. Are they going to make a punisher season 2? Yes"
    assert t.verbalize(s, "No") == "The season is set for release in 2019. Are they going to make a punisher season 2? No"
    assert t.encode_sfc(s) == ""
    assert t.verbalize_sfc(s, "Yes") == "Yes"


def test_boolq_v2_literal_backslash_n():
    t, s = T.BoolQTemplateV2(), boolq_sample(BOOLQ_ROW)
    enc = t.encode(s)
    assert enc == r"The season is set for release in 2019. Are they going to make a punisher season 2?\n\n"
    assert "\n" not in enc and enc.endswith("?" + "\\" + "n" + "\\" + "n")
    assert t.verbalize(s, "No") == r"The season is set for release in 2019. Are they going to make a punisher season 2?\n\nNo"
    assert t.encode_sfc(s) == ""
    assert t.verbalize_sfc(s, "No") == "No"


def test_boolq_v3_default():
    t, s = T.BoolQTemplateV3(), boolq_sample(BOOLQ_ROW)
    assert t.encode(s) == "The season is set for release in 2019. Are they going to make a punisher season 2?\n"
    assert t.verbalize(s, "Yes") == "The season is set for release in 2019. Are they going to make a punisher season 2?\nYes"
    assert t.verbalize(s, "No") == "The season is set for release in 2019. Are they going to make a punisher season 2?\nNo"
    assert t.encode_sfc(s) == ""
    assert t.verbalize_sfc(s, "Yes") == "Yes"
    assert t.verbalize_sfc(s, "No") == "No"


@pytest.mark.parametrize(
    "cls, suffix",
    [(T.BoolQTemplate, ""), (T.BoolQTemplateV2, r"\n\n"), (T.BoolQTemplateV3, "\n")],
)
def test_boolq_question_preprocessing(cls, suffix):
    def enc(q):
        return cls().encode(boolq_sample({"question": q, "answer": False, "passage": "P."}))

    assert enc("is it") == "P. Is it?" + suffix
    assert enc("is it?") == "P. Is it?" + suffix  # no second "?"
    assert enc("Is it?") == "P. Is it?" + suffix
    assert enc("is It the iPhone") == "P. Is It the iPhone?" + suffix  # only the first char


# ---------------------------------------------------------------- MultiRC / CB / WIC / WSC / RTE
def test_multirc():
    t, s = T.MultiRCTemplate(), cls_sample(MULTIRC_ROW, [0, 1])
    prompt = (
        MULTIRC_PARAGRAPH
        + "\nQuestion: Did Susan's sick friend recover?\n"
        + 'I found this answer "Yes,she recovered". Is that correct? Yes or No?\n'
    )
    assert t.encode(s) == prompt
    assert t.verbalize(s, 0) == prompt + "No"
    assert t.verbalize(s, 1) == prompt + "Yes"
    assert t.encode_sfc(s) == ""
    assert t.verbalize_sfc(s, 0) == "No"
    assert t.verbalize_sfc(s, 1) == "Yes"


def test_cb():
    t, s = T.CBTemplate(), cls_sample(CB_ROW, [0, 1, 2])
    prompt = (
        "Suppose A: Your turn. B: Okay. Uh, I don't think they should abolish it. "
        'Can we infer that "they should abolish it"? Yes, No, or Maybe?\n'
    )
    assert t.encode(s) == prompt
    assert t.verbalize(s, 0) == prompt + "Yes"
    assert t.verbalize(s, 1) == prompt + "No"
    assert t.verbalize(s, 2) == prompt + "Maybe"
    assert t.encode_sfc(s) == ""
    assert [t.verbalize_sfc(s, c) for c in (0, 1, 2)] == ["Yes", "No", "Maybe"]


def test_wic():
    t, s = T.WICTemplate(), cls_sample(WIC_ROW, [0, 1])
    prompt = 'Does the word "curd" have the same meaning in these two sentences? Yes, No?\nBean curd.\nLemon curd.\n'
    assert t.encode(s) == prompt
    assert t.verbalize(s, 0) == prompt + "No"
    assert t.verbalize(s, 1) == prompt + "Yes"
    assert t.encode_sfc(s) == ""
    assert [t.verbalize_sfc(s, c) for c in (0, 1)] == ["No", "Yes"]


def test_wsc_lowercases_span2_only():
    t, s = T.WSCTemplate(), cls_sample(WSC_ROW, [0, 1])
    prompt = (
        "The customer walked into the bank and stabbed one of the tellers. He was immediately taken to the hospital.\n"
        'In the previous sentence, does the pronoun "he" refer to The customer? Yes or No?\n'
    )
    assert t.encode(s) == prompt
    assert t.verbalize(s, 0) == prompt + "No"
    assert t.verbalize(s, 1) == prompt + "Yes"
    assert t.encode_sfc(s) == ""
    assert [t.verbalize_sfc(s, c) for c in (0, 1)] == ["No", "Yes"]


def test_rte():
    t, s = T.RTETemplate(), cls_sample(RTE_ROW, [0, 1])
    prompt = 'The girl was found in Drummondville.\nDoes this mean that "Drummondville contains the girl." is true? Yes or No?\n'
    assert t.encode(s) == prompt
    assert t.verbalize(s, 0) == prompt + "Yes"
    assert t.verbalize(s, 1) == prompt + "No"
    assert t.encode_sfc(s) == ""
    assert [t.verbalize_sfc(s, c) for c in (0, 1)] == ["Yes", "No"]


# ---------------------------------------------------------------- ReCoRD
RECORD_BULLETS = (
    RECORD_LEAD
    + "\n- The plot involved five to seven potential suicide attackers"
    + "\n- The tip about the plot came from another country's intelligence agency"
    + "\n- Police asked residents to avoid large public crowds"
)


def test_record_gpt3():
    t, s = T.ReCoRDTemplateGPT3(), record_sample(RECORD_ROW)
    assert t.encode(s) == RECORD_BULLETS + "\n-"
    assert t.verbalize(s, "Munich") == (
        RECORD_BULLETS + "\n- Hermann said there were no concrete indications that a terror attack "
        "could take place in Munich in the coming days."
    )
    assert t.encode_sfc(s) == "-"
    assert t.verbalize_sfc(s, "Germany") == (
        "- Hermann said there were no concrete indications that a terror attack could take place "
        "in Germany in the coming days."
    )


def test_record_gpt3_list_candidate_uses_first_element():
    t, s = T.ReCoRDTemplateGPT3(), record_sample(RECORD_ROW)
    assert t.verbalize(s, ["Munich", "Germany"]) == t.verbalize(s, "Munich")
    assert t.verbalize(s, s.correct_candidate).endswith("take place in Munich in the coming days.")
    assert t.verbalize_sfc(s, ["Pasing"]) == (
        "- Hermann said there were no concrete indications that a terror attack could take place "
        "in Pasing in the coming days."
    )


RECORD_TOY = {"passage": "Tom met Ann.\n@highlight\nAnn is happy\n@highlight", "query": "@placeholder met @placeholder."}


def test_record_gpt3_rewrites_every_highlight_and_placeholder():
    t, s = T.ReCoRDTemplateGPT3(), record_sample({**RECORD_TOY, "entities": ["Ann", "Tom"], "answers": ["Tom"], "idx": 0})
    # A final "@highlight" without its newline is left alone.
    assert t.encode(s) == "Tom met Ann.\n- Ann is happy\n@highlight\n-"
    assert t.verbalize(s, "Tom") == "Tom met Ann.\n- Ann is happy\n@highlight\n- Tom met Tom."


def test_record_plain_variant():
    t = T.ReCoRDTemplate()
    s = record_sample({**RECORD_TOY, "entities": ["Ann", "Tom"], "answers": ["Tom"], "idx": 0})
    prompt = 'Tom met Ann.\n@highlight\nAnn is happy\n@highlight\n@placeholder met @placeholder.\nQuestion: what is the "@placeholder"\nAnswer:'
    assert t.encode(s) == prompt
    assert t.verbalize(s, "Tom") == prompt + " Tom"
    assert t.encode_sfc(s) == "Answer:"
    assert t.verbalize_sfc(s, "Tom") == "Answer: Tom"


# ---------------------------------------------------------------- SQuAD / DROP
def test_squad():
    t, s = T.SQuADv2Template(), squad_sample(0, SQUAD_ROW)
    prompt = (
        "Title: Martin_Luther\n"
        "Context: A piece of paper was later found on which Luther had written his last statement. "
        'The statement was in Latin, apart from "We are beggars," which was in German.\n'
        "Question: In what language was most of the statement written?\n"
        "Answer:"
    )
    assert t.encode(s) == prompt
    assert t.verbalize(s, s.correct_candidate) == prompt + " Latin\n"
    assert t.verbalize(s, None) == prompt + " Latin\n"


def test_squad_verbalize_uses_first_gold_ignoring_candidate():
    t, s = T.SQuADv2Template(), squad_sample(1, SQUAD_ROW_2)
    expected = (
        "Title: Nikola_Tesla\n"
        "Context: On 7 January 1900, Tesla left Colorado Springs.[citation needed] His lab was torn down "
        "in 1904, and its contents were sold two years later to satisfy a debt.\n"
        "Question: When did Tesla depart from Colorado Springs?\n"
        "Answer: 1900\n"
    )
    assert t.verbalize(s, "7 January 1900") == expected
    assert t.verbalize(s, s.correct_candidate) == expected


def test_drop():
    t, s = T.DROPTemplate(), drop_sample(0, DROP_ROW)
    prompt = "Passage: " + DROP_PASSAGE + "\nQuestion: Who scored the first touchdown of the game?\nAnswer:"
    assert t.encode(s).startswith("Passage:  Hoping to rebound")  # passage is not stripped
    assert t.encode(s) == prompt
    assert t.verbalize(s, s.correct_candidate) == prompt + " Chaz Schilens\n"


def test_drop_strips_question():
    t = T.DROPTemplate()
    s = Sample(0, {"context": "P", "question": "  How many?\n", "answers": ["3", "2"]}, None, ["3", "2"])
    assert t.encode(s) == "Passage: P\nQuestion: How many?\nAnswer:"
    assert t.verbalize(s, None) == "Passage: P\nQuestion: How many?\nAnswer: 3\n"


@pytest.mark.parametrize("cls, sample", [
    (T.SQuADv2Template, squad_sample(0, SQUAD_ROW)),
    (T.DROPTemplate, drop_sample(0, DROP_ROW)),
])
def test_generation_templates_have_no_sfc(cls, sample):
    with pytest.raises(NotImplementedError):
        cls().encode_sfc(sample)
    with pytest.raises(NotImplementedError):
        cls().verbalize_sfc(sample, None)


# ---------------------------------------------------------------- option = verbalize minus encode
@pytest.mark.parametrize("template, sample, candidate, option", [
    (T.SST2Template(), cls_sample(SST2_ROW, [0, 1]), 1, " great"),
    (T.CopaTemplate(), copa_sample(COPA_CAUSE_ROW), "He dropped a hammer on his foot.", "he dropped a hammer on his foot."),
    (T.BoolQTemplateV3(), boolq_sample(BOOLQ_ROW), "No", "No"),
    (T.RTETemplate(), cls_sample(RTE_ROW, [0, 1]), 0, "Yes"),
    (T.SQuADv2Template(), squad_sample(0, SQUAD_ROW), None, " Latin\n"),
])
def test_verbalize_extends_encode(template, sample, candidate, option):
    # The scored option is what verbalize appends to encode (spec §3.1).
    assert template.verbalize(sample, candidate) == template.encode(sample) + option
