"""Sparse distillation losses, chunked over positions.

The teacher is cached as its top-k next-token log-probs (plus the probability mass
outside them); the student is the full-vocab softmax of ``head(hidden)``. Both are
reduced to the same few *atoms* -- the k cached ids, optionally plus one "tail"
atom -- and a divergence is taken between the two atom distributions.

The student's [N, V] logits never exist at once: positions are processed
``chunk_size`` at a time. Two paths:

* fused (the head is a plain ``nn.Linear``, the usual LM head): `_FusedLinearDistill`
  computes each chunk's logits, its loss and the loss's gradient w.r.t. those logits in
  closed form (one pass over the vocabulary), then the gradients w.r.t. the hidden
  states, weight and bias -- all during forward. Backward only scales them. Three
  matmuls per chunk (as plain cross-entropy training), memory O(chunk x V + N x D + V x D).
* checkpointed (any other callable head): each chunk's vocab-sized work runs under
  ``torch.utils.checkpoint`` so that backward recomputes it instead of keeping
  [N, V] activations. Saved memory grows with N x (D + k) and chunk_size x V.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("fkl", "rkl", "skew-fkl", "skew-rkl", "jsd", "tvd")
UNDERFLOW_LOGP = -149 * math.log(2.0)  # log of float32's smallest positive value: the cache's resolution of a tail mass
TAIL_MODES = ("renorm", "bucket")


@dataclass
class SparseTargets:
    """Cached teacher distributions for N flattened target positions.

    ids:      int64 [N, k], most likely first; padded entries have logprob -inf.
    logprobs: float [N, k], teacher log-softmax at T=1 at ``ids``.
    tail:     float [N], teacher mass outside ``ids`` (0 when k = vocab).
    labels:   int64 [N], the actual next tokens (needed only when alpha < 1).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, sl: slice) -> SparseTargets:
        labels = None if self.labels is None else self.labels[sl]
        return SparseTargets(self.ids[sl], self.logprobs[sl], self.tail[sl], labels)


@dataclass
class DistillLossConfig:
    """loss = alpha * T^2 * divergence_T(teacher, student) + (1 - alpha) * CE(labels).

    loss: one of ``LOSSES``. skew: lambda of the skewed KLs. beta: JSD mixing weight.
    tail: "renorm" (both sides restricted to the k ids and renormalised) or "bucket"
    (a (k+1)-th atom holding the mass outside the ids on both sides).
    chunk_size: positions per chunk.
    fused: use the fused linear path when the head is a plain ``nn.Linear`` (see module doc).
    sampled: the targets are a sampled cache's unbiased estimate p̂ (``logprobs`` = log p̂,
    not renormalised; see `teacher_targets`). Only fkl at T = 1 with the bucket tail is sound.
    """

    loss: str = "fkl"
    alpha: float = 0.5
    temperature: float = 1.0
    skew: float = 0.1
    beta: float = 0.5
    tail: str = "bucket"
    chunk_size: int = 1024
    fused: bool = True
    sampled: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        for name in ("alpha", "skew", "beta"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {', '.join(TAIL_MODES)}; got {self.tail!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")
        if self.sampled and self.alpha > 0:
            for name, value, sound in (("loss", self.loss, "fkl"), ("temperature", self.temperature, 1.0), ("tail", self.tail, "bucket")):
                if value != sound:
                    raise ValueError(f"{name}={value!r} is not supported on a sampled cache (use {name}={sound!r}): "
                                     "only forward KL at T = 1 over the full vocabulary has an unbiased sampled estimate")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def student_atoms(
    logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, temperature: float, tail: str
) -> torch.Tensor:
    """Student log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    Invalid (padded) ids get -inf. In bucket mode the last atom is the exact mass
    outside the valid ids: logsumexp over the logits with those ids masked out.
    """
    z = _upcast(logits)
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, ids).masked_fill(~valid, -math.inf)
    if tail == "renorm":
        return picked.log_softmax(-1)
    vocab = z.shape[-1]
    hit = torch.zeros(z.shape[0], vocab + 1, dtype=torch.bool, device=z.device)
    hit = hit.scatter_(-1, torch.where(valid, ids, vocab), True)[:, :vocab]
    full = hit.all(-1, keepdim=True)  # every id cached: the tail is empty (and its grad must not be NaN)
    rest = z.masked_fill(hit, -math.inf).masked_fill(full, 0.0).logsumexp(-1, keepdim=True)
    rest = rest.masked_fill(full, -math.inf)
    return torch.cat([picked, rest], -1) - z.logsumexp(-1, keepdim=True)


def teacher_atoms(logprobs: torch.Tensor, tail_mass: torch.Tensor, temperature: float, tail: str) -> torch.Tensor:
    """Teacher log-probs at T over the atoms: [C, k] (renorm) or [C, k + 1] (bucket).

    renorm: softmax(logprobs / T) over the k ids (exact when k = vocab).
    bucket: weights exp(logprobs / T) and tail^(1/T), renormalised. This treats the
    tail as a single token, so it is exact at T = 1 (or when the tail is empty) and
    an approximation otherwise: the true tempered tail is sum_{v not cached} p_v^(1/T).
    """
    t = _upcast(logprobs) / temperature
    if tail == "bucket":
        log_tail = _upcast(tail_mass).clamp_min(0.0).log() / temperature
        t = torch.cat([t, log_tail.unsqueeze(-1)], -1)
    return t.log_softmax(-1)


def teacher_targets(logprobs: torch.Tensor, tail_mass: torch.Tensor, cfg: DistillLossConfig) -> torch.Tensor:
    """The teacher side of the divergence: `teacher_atoms`, or for a sampled cache log p̂ as stored.

    A sampled cache's p̂(v) = count(v)/N · p(v)/q(v) has E[p̂] = p; it is used as is (plus the
    bucket atom of mass `tail_mass`, the estimate's mass on ids the student cannot produce), never
    renormalised: Σ p̂ is 1 only when the proposal is p itself, and dividing by it would bias the
    estimate. Forward KL is linear in the teacher, so its gradient w.r.t. the student is then unbiased.
    """
    if not cfg.sampled:
        return teacher_atoms(logprobs, tail_mass, cfg.temperature, cfg.tail)
    log_tail = _upcast(tail_mass).clamp_min(0.0).log()
    return torch.cat([_upcast(logprobs), log_tail.unsqueeze(-1)], -1)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise a * (log a - log b), with 0 where a = 0 (value and grad NaN-free)."""
    zero = log_a.isneginf()
    log_a, log_b = log_a.masked_fill(zero, 0.0), log_b.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, log_a.exp() * (log_a - log_b))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b)."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, cfg: DistillLossConfig) -> torch.Tensor:
    """Per-position divergence [...] between teacher p and student q given as log-probs [..., atoms].

    fkl KL(p||q); rkl KL(q||p); skew-fkl KL(p || l*p + (1-l)*q); skew-rkl KL(q || l*q + (1-l)*p)
    (l = cfg.skew); jsd b*KL(p||m) + (1-b)*KL(q||m), m = b*p + (1-b)*q (b = cfg.beta);
    tvd 0.5 * sum |p - q|. Atoms where both sides are 0 contribute nothing. A teacher atom that
    is 0 where the student's is not can only be a float32 underflow of the cached tail mass (a
    softmax is never 0; padded ids are -inf on both sides): it is floored at float32's smallest
    value, 2^-149, so that reverse KL stays finite for a very confident teacher.
    """
    teacher_logp = torch.where(teacher_logp.isneginf() & ~student_logp.isneginf(), UNDERFLOW_LOGP, teacher_logp)
    dead = student_logp.isneginf() & teacher_logp.isneginf()
    q, p = student_logp.masked_fill(dead, 0.0), teacher_logp.masked_fill(dead, 0.0)
    if cfg.loss == "fkl":
        terms = _kl_terms(p, q)
    elif cfg.loss == "rkl":
        terms = _kl_terms(q, p)
    elif cfg.loss == "skew-fkl":
        terms = _kl_terms(p, _log_mix(p, q, cfg.skew))
    elif cfg.loss == "skew-rkl":
        terms = _kl_terms(q, _log_mix(q, p, cfg.skew))
    elif cfg.loss == "jsd":
        m = _log_mix(p, q, cfg.beta)
        terms = cfg.beta * _kl_terms(p, m) + (1.0 - cfg.beta) * _kl_terms(q, m)
    else:  # tvd
        terms = 0.5 * (p.exp() - q.exp()).abs()
    return terms.masked_fill(dead, 0.0).sum(-1)

# ---------------------------------------------------------------- fused linear path


def _fusable_linear(head: object) -> bool:
    """A plain ``nn.Linear`` whose forward is exactly ``F.linear(x, weight, bias)``.

    Subclasses that override forward (peft/quantised layers), modules with hooks or a
    patched forward (accelerate offload, DeepSpeed ZeRO-3, FSDP) and parameter
    subclasses (DTensor) go through the generic checkpointed path instead.
    """
    from torch.nn.modules import module as nn_module

    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return False
    if head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__:
        return False
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    return all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in (head.weight, head.bias) if p is not None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _exp_pass(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(z - rowmax) in place (z is consumed) and the row max [C]."""
    m = z.amax(-1)
    return z.sub_(m.unsqueeze(-1)).exp_(), m


def _fused_chunk(
    z: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    cfg: DistillLossConfig,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed (unnormalised) loss of one chunk and its gradient w.r.t. the logits ``z`` [C, V].

    ``z`` (at least fp32, owned by the caller) is overwritten: it becomes the gradient.
    The student side reduces to a few per-row scalars -- the picked logits z_ids/T, the
    log-sum-exp L_T of z/T, in bucket mode the log-sum-exp R of z/T over the non-cached
    ids, and for the cross-entropy the label logit and the log-sum-exp at T = 1. The
    divergence is differentiated w.r.t. those small leaves by autograd; the chain rule
    to z is closed form: dL_T/dz = softmax(z/T)/T, dR/dz = [v not cached] exp(z/T - R)/T,
    d(z_ids/T)/dz = one-hot/T. One exp pass over the vocabulary per temperature used.
    """
    temp, alpha = cfg.temperature, cfg.alpha
    kd, ce = alpha > 0, alpha < 1
    bucket = kd and cfg.tail == "bucket"
    rows = z.shape[0]

    label_logit = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) if ce else None
    picked = None
    if kd:
        picked = z.gather(-1, ids)
        if temp != 1.0:
            picked = picked / temp
        picked = picked.masked_fill(~valid, -math.inf)

    # Vocab passes. At T = 1 (or with alpha = 1 / renorm + CE at T = 1) one pass serves
    # the divergence and the cross-entropy; at T != 1 with CE, a second one at T = 1.
    dense: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (exp buffer, log-sum-exp, sum of exp)
    e_t = lse_t = rest_log = rest_sum = cached = total_t = None
    lse_1 = e_1 = total_1 = None
    need_t = bucket or (ce and temp == 1.0)
    if need_t:
        zt = z if temp == 1.0 or not ce else z / temp  # keep z for the T = 1 pass
        if temp != 1.0 and zt is z:
            zt = z.div_(temp)
        e_t, m_t = _exp_pass(zt)
        if bucket:
            cached = (picked - m_t.unsqueeze(-1)).exp()  # 0 at padded ids
            flat = (ids + torch.arange(rows, device=z.device).unsqueeze(-1) * z.shape[1])[valid]
            e_t.view(-1).index_fill_(0, flat, 0.0)  # exp over the non-cached ids only: exact tail
            rest_sum = e_t.sum(-1)
            total_t = rest_sum + cached.sum(-1)
            rest_log = rest_sum.log() + m_t
        else:
            total_t = e_t.sum(-1)
        lse_t = total_t.log() + m_t
    if ce:
        if temp == 1.0:
            lse_1, e_1, total_1 = lse_t, e_t, total_t
        else:
            e_1, m_1 = _exp_pass(z)
            total_1 = e_1.sum(-1)
            lse_1 = total_1.log() + m_1

    # The small graph: loss as a function of the per-row scalars. It lives only inside this
    # call, so outer saved-tensor hooks (CPU offload, probes) are kept out of it.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        leaves: dict[str, torch.Tensor] = {}

        def leaf(name: str, x: torch.Tensor) -> torch.Tensor:
            leaves[name] = x.detach().requires_grad_(need_grad)
            return leaves[name]

        total = z.new_zeros(())
        if kd:
            p = leaf("picked", picked)
            if bucket:
                lt = leaf("lse_t", lse_t)
                atoms = torch.cat([p, leaf("rest", rest_log).unsqueeze(-1)], -1) - lt.unsqueeze(-1)
            else:
                atoms = p.log_softmax(-1)
            teacher = teacher_targets(logprobs, tail_mass, cfg)
            total = total + alpha * temp**2 * divergence(atoms, teacher, cfg).sum()
        if ce:
            if temp != 1.0:
                l1 = leaf("lse_1", lse_1)
            else:  # the same log-sum-exp as the divergence's
                l1 = leaves["lse_t"] if "lse_t" in leaves else leaf("lse_t", lse_1)
            total = total + (1.0 - alpha) * (l1 - leaf("label", label_logit)).sum()
        if not need_grad:
            return total.detach(), None
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad(total, [leaves[n] for n in names]), strict=True))
    total = total.detach()

    # Chain rule to z: dense terms (coefficient per row times an exp buffer), then sparse ones.
    inv_t = 1.0 / temp
    grad = None
    if e_t is not None:
        coef = grads["lse_t"] / total_t  # softmax(z/T) = e_t / total_t (cached entries: sparse, below)
        if bucket:
            coef = coef + torch.where(rest_sum > 0, grads["rest"] / rest_sum, 0.0)
        if temp == 1.0:
            grad = e_t.mul_(coef.unsqueeze(-1))
        else:  # the divergence part, at T (CE at T = 1 is separate below)
            grad = e_t.mul_((coef * inv_t).unsqueeze(-1))
    if e_1 is not None and temp != 1.0:
        d1 = e_1.mul_((grads["lse_1"] / total_1).unsqueeze(-1))
        grad = d1 if grad is None else d1.add_(grad)
    if grad is None:  # renorm, alpha = 1: the gradient lives on the cached ids only
        grad = z.zero_()
    if kd:
        sparse = grads["picked"]
        if bucket:
            sparse = sparse + grads["lse_t"].unsqueeze(-1) * cached / total_t.unsqueeze(-1)
        if temp != 1.0:
            sparse = sparse * inv_t
        grad.scatter_add_(-1, ids, sparse.masked_fill(~valid, 0.0))
    if ce:
        grad.scatter_add_(-1, labels.unsqueeze(-1), grads["label"].unsqueeze(-1))
    return total, grad


class _FusedLinearDistill(torch.autograd.Function):
    """Sum over positions of the distillation loss of ``F.linear(hidden, weight, bias)``.

    Forward computes the gradients (w.r.t. whichever of hidden, weight, bias need one);
    backward scales them by the incoming gradient. ``grad_hidden`` [N, D] is saved for
    backward; the parameter-shaped weight/bias gradients are kept on ``ctx``, accumulated
    over chunks in at least fp32 and cast to the parameter's dtype at the end. Backward
    scales them in place and hands them over, so it can run only once per forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, tail_mass, labels, cfg):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        n = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.promote_types(torch.promote_types(hidden.dtype, torch.float32), acc))
        for start in range(0, n, cfg.chunk_size):
            sl = slice(start, start + cfg.chunk_size)
            h = hidden[sl]
            z = _upcast(F.linear(h, weight, bias))
            lp = logprobs[sl]
            loss, g = _fused_chunk(z, ids[sl], ~lp.isneginf(), None if labels is None else labels[sl],
                                   lp, tail_mass[sl], cfg, need_grad)
            total += loss
            if g is None:
                continue
            g_low = g.to(weight.dtype)
            if need_h:
                torch.mm(g_low, weight, out=grad_h[sl])
            if need_w:
                if g_low is g:
                    grad_w.addmm_(g.T, h.to(acc))
                else:  # low-precision matmul (as autograd would run it), fp32 accumulation across chunks
                    grad_w += g_low.T @ h
            if need_b:
                grad_b += g.sum(0)
            del z, g, g_low
        ctx.save_for_backward(grad_h)
        ctx.grad_weight = None if grad_w is None else grad_w.to(weight.dtype)
        ctx.grad_bias = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.consumed = False
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("the fused distillation loss can be backpropagated only once (no retain_graph)")
        ctx.consumed = True
        (grad_h,) = ctx.saved_tensors
        grad_w, grad_b = ctx.grad_weight, ctx.grad_bias
        ctx.grad_weight = ctx.grad_bias = None
        scale = grad_out.reshape(())
        grad_h = None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(scale.to(grad_w.dtype))
        grad_b = None if grad_b is None else grad_b.mul_(scale.to(grad_b.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ---------------------------------------------------------------- generic (checkpointed) path


def _student_chunk(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: DistillLossConfig,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The vocab-sized part of one chunk: student atoms at T and per-position CE at T=1."""
    logits = _upcast(head(hidden))
    atoms = student_atoms(logits, ids, valid, cfg.temperature, cfg.tail) if cfg.alpha > 0 else None
    ce = F.cross_entropy(logits, labels, reduction="none") if cfg.alpha < 1 else None
    return atoms, ce


def distill_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: SparseTargets,
    cfg: DistillLossConfig,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss summed over the N positions, divided by ``num_items`` (default N).

    hidden: [N, D] student hidden states (or logits, with ``head = lambda x: x``);
    head maps a [C, D] chunk to [C, V] logits; a plain ``nn.Linear`` takes the fused path
    (unless ``cfg.fused`` is False), anything else the checkpointed one. Pass Trainer's ``num_items_in_batch``
    as ``num_items`` for correct gradient accumulation.
    """
    n = hidden.shape[0]
    if cfg.alpha < 1 and targets.labels is None:
        raise ValueError("targets.labels is required when alpha < 1")
    if n == 0:
        return hidden.sum() * 0.0
    if cfg.fused and _fusable_linear(head):
        labels = targets.labels if cfg.alpha < 1 else None
        total = _FusedLinearDistill.apply(hidden, head.weight, head.bias, targets.ids, targets.logprobs,
                                          targets.tail, labels, cfg)
        return total / (n if num_items is None else num_items)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, n, cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        chunk = targets[sl]
        valid = ~chunk.logprobs.isneginf()
        atoms, ce = checkpoint(_student_chunk, head, hidden[sl], chunk.ids, valid, chunk.labels, cfg, use_reentrant=False)
        if cfg.alpha > 0:
            teacher = teacher_targets(chunk.logprobs, chunk.tail, cfg)
            total = total + cfg.alpha * cfg.temperature**2 * divergence(atoms, teacher, cfg).sum()
        if cfg.alpha < 1:
            total = total + (1.0 - cfg.alpha) * ce.sum()
    return total / (n if num_items is None else num_items)
