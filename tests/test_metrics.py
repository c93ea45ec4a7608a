"""Scorers vs hand-computed cases of the official scripts, quirks included (internvl_chat.eval.metrics)."""

import random

import pytest

from internvl_chat.eval import metrics as m


# ------------------------------------------------------------------------------------------ VQA normalisation
@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("Ten dogs", "10 dogs"),
        ("the cat", "cat"),  # articles
        ("A dog.", "dog"),  # article + final period
        ("an apple", "apple"),
        ("Yes,", "yes"),  # "Yes," answers: comma dropped before anything else
        ("Yes, it is.", "yes it is"),
        ("dont", "don't"),  # contractions restored
        ("whats", "what's"),
        ("It's red", "it 's red"),  # "'s" split off (EvalAI word_tokenize)
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),
        ("x-ray", "x ray"),  # punctuation inside a word -> space
        ("x - ray", "x ray"),  # next to a space -> removed
        ("(red)", "red"),
        ("e.g.", "eg"),
        ("  Hello\tWorld\n", "hello world"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert m.normalize_vqa_answer(raw) == expected


def test_normalize_period_quirk_removes_at_most_32_periods():
    # re.UNICODE (32) is passed as `count` in the official code.
    assert m.normalize_vqa_answer("a" + "." * 40) == "a" + "." * 8


@pytest.mark.parametrize(
    "matches,expected", [(10, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)]
)  # 10-choose-9 averages of min(#matches / 3, 1)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert m.vqa_accuracy("Cat.", answers) == pytest.approx(expected)


def test_vqa_accuracy_number_words_and_yes_comma():
    assert m.vqa_accuracy("two", ["2"] * 10) == 1.0
    assert m.vqa_accuracy("Yes,", ["yes"] * 10) == 1.0
    assert m.vqa_accuracy("", ["yes"] * 10) == 0.0


def test_vqa_accuracy_protocols_disagree_on_unanimous_answers():
    # vqaEval.py only normalises when the humans disagree; m4c always does.
    assert m.vqa_accuracy("Two", ["two"] * 10, protocol="m4c") == 1.0
    assert m.vqa_accuracy("2", ["two"] * 10, protocol="vqa_eval") == 0.0
    assert m.vqa_accuracy("2", ["two"] * 9 + ["2"], protocol="vqa_eval") == pytest.approx(0.3)
    with pytest.raises(ValueError):
        m.vqa_accuracy("a", ["a"], protocol="nope")


# ------------------------------------------------------------------------------------------ ANLS, ChartQA
def test_anls_case_whitespace_and_threshold():
    assert m.anls("The  Cat ", ["the cat"]) == 1.0
    assert m.anls("abcd", ["abef"]) == 0.5  # similarity exactly at the threshold is kept
    assert m.anls("abcde", ["abxyz"]) == 0.0  # 0.4 < 0.5
    assert m.anls("abc", ["abd"]) == pytest.approx(2 / 3)
    assert m.anls("abc", ["zzz", "abc"]) == 1.0  # best answer
    assert m.anls("abcd", ["abef"], threshold=0.6) == 0.0


def test_anls_normaliser_uses_raw_lengths():
    # distance on normalised strings (1) but length of the raw answer "ab  " (4): 1 - 1/4.
    assert m.anls("abc", ["ab  "]) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "pred,target,variant,expected",
    [
        ("10.4", "10", "pix2struct", 1.0),
        ("10.5", "10", "pix2struct", 1.0),  # exactly 5 %
        ("10.6", "10", "pix2struct", 0.0),
        ("5%", "5%", "pix2struct", 1.0),
        ("50%", "50", "pix2struct", 0.0),  # 0.5 vs 50
        ("50%", "50", "internvl", 1.0),  # % not divided
        ("0.5", "50%", "pix2struct", 1.0),
        ("0", "0", "pix2struct", 1.0),  # zero target: string match
        ("0.0", "0", "pix2struct", 0.0),
        ("Yes", "yes", "pix2struct", 1.0),  # non-numbers: case-insensitive equality
        ("Blue ", "blue", "pix2struct", 1.0),
        ("red", "blue", "pix2struct", 0.0),
        ("2019", "2020", "pix2struct", 1.0),  # years are numbers for pix2struct...
        ("2019", "2020", "internvl", 0.0),  # ...and strings for InternVL
    ],
)
def test_relaxed_accuracy(pred, target, variant, expected):
    assert m.relaxed_accuracy(pred, target, variant=variant) == expected


def test_chartqa_score_multiple_labels():
    assert m.chartqa_score("12", ["10", "12.3"]) == 1.0


# ------------------------------------------------------------------------------------------ POPE, GQA, SEED, SQA
@pytest.mark.parametrize(
    "text,parsed",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is not a cat", "no"),
        ("The answer is no.", "no"),
        ("Nope", "yes"),  # only the words No / no / not count
        ("Yes. No.", "yes"),  # first sentence only
        ("", "yes"),
    ],
)
def test_pope_parse(text, parsed):
    assert m.pope_parse(text) == parsed


def test_pope_metrics():
    out = m.pope_metrics(["Yes", "No", "yes", "No."], ["yes", "yes", "no", "no"])
    assert (out["TP"], out["FN"], out["FP"], out["TN"]) == (1, 1, 1, 1)
    assert out["accuracy"] == out["precision"] == out["recall"] == out["f1"] == out["yes_ratio"] == 0.5
    all_no = m.pope_metrics(["no", "no"], ["yes", "no"])
    assert all_no["precision"] == 0.0 and all_no["f1"] == 0.0 and all_no["yes_ratio"] == 0.0


def test_gqa_binary_and_open():
    rows = [
        {"prediction": "Yes.", "answer": "yes", "structural": "verify"},
        {"prediction": "no", "answer": "yes", "structural": "logical"},
        {"prediction": "left", "answer": "left", "structural": "choose"},
        {"prediction": "table", "answer": "chair", "structural": "query"},
    ]
    out = m.gqa_scores(rows)
    assert out == {"accuracy": 50.0, "binary": pytest.approx(200 / 3), "open": 0.0}
    assert m.gqa_scores([{"prediction": "a", "answer": "a"}]) == {"accuracy": 100.0, "binary": None, "open": None}


def test_gqa_and_seed_exact_match():
    assert m.gqa_accuracy("Yes.", "yes") == 1.0
    assert m.gqa_accuracy("the table", "table") == 0.0  # no article removal in GQA
    assert m.seed_correct("A", "A") == 1.0
    assert m.seed_correct("A.", "A") == 0.0


@pytest.mark.parametrize(
    "text,letter",
    [
        ("A", "A"),
        ("B. blue", "B"),
        ("The answer is C.", "C"),
        ("The answer is C. The answer is D.", "FAILED"),  # more than one match
        ("a", "FAILED"),
        ("B.blue", "FAILED"),
        ("the answer is C.", "FAILED"),  # case-sensitive
    ],
)
def test_scienceqa_parse(text, letter):
    assert m.scienceqa_parse(text) == letter


def test_scienceqa_correct_range_and_random():
    assert m.scienceqa_correct("B", 1, 3) == 1.0
    assert m.scienceqa_correct("E", 4, 3) == 0.0  # letter beyond the choices
    assert m.scienceqa_correct("nonsense", 0, 2) == 0.0
    rng = random.Random(0)
    picks = [m.scienceqa_correct("nonsense", 0, 2, failed="random", rng=rng) for _ in range(50)]
    assert 0 < sum(picks) < 50


# ------------------------------------------------------------------------------------------ MME
def test_mme_parse():
    assert m.mme_parse("Yes") == "yes"
    assert m.mme_parse("No, it is not") == "no"
    assert m.mme_parse("Not really") == "no"  # "no" in the first 4 characters
    assert m.mme_parse("Maybe yes") == "other"


def test_mme_acc_plus_and_totals():
    rows = [
        ("existence", "1.jpg", "Yes", "Yes"),
        ("existence", "1.jpg", "No", "no"),
        ("existence", "2.jpg", "Yes", "yes"),
        ("existence", "2.jpg", "No", "Yes"),  # image 2: one of two right
        ("code_reasoning", "9.png", "Yes", "Maybe"),
        ("code_reasoning", "9.png", "No", "No"),
    ]
    out = m.mme_scores([dict(zip(("category", "image", "label", "prediction"), r)) for r in rows])
    ex = out["subtasks"]["existence"]
    assert ex["acc"] == 75.0 and ex["acc_plus"] == 50.0 and ex["score"] == 125.0
    assert out["subtasks"]["code_reasoning"]["score"] == 50.0
    assert out["perception"] == 125.0 and out["cognition"] == 50.0 and out["total"] == 175.0
    # "Maybe" is neither yes nor no: MME's per-subtask "other" count
    assert (
        out["subtasks"]["code_reasoning"]["other_answers"] == 1 and out["subtasks"]["existence"]["other_answers"] == 0
    )
    assert out["other_answers"] == 1


# ------------------------------------------------------------------------------------------ MMBench, Q-Bench
CHOICES = {"A": "dog", "B": "cat", "C": "tree", "D": "car"}
ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "answer,letter",
    [
        ("B", "B"),
        ("The answer is C", "C"),
        ("(C) tree", "C"),
        ("A cat is sitting there", "B"),  # "A" is far from the end: not a letter; the option text decides
        ("a tree", "C"),
        ("It is either a dog or a cat", None),  # two option texts
        ("Cannot determine the answer", "Z"),  # refusal phrases
        ("Z", "Z"),  # no option letter but a lone Z
        ("Failed to obtain answer via API", None),
        ("hmm", None),
    ],
)
def test_mmbench_extract_vlmevalkit(answer, letter):
    assert m.mmbench_extract(answer, CHOICES) == letter


@pytest.mark.parametrize(
    "answer,letter",
    [
        # Rule 1: a lone option letter counts only among the last five tokens.
        ("I think the option is B", "B"),
        ("B is my choice after looking at the whole image carefully", None),
        # Rule 2: "answer is X" (case-insensitive, optional "correct", markdown bold) when the letters do not decide.
        ("The correct answer is **B** because the animal in the picture barks", "B"),  # B too early for rule 1
        ("The answer is C, not D.", "C"),  # two letters
        ("the answer is b", "B"),  # lower case
        ("My answer is apple", "A"),  # no word boundary after the letter, as the original pattern
        # Rule 3: option text refused when the answer is more than twice as long as all options together.
        ("After carefully examining every region of the picture I believe it shows a dog", None),
        ("It is a dog.", "B"),
        # Rule 4: "A" as a possible article is refused only in verbose mode (see the next test).
        ("The answer is A.", "A"),
    ],
)
def test_mmbench_extract_current_vlmevalkit_rules(answer, letter):
    assert m.mmbench_extract(answer, ANIMALS) == letter


def test_mmbench_article_guard_only_in_verbose_mode():
    assert m.mmbench_extract("The answer is A.", ANIMALS, verbose=True) is None
    # The guard returns at once: no "answer is X" fallback, then only the option text can decide.
    assert m.mmbench_extract("The answer is A, the cat", ANIMALS, verbose=True) == "A"
    assert m.mmbench_extract("I think the option is B", ANIMALS, verbose=True) == "B"  # no "A" token: no guard


def test_mmbench_extract_llava_differs():
    assert m.mmbench_extract("b.", CHOICES, method="llava") == "B"
    assert m.mmbench_extract("The answer is D.", CHOICES, method="llava") == "D"
    assert m.mmbench_extract("tre", CHOICES, method="llava") == "C"  # answer contained in one option
    assert m.mmbench_extract("tre", CHOICES) is None
    assert m.mmbench_extract("ca", CHOICES, method="llava") is None  # contained in two options


def test_mmbench_rotations_and_circular():
    assert m.mmbench_rotations(["a", "b", "c"]) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    rows = [
        {"group": 1, "correct": True, "category": "x"},
        {"group": 1, "correct": True, "category": "x"},
        {"group": 2, "correct": True, "category": "y"},
        {"group": 2, "correct": False, "category": "y"},  # one wrong rotation sinks the question
    ]
    out = m.mmbench_circular(rows)
    assert out["accuracy"] == 50.0 and out["questions"] == 2 and out["rows"] == 4
    assert out["category"] == {"x": 100.0, "y": 0.0}


def test_qbench_correct():
    assert m.qbench_correct("B. High", ["Low", "High"], "High") == 1.0
    assert m.qbench_correct("The quality is low", ["Low", "High"], "High") == 0.0


# ------------------------------------------------------------------------------------------ OCR family
def test_ocrbench_match_rules():
    assert m.ocrbench_match("The text is HELLO world", ["hello"]) == 1
    assert m.ocrbench_match("x ^ 2", ["x^2"], "HME100k") == 1  # spaces removed for formulas
    assert m.ocrbench_match("X^2", ["x^2"], "HME100k") == 0  # ...and case kept
    assert m.ocrbench_match("nothing", "something") == 0
    out = m.ocrbench_scores(
        [
            {"type": "Regular Text Recognition", "answers": ["a"], "prediction": "A"},
            {"type": "Doc-oriented VQA", "answers": ["b"], "prediction": "c"},
        ]
    )
    assert out["final"] == 1 and out["text_recognition"] == 1


def test_contains_match_funsd_sroie():
    assert m.contains_match("The company is ACME Ltd.", ["acme ltd"]) == 1.0
    assert m.contains_match("ACME", ["acme ltd"]) == 0.0


def test_kv_field_as_laytextllm_cuts_questions():
    assert m.kv_field("What is the company in this receipt?", "sroie") == " company "
    assert m.kv_field('What is the content in the "DATE:" field?', "funsd") == "DATE:"
    assert m.kv_field("Who signed?", "funsd") == "Who signed?"


def test_kv_fscore_micro_f1():
    rows = [
        # doc 1: "total" right after normalisation (case, spaces, punctuation), "date" wrong
        {"doc": "r1", "field": " total ", "answers": ["$ 12.50"], "prediction": "$12.50 total"},
        {"doc": "r1", "field": " date ", "answers": ["01-02-2019"], "prediction": "2019"},
        # doc 2: a prediction inside the ground truth is no false positive, but the truth is not found (FN)
        {"doc": "r2", "field": "company", "answers": ["ACME Trading Ltd"], "prediction": "ACME"},
    ]
    out = m.kv_fscore(rows)
    # TP: total (the truth is inside the prediction); yet the prediction is not inside the truth, so it is also a
    # FP (the two directions differ, as in the original). FN: date, company. "2019" lies inside "01022019" and
    # "acme" inside "acmetradingltd": no FP for them.
    assert (out["tp"], out["fp"], out["fn"]) == (1, 1, 2)
    assert out["precision"] == 0.5 and out["recall"] == pytest.approx(1 / 3) and out["f1"] == pytest.approx(0.4)
    wrong = m.kv_fscore([{"doc": "d", "field": "k", "answers": ["abc"], "prediction": "xyz"}])
    assert (wrong["tp"], wrong["fp"], wrong["fn"], wrong["f1"]) == (0, 1, 1, 0.0)


# ------------------------------------------------------------------------------------------ judge parsing
def test_mmvet_parse_and_totals():
    assert m.mmvet_parse_score("0.7") == 0.7
    assert m.mmvet_parse_score("1.0 because") == 1.0
    assert m.mmvet_parse_score("Correctness: 0.5") is None
    assert m.mmvet_parse_score("1.5") is None
    assert m.mmvet_parse_score(" 0.5") is None  # the first space-separated token is empty
    assert m.mmvet_parse_score(None) is None
    out = m.mmvet_scores([{"score": 1.0, "capability": ["ocr", "rec"]}, {"score": 0.5, "capability": ["rec"]}])
    assert out["total"] == 75.0 and out["capabilities"] == {"rec": 75.0, "ocr": 100.0}  # most questions first


def test_mmvet_rounding_and_capability_integration():
    rows = [
        {"score": 0.3, "capability": ["rec"]},
        {"score": 0.4, "capability": ["ocr", "rec"]},
        {"score": 0.0, "capability": ["rec"]},
        {"score": 1.0, "capability": ["rec", "ocr"]},  # the same combination as row 2
        {"score": 0.6, "capability": ["math", "ocr"]},
        {"score": 0.9, "capability": ["rec"]},
    ]
    out = m.mmvet_scores(rows)
    # total 3.2 / 6 = 53.333 -> 53.3; rec 2.6 / 5 = 52.0; ocr 2.0 / 3 = 66.666 -> 66.7; math 60.0
    assert out["total"] == 53.3
    assert list(out["capabilities"].items()) == [("rec", 52.0), ("ocr", 66.7), ("math", 60.0)]
    # combinations by count, named in the order their first question lists them
    assert list(out["capability_integration"].items()) == [("rec", 40.0), ("ocr_rec", 70.0), ("math_ocr", 60.0)]
    assert out["capability_integration_counts"] == {"rec": 3, "ocr_rec": 2, "math_ocr": 1}


def test_llava_bench_parse_and_relative_score():
    assert m.llava_bench_parse_score("8 9\nbecause") == [8.0, 9.0]
    assert m.llava_bench_parse_score("8,9") == [8.0, 9.0]
    assert m.llava_bench_parse_score("8 and 9") == [-1.0, -1.0]
    out = m.llava_bench_scores([{"category": "conv", "tuple": [8, 9]}, {"category": "detail", "tuple": [10, 5]}])
    assert {k: v["relative"] for k, v in out.items()} == {"all": 77.8, "conv": 112.5, "detail": 50.0}
    assert out["all"]["reference"] == 90.0 and out["all"]["model"] == 70.0  # the absolute scores, out of 100


def test_llava_bench_rounds_means_before_dividing():
    # Means 5.333... and 7.0: exact division gives 131.25 -> 131.2; the official rounds 5.333 first -> 131.3.
    rows = [{"category": "conv", "tuple": t} for t in ([5, 4], [5, 7], [6, 10])]
    conv = m.llava_bench_scores(rows)["conv"]
    assert conv == {"relative": 131.3, "reference": 53.3, "model": 70.0}
    # An unparsed review's [-1, -1] enters the means, as in the original.
    out = m.llava_bench_scores([{"category": "detail", "tuple": [8, 6]}, {"category": "detail", "tuple": [-1, -1]}])
    assert out["detail"] == {"relative": 71.4, "reference": 35.0, "model": 25.0}


def test_levenshtein():
    assert m.levenshtein("kitten", "sitting") == 3
    assert m.levenshtein("", "abc") == 3
