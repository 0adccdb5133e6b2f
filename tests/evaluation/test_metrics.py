"""Each evaluation metric against a value computed by hand on tiny inputs (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdpipe.data.templates import get_template
from kdpipe.evaluation import metrics
from kdpipe.evaluation.checkers import make_checker
from kdpipe.evaluation.tasks import parse_label


def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", None]  # None: an unparsable answer
    assert metrics.accuracy(gold, pred) == pytest.approx(3 / 5)
    # a: TP1 FP0 FN1 -> 2/3; b: TP2 FP1 FN0 -> 4/5; c: TP0 FP0 FN1 -> 0
    assert metrics.macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # a label neither in gold nor predicted is not averaged in
    assert metrics.macro_f1(gold, pred, ["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert metrics.macro_f1(["x", "y"], ["x", "y"]) == 1.0


def test_exact_match_and_perplexity_by_hand():
    assert metrics.exact_match([True, False, True, True]) == 0.75
    # two tokens with p = 1/2 and 1/4: ppl = exp((ln 2 + ln 4) / 2) = sqrt(8)
    assert metrics.perplexity(math.log(2) + math.log(4), 2) == pytest.approx(math.sqrt(8))


def test_ece_by_hand():
    conf = np.array([0.95, 0.85, 0.3, 0.25])
    correct = np.array([1, 0, 1, 0])
    # 10 bins: (0.9,1] |1-.95|*1/4; (0.8,0.9] |0-.85|*1/4; (0.2,0.3] |0.5-0.275|*2/4
    assert metrics.ece(conf, correct, bins=10) == pytest.approx(0.05 / 4 + 0.85 / 4 + 0.225 / 2)
    assert metrics.ece(np.array([1.0, 0.0]), np.array([1, 0]), bins=10) == pytest.approx(0.0)


def _student(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_fidelity_kl_agreement_recall_by_hand():
    q = [0.45, 0.35, 0.15, 0.05]  # the student at every position (argmax 0, top-2 {0, 1})
    student = _student([q, q, q])
    ids = torch.tensor([[0, 1], [2, 3], [1, 3]])
    p = torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.5, 0.2]], dtype=torch.float64)
    tail = torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    s = metrics.fidelity_stats(student, ids, p.log(), tail, labels)
    # k+1 atoms: teacher (p1, p2, tail) vs student (q[id1], q[id2], rest)
    kl0 = 0.5 * math.log(0.5 / 0.45) + 0.3 * math.log(0.3 / 0.35) + 0.2 * math.log(0.2 / 0.2)
    kl1 = 0.6 * math.log(0.6 / 0.15) + 0.3 * math.log(0.3 / 0.05) + 0.1 * math.log(0.1 / 0.80)
    kl2 = 0.5 * math.log(0.5 / 0.35) + 0.2 * math.log(0.2 / 0.05) + 0.3 * math.log(0.3 / 0.60)
    assert s["kl"].tolist() == pytest.approx([kl0, kl1, kl2], abs=1e-9)
    assert s["agree"].tolist() == [1.0, 0.0, 0.0]
    assert s["recall"].tolist() == [1.0, 0.0, 0.5]
    assert s["confidence"].tolist() == pytest.approx([0.45] * 3)
    assert s["correct"].tolist() == [1.0, 0.0, 0.0]
    assert s["nll"].tolist() == pytest.approx([-math.log(0.45), -math.log(0.15), -math.log(0.35)])
    summary = metrics.summarize_fidelity({k: v.numpy() for k, v in s.items()})
    assert summary["kl"] == pytest.approx((kl0 + kl1 + kl2) / 3)
    assert summary["top1_agreement"] == pytest.approx(1 / 3)
    assert summary["topk_recall"] == pytest.approx(0.5)
    assert summary["positions"] == 3


def test_kl_is_zero_for_the_teacher_and_the_full_kl_when_k_is_the_vocabulary():
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    order = torch.tensor([[3, 2, 1, 0]])
    top2 = metrics.fidelity_stats(q.log(), order[:, :2], q.gather(1, order[:, :2]).log(), torch.tensor([0.3]), torch.tensor([3]))
    assert top2["kl"].item() == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    full = metrics.fidelity_stats(q.log(), torch.tensor([[0, 1, 2, 3]]), p.log(), torch.tensor([0.0]), torch.tensor([0]))
    assert full["kl"].item() == pytest.approx(float((p * (p / q).log()).sum()))


def test_teacher_ids_beyond_the_student_vocabulary_join_the_tail():
    q = [0.45, 0.35, 0.15, 0.05]
    s = metrics.fidelity_stats(_student([q]), torch.tensor([[0, 5]]), torch.tensor([[0.7, 0.1]]).double().log(),
                               torch.tensor([0.2]).double(), torch.tensor([0]))
    expected = 0.7 * math.log(0.7 / 0.45) + 0.3 * math.log(0.3 / 0.55)
    assert s["kl"].item() == pytest.approx(expected)


def test_parse_label():
    names = ["negative", "positive"]
    assert parse_label(" positive", names) == "positive"
    assert parse_label("<think>\nSentiment: great\n</think>\nSentiment: Negative.", names) == "negative"
    assert parse_label("I think it is good", names) is None
    assert parse_label("", names) is None


def test_checkers(tmp_path):
    arith = get_template("arithmetic")
    fields = {"instruction": "12", "output": "7 + 5"}
    assert make_checker(None, arith)(fields, " 4 + 8", "")  # built-in: any positive sum
    assert not make_checker(None, arith)(fields, " 4 + 9", "")
    exact = make_checker(None, get_template("alpaca"))
    assert exact(fields, " 7 + 5\n", " 7 + 5") and not exact(fields, "4 + 8", " 7 + 5")
    regex = make_checker(r"regex:\d+ \+ \d+ = {instruction}", arith)
    assert regex(fields, " 7 + 5 = 12 ", "") and not regex(fields, "7 + 5 = 13", "")
    file = tmp_path / "check.py"
    file.write_text("def same(fields, answer):\n    return answer.strip() == fields['output']\n")
    custom = make_checker(f"{file}:same", arith)
    assert custom(fields, " 7 + 5", "") and not custom(fields, "5 + 7", "")
    from kdpipe.errors import KdpipeError

    with pytest.raises(KdpipeError, match="no function"):
        make_checker(f"{file}:missing", arith)
    with pytest.raises(KdpipeError, match="not a valid regular expression"):
        make_checker("regex:(", arith)
    with pytest.raises(KdpipeError, match="unknown --checker"):
        make_checker("bogus", arith)
