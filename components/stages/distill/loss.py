"""The distillation loss, exactly as the design gives it:

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T))  +  (1 - alpha) * CE(s, labels)

Both terms are per-token averages: every (sequence, position) that has a label is one
element of the batch, so ``batchmean`` is the KL summed over the vocabulary and
averaged over those tokens, and CE is averaged over the same tokens. ``T^2`` keeps the
soft term's gradient on the scale of the hard term's as T grows (Hinton et al., 2015).

Options: ``reverse`` KL (``KL(student || teacher)``, mode-seeking), and teacher logits
kept only for their ``top_k`` tokens (what the teacher-logit cache stores).
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def shift_for_next_token(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Position i predicts token i+1: (logits[:, :-1], labels[:, 1:], mask of kept tokens)."""
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    return logits, labels, labels != IGNORE_INDEX


def distill_loss(
    student_logits: Any,
    labels: Any,
    alpha: float,
    temperature: float,
    teacher_logits: Any | None = None,
    teacher_topk: tuple[Any, Any] | None = None,
    reverse: bool = False,
) -> tuple[Any, dict[str, float]]:
    """The combined loss and its parts (``kd``, ``ce``, both before weighting).

    ``student_logits`` [B, L, V] and ``labels`` [B, L] are unshifted (the model's own
    convention); ``teacher_logits`` [B, L, V] is the full teacher output, or
    ``teacher_topk`` = (values [B, L, k], indices [B, L, k]) its top-k logits. With
    ``alpha == 0`` no teacher is needed: plain next-token cross-entropy.
    """
    import torch.nn.functional as F

    s, y, mask = shift_for_next_token(student_logits, labels)
    s = s[mask].float()  # [N, V]: one row per scored token
    y = y[mask]
    ce = F.cross_entropy(s, y)
    parts = {"ce": float(ce.detach())}
    if alpha == 0:
        return ce, parts
    if teacher_topk is not None:
        values, indices = (t[:, :-1][mask] for t in teacher_topk)
        kd = _kl_topk(s, values.float(), indices.long(), temperature, reverse)
    elif teacher_logits is not None:
        kd = _kl_full(s, teacher_logits[:, :-1][mask].float(), temperature, reverse)
    else:
        raise ValueError("alpha > 0 needs teacher_logits or teacher_topk")
    parts["kd"] = float(kd.detach())
    return alpha * temperature**2 * kd + (1 - alpha) * ce, parts


def _kl_full(s: Any, t: Any, temperature: float, reverse: bool) -> Any:
    import torch.nn.functional as F

    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    if reverse:  # KL(student || teacher)
        return F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def _kl_topk(s: Any, values: Any, indices: Any, temperature: float, reverse: bool) -> Any:
    """KL on the teacher's top-k support. Forward: the teacher renormalized over its k
    tokens against the student's full-vocabulary log-probabilities at those tokens
    (mass the student puts elsewhere is penalized through the softmax). Reverse: both
    renormalized over the k tokens, since the teacher's mass elsewhere is unknown."""
    import torch
    import torch.nn.functional as F

    log_t = F.log_softmax(values / temperature, dim=-1)
    if reverse:
        log_s = F.log_softmax(torch.gather(s, -1, indices) / temperature, dim=-1)
        return F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    log_s = torch.gather(F.log_softmax(s / temperature, dim=-1), -1, indices)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
