"""The distillation loss against values computed by hand (plain Python floats, no torch)."""

from __future__ import annotations

import math

import pytest


def softmax(xs: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# One sequence of 3 tokens over a vocabulary of 3: positions 0 and 1 predict labels 1 and 2.
STUDENT = [[1.0, 2.0, 0.5], [0.2, -1.0, 1.5], [0.0, 0.0, 0.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.1, 2.5], [9.0, 9.0, 9.0]]
LABELS = [7, 1, 2]  # the first label is never scored (nothing predicts it)


def hand_loss(alpha: float, t: float, reverse: bool = False) -> float:
    kds, ces = [], []
    for pos, label in ((0, LABELS[1]), (1, LABELS[2])):
        p_t, p_s = softmax(TEACHER[pos], t), softmax(STUDENT[pos], t)
        kds.append(kl(p_s, p_t) if reverse else kl(p_t, p_s))
        ces.append(-math.log(softmax(STUDENT[pos])[label]))
    kd, ce = sum(kds) / 2, sum(ces) / 2  # batchmean over the two scored tokens
    return alpha * t * t * kd + (1 - alpha) * ce


def torch_loss(alpha: float, t: float, **kw):
    import torch
    from llmpress.components.stages.distill.loss import distill_loss

    student = torch.tensor([STUDENT])
    teacher = torch.tensor([TEACHER])
    loss, parts = distill_loss(student, torch.tensor([LABELS]), alpha, t, teacher_logits=teacher, **kw)
    return float(loss), parts


@pytest.mark.parametrize("alpha,t", [(0.5, 2.0), (0.9, 1.0), (0.3, 4.0), (1.0, 2.0)])
def test_loss_matches_the_hand_computed_value(alpha, t):
    loss, _ = torch_loss(alpha, t)
    assert loss == pytest.approx(hand_loss(alpha, t), rel=1e-6)


def test_reverse_kl_matches_the_hand_computed_value():
    loss, _ = torch_loss(0.7, 2.0, reverse=True)
    assert loss == pytest.approx(hand_loss(0.7, 2.0, reverse=True), rel=1e-6)
    assert loss != pytest.approx(hand_loss(0.7, 2.0), rel=1e-3)


def test_alpha_zero_is_plain_next_token_cross_entropy():
    import torch
    from llmpress.components.stages.distill.loss import distill_loss

    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    loss, parts = distill_loss(logits, labels, 0.0, 2.0)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert "kd" not in parts


def test_ignored_labels_are_left_out_of_both_terms():
    import torch
    from llmpress.components.stages.distill.loss import distill_loss

    student, teacher = torch.tensor([STUDENT]), torch.tensor([TEACHER])
    masked = torch.tensor([[7, 1, -100]])  # only position 0 is scored now
    loss, _ = distill_loss(student, masked, 0.5, 2.0, teacher_logits=teacher)
    p_t, p_s = softmax(TEACHER[0], 2.0), softmax(STUDENT[0], 2.0)
    expected = 0.5 * 4 * kl(p_t, p_s) + 0.5 * -math.log(softmax(STUDENT[0])[1])
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss():
    import torch

    values, indices = torch.topk(torch.tensor([TEACHER]), 3, dim=-1)
    full, _ = torch_loss(0.5, 2.0)
    topk, _ = torch_loss(0.5, 2.0, teacher_topk=(values, indices))
    assert topk == pytest.approx(full, rel=1e-6)


def test_top_k_renormalizes_the_teacher_over_its_k_tokens():
    import torch
    from llmpress.components.stages.distill.loss import distill_loss

    values, indices = torch.topk(torch.tensor([TEACHER]), 2, dim=-1)
    loss, parts = distill_loss(torch.tensor([STUDENT]), torch.tensor([LABELS]), 1.0, 1.0, teacher_topk=(values, indices))
    kds = []
    for pos in (0, 1):
        top = sorted(range(3), key=lambda i: -TEACHER[pos][i])[:2]
        p_t = softmax([TEACHER[pos][i] for i in top])
        log_q = [math.log(softmax(STUDENT[pos])[i]) for i in top]
        kds.append(sum(p * (math.log(p) - lq) for p, lq in zip(p_t, log_q, strict=True)))
    assert float(loss) == pytest.approx(sum(kds) / 2, rel=1e-6)
