"""Scoring: hand-computed cases for every metric (no sklearn, no rouge-score)."""
import pytest

from runtime import metrics as M


def test_normalise():
    assert M.normalise("  Hello World \n") == "hello world"
    assert M.normalise("Bullish.\nBecause the stock rose", classification=True) == "bullish"
    assert M.normalise("\n  Governing Law<|im_end|>", classification=True) == "governing law"
    assert M.normalise("'Yes'!", classification=True) == "yes"
    assert M.normalise("top_up_limits</s>", classification=True) == "top_up_limits"
    assert M.normalise("STRASSE", classification=True) == M.normalise("straße", classification=True)
    assert M.normalise("", classification=True) == ""
    # generation keeps the whole answer, lines included (whitespace collapsed)
    assert M.normalise("A\n b.") == "a b."


def test_accuracy_and_exact_match():
    preds = ["Yes", "no.", "maybe", "Yes\nsince ..."]
    refs = ["yes", "No", "no", "yes"]
    assert M.accuracy(preds, refs) == pytest.approx(3 / 4)
    # exact match keeps punctuation and lines
    assert M.exact_match(preds, refs) == pytest.approx(1 / 4)
    assert M.exact_match([" The  Answer "], ["the answer"]) == 1.0
    with pytest.raises(ValueError):
        M.accuracy(["a"], ["a", "b"])


def test_macro_f1_hand_computed():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "zzz", "c"]
    # a: tp2 fp0 fn1 -> P1 R2/3 F 0.8 ; b: tp1 fp1 fn1 -> 0.5 ; c: 1.0
    # "zzz" is outside the label set: wrong for b, a false positive for no class.
    pc = M.per_class(preds, refs, labels=["a", "b", "c"])
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert pc["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["c"]["f1"] == 1.0
    assert "zzz" not in pc
    assert M.macro_f1(preds, refs, labels=["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 1.0) / 3)


def test_macro_f1_known_labels():
    refs = ["a", "a", "b"]
    preds = ["a", "d", "b"]
    # d is a known (train) label: a prediction of it is a false positive of class d (F1 0)
    pc = M.per_class(preds, refs, labels=["A", "b", "d", "e"])
    assert set(pc) == {"a", "b", "d"}          # e: no support, never predicted -> no F1, left out
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    f_a = 2 * 1.0 * 0.5 / 1.5
    assert M.macro_f1(preds, refs, labels=["a", "b", "d", "e"]) == pytest.approx((f_a + 1 + 0) / 3)
    # without d among known labels the same prediction is just wrong
    assert M.macro_f1(preds, refs) == pytest.approx((f_a + 1) / 2)
    # a perfect classifier scores 1 even when the known label set has unseen classes
    assert M.macro_f1(refs, refs, labels=["a", "b", "d", "e"]) == 1.0


def test_lcs_and_rouge_l_known_values():
    assert M.lcs_length("ABCBDAB", "BDCABA") == 4          # the textbook CLRS example
    assert M.lcs_length([], [1]) == 0
    # pred 4 tokens, ref 5 tokens, LCS "the cat on mat" = 4 -> P 1, R 0.8, F 8/9
    assert M.rouge_l_pair("the cat on mat", "The cat sat on mat") == pytest.approx(8 / 9)
    # the police killed the gunman / the gunman kill police: LCS "the gunman"?  ->
    # pred tokens: the police killed the gunman (5); ref: police kill the gunman (4)
    # LCS = police the gunman (3): P 3/5 R 3/4 F = 2/3
    assert M.rouge_l_pair("the police killed the gunman", "police kill the gunman") == \
        pytest.approx(2 / 3)
    assert M.rouge_l_pair("", "") == 1.0
    assert M.rouge_l_pair("x", "") == 0.0
    assert M.rouge_l_pair("a b", "c d") == 0.0
    assert M.rouge_l(["a b c", "x"], ["a b c", "y"]) == pytest.approx(0.5)


def test_score_dict():
    refs = ["Yes", "No", "No", "Yes"]
    preds = ["yes", "Yes", "no", "I think so"]
    prompts = ["p0", "p1", "x" * 500, "p3"]
    out = M.score("accuracy", preds, refs, labels=["no", "yes"], prompts=prompts)
    assert out["metric"] == "accuracy" and out["n"] == 4
    assert out["value"] == pytest.approx(0.5)
    assert set(out["per_class"]) == {"yes", "no"}
    assert [w["index"] for w in out["worst"]] == [1, 3]
    assert out["worst"][0] == {"index": 1, "prompt_tail": "p1", "reference": "No",
                               "prediction": "Yes", "score": 0.0}
    f1 = M.score("macro_f1", preds, refs, labels=["no", "yes"])
    assert f1["value"] == pytest.approx(M.macro_f1(preds, refs, ["no", "yes"]))
    r = M.score("rouge_l", ["a b", "c"], ["a b", "d e"], prompts=["q" * 300, "short"])
    assert "per_class" not in r and r["value"] == pytest.approx(0.5)
    assert r["worst"][0]["index"] == 1
    em = M.score("exact_match", ["a"], ["a"])
    assert em["value"] == 1.0 and em["worst"] == []
    long = M.score("exact_match", ["a"], ["b"], prompts=["z" * 500])
    assert long["worst"][0]["prompt_tail"] == "…" + "z" * 200
    with pytest.raises(ValueError, match="unknown metric"):
        M.score("bleu", [], [])
