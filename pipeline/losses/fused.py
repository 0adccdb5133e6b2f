"""The fused linear path: loss and gradients of ``F.linear(hidden, weight, bias)`` chunk by chunk, in forward.

`_FusedLinearDistill` computes each chunk's logits, its loss and the loss's gradient w.r.t. those logits
in closed form (one pass over the vocabulary per temperature used), then the gradients w.r.t. the
hidden states, weight and bias -- all during forward. Backward only scales them. Three matmuls per
chunk (as plain cross-entropy training), memory O(chunk x V + N x D + V x D).

One chunk (`_fused_chunk`) is three steps:

1. `_student_sums`: the student side reduced to a few per-row scalars -- the picked logits z_ids/T,
   the log-sum-exp L_T of z/T, in bucket mode the log-sum-exp R of z/T over the non-cached ids, and
   for the cross-entropy the label logit and the log-sum-exp at T = 1 -- keeping the exp buffers.
2. `_loss_on_sums`: the loss as a function of those scalars, differentiated by autograd w.r.t. them.
3. `_grad_logits`: the chain rule to the logits z in closed form: dL_T/dz = softmax(z/T)/T,
   dR/dz = [v not cached] exp(z/T - R)/T, d(z_ids/T)/dz = one-hot/T, written into the exp buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.losses.atoms import teacher_targets, upcast
from kdpipe.losses.config import DistillLossConfig
from kdpipe.losses.divergences import divergence


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
    params = (head.weight, head.bias)
    return all(type(p) in (torch.nn.Parameter, torch.Tensor) for p in params if p is not None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _exp_pass(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(z - rowmax) in place (z is consumed) and the row max [C]."""
    m = z.amax(-1)
    return z.sub_(m.unsqueeze(-1)).exp_(), m


@dataclass
class _StudentSums:
    """One chunk's student side as per-row scalars, plus the exp buffers the gradient is written into.

    C rows, k cached ids, V the vocabulary; ``None`` where the configuration does not need it.
    """

    zero: torch.Tensor  # 0-d, the logits' dtype and device: the loss sums start from it
    picked: torch.Tensor | None = None  # [C, k] z_ids / T, -inf at padded ids
    label: torch.Tensor | None = None  # [C] the label's logit (T = 1)
    e_t: torch.Tensor | None = None  # [C, V] exp(z/T - max); 0 at the cached ids in bucket mode
    total_t: torch.Tensor | None = None  # [C] sum of exp(z/T - max) over the whole vocabulary
    lse_t: torch.Tensor | None = None  # [C] log-sum-exp of z/T
    cached: torch.Tensor | None = None  # [C, k] exp(picked - max) (bucket), 0 at padded ids
    rest_sum: torch.Tensor | None = None  # [C] sum of exp(z/T - max) over the non-cached ids (bucket)
    rest_log: torch.Tensor | None = None  # [C] their log-sum-exp R (bucket)
    e_1: torch.Tensor | None = None  # [C, V] exp(z - max) at T = 1 (cross-entropy; e_t when T = 1)
    total_1: torch.Tensor | None = None  # [C]
    lse_1: torch.Tensor | None = None  # [C] log-sum-exp of z


def _student_sums(z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None,
                  cfg: DistillLossConfig) -> _StudentSums:
    """Step 1: gather the picked and label logits, then the exp passes over the vocabulary (z is consumed).

    At T = 1 (or with renorm + CE at T = 1) one pass serves the divergence and the cross-entropy; at
    T != 1 with CE, a second one at T = 1. Renorm without CE needs no pass at all.
    """
    temp, kd, ce = cfg.temperature, cfg.alpha > 0, cfg.alpha < 1
    bucket = kd and cfg.tail == "bucket"
    s = _StudentSums(zero=z.new_zeros(()))
    if ce:
        s.label = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if kd:
        picked = z.gather(-1, ids)
        if temp != 1.0:
            picked = picked / temp
        s.picked = picked.masked_fill(~valid, -math.inf)
    if bucket or (ce and temp == 1.0):
        if temp == 1.0:
            zt = z
        elif ce:
            zt = z / temp  # keep z for the T = 1 pass
        else:
            zt = z.div_(temp)
        s.e_t, m_t = _exp_pass(zt)
        if bucket:
            s.cached = (s.picked - m_t.unsqueeze(-1)).exp()  # 0 at padded ids
            flat = (ids + torch.arange(z.shape[0], device=z.device).unsqueeze(-1) * z.shape[1])[valid]
            s.e_t.view(-1).index_fill_(0, flat, 0.0)  # exp over the non-cached ids only: exact tail
            s.rest_sum = s.e_t.sum(-1)
            s.total_t = s.rest_sum + s.cached.sum(-1)
            s.rest_log = s.rest_sum.log() + m_t
        else:
            s.total_t = s.e_t.sum(-1)
        s.lse_t = s.total_t.log() + m_t
    if ce:
        if temp == 1.0:
            s.lse_1, s.e_1, s.total_1 = s.lse_t, s.e_t, s.total_t
        else:
            s.e_1, m_1 = _exp_pass(z)
            s.total_1 = s.e_1.sum(-1)
            s.lse_1 = s.total_1.log() + m_1
    return s


def _loss_on_sums(s: _StudentSums, logprobs: torch.Tensor, tail_mass: torch.Tensor, cfg: DistillLossConfig,
                  need_grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Step 2: the chunk's summed loss from the per-row scalars, and its gradient w.r.t. each of them.

    Returns (loss, {"picked" [C, k], "lse_t", "rest", "lse_1", "label" [C]: gradient}), only the
    scalars used; no gradients when not `need_grad`. The small graph lives only inside this call, so
    outer saved-tensor hooks (CPU offload, probes) are kept out of it.
    """
    temp, alpha = cfg.temperature, cfg.alpha
    kd, ce = alpha > 0, alpha < 1
    bucket = kd and cfg.tail == "bucket"
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
        leaves: dict[str, torch.Tensor] = {}

        def leaf(name: str, x: torch.Tensor) -> torch.Tensor:
            leaves[name] = x.detach().requires_grad_(need_grad)
            return leaves[name]

        total = s.zero
        if kd:
            p = leaf("picked", s.picked)
            if bucket:
                lt = leaf("lse_t", s.lse_t)
                atoms = torch.cat([p, leaf("rest", s.rest_log).unsqueeze(-1)], -1) - lt.unsqueeze(-1)
            else:
                atoms = p.log_softmax(-1)
            teacher = teacher_targets(logprobs, tail_mass, cfg)
            total = total + alpha * temp**2 * divergence(atoms, teacher, cfg).sum()
        if ce:
            if temp != 1.0:
                l1 = leaf("lse_1", s.lse_1)
            else:  # the same log-sum-exp as the divergence's
                l1 = leaves["lse_t"] if "lse_t" in leaves else leaf("lse_t", s.lse_1)
            total = total + (1.0 - alpha) * (l1 - leaf("label", s.label)).sum()
        if not need_grad:
            return total.detach(), None
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad(total, [leaves[n] for n in names]), strict=True))
    return total.detach(), grads


def _grad_logits(z: torch.Tensor, s: _StudentSums, grads: dict[str, torch.Tensor], ids: torch.Tensor,
                 valid: torch.Tensor, labels: torch.Tensor | None, cfg: DistillLossConfig) -> torch.Tensor:
    """Step 3: the chain rule to the logits [C, V], in place in the exp buffers (or in z when none).

    Dense terms first (a coefficient per row times an exp buffer), then the sparse ones at the cached
    ids and the labels.
    """
    temp = cfg.temperature
    kd, ce = cfg.alpha > 0, cfg.alpha < 1
    bucket = kd and cfg.tail == "bucket"
    inv_t = 1.0 / temp
    grad = None
    if s.e_t is not None:
        coef = grads["lse_t"] / s.total_t  # softmax(z/T) = e_t / total_t (cached entries: sparse, below)
        if bucket:
            coef = coef + torch.where(s.rest_sum > 0, grads["rest"] / s.rest_sum, 0.0)
        if temp == 1.0:
            grad = s.e_t.mul_(coef.unsqueeze(-1))
        else:  # the divergence part, at T (CE at T = 1 is separate below)
            grad = s.e_t.mul_((coef * inv_t).unsqueeze(-1))
    if s.e_1 is not None and temp != 1.0:
        d1 = s.e_1.mul_((grads["lse_1"] / s.total_1).unsqueeze(-1))
        grad = d1 if grad is None else d1.add_(grad)
    if grad is None:  # renorm, alpha = 1: the gradient lives on the cached ids only
        grad = z.zero_()
    if kd:
        sparse = grads["picked"]
        if bucket:
            sparse = sparse + grads["lse_t"].unsqueeze(-1) * s.cached / s.total_t.unsqueeze(-1)
        if temp != 1.0:
            sparse = sparse * inv_t
        grad.scatter_add_(-1, ids, sparse.masked_fill(~valid, 0.0))
    if ce:
        grad.scatter_add_(-1, labels.unsqueeze(-1), grads["label"].unsqueeze(-1))
    return grad


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

    ``z`` (at least fp32, owned by the caller) is overwritten: it becomes the gradient. ids, valid,
    logprobs [C, k]; labels (None when alpha = 1) and tail_mass [C]. See the module doc for the steps.
    """
    sums = _student_sums(z, ids, valid, labels, cfg)
    total, grads = _loss_on_sums(sums, logprobs, tail_mass, cfg, need_grad)
    if grads is None:
        return total, None
    return total, _grad_logits(z, sums, grads, ids, valid, labels, cfg)


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
        total_dtype = torch.promote_types(torch.promote_types(hidden.dtype, torch.float32), acc)
        total = hidden.new_zeros((), dtype=total_dtype)
        for start in range(0, n, cfg.chunk_size):
            sl = slice(start, start + cfg.chunk_size)
            h = hidden[sl]
            z = upcast(F.linear(h, weight, bias))
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
            raise RuntimeError("the fused distillation loss can be backpropagated only once "
                               "(no retain_graph)")
        ctx.consumed = True
        (grad_h,) = ctx.saved_tensors
        grad_w, grad_b = ctx.grad_weight, ctx.grad_bias
        ctx.grad_weight = ctx.grad_bias = None
        scale = grad_out.reshape(())
        grad_h = None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(scale.to(grad_w.dtype))
        grad_b = None if grad_b is None else grad_b.mul_(scale.to(grad_b.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None, None
