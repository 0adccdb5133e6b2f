"""Sparse distillation losses against an independent dense reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from kdpipe.losses import (
    LOSSES,
    DistillLossConfig,
    SparseTargets,
    distill_loss,
    divergence,
    student_atoms,
    teacher_atoms,
)

TAILS = ("renorm", "bucket")
F64 = torch.float64
N, V, D = 7, 11, 5


def identity(x):
    return x


# ---------------------------------------------------------------- dense reference


def ref_kl(a, b):
    return kl_divergence(Categorical(probs=a), Categorical(probs=b))


def ref_divergence(name, p, q, skew, beta):
    """Divergence between probability vectors p (teacher) and q (student), [N, A] -> [N]."""
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "skew-fkl":
        return ref_kl(p, skew * p + (1 - skew) * q)
    if name == "skew-rkl":
        return ref_kl(q, skew * q + (1 - skew) * p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    assert name == "tvd"
    return sum(0.5 * (p[:, a] - q[:, a]).abs() for a in range(p.shape[1]))


def ref_atoms(zt, zs, T, k, tail):
    """Dense teacher/student probabilities over the atoms used by the sparse loss."""
    p_full, q_full = torch.softmax(zt / T, -1), torch.softmax(zs / T, -1)
    if k == zt.shape[-1]:
        return p_full, q_full
    ids = zt.topk(k, -1).indices
    cached = torch.zeros_like(zt, dtype=torch.bool).scatter(-1, ids, True)
    if tail == "renorm":
        p, q = p_full.gather(-1, ids), q_full.gather(-1, ids)
        return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    # bucket: teacher at T treats its exact T=1 tail as one atom, p_i^(1/T) and tail^(1/T) renormalised
    p1 = torch.softmax(zt, -1)
    w = torch.cat([p1.gather(-1, ids), torch.where(cached, 0.0, p1).sum(-1, keepdim=True)], -1) ** (1 / T)
    q = torch.cat([q_full.gather(-1, ids), torch.where(cached, 0.0, q_full).sum(-1, keepdim=True)], -1)
    return w / w.sum(-1, keepdim=True), q


def ref_loss(zt, zs, labels, cfg, k):
    p, q = ref_atoms(zt, zs, cfg.temperature, k, cfg.tail)
    div = ref_divergence(cfg.loss, p, q, cfg.skew, cfg.beta).mean()
    return cfg.alpha * cfg.temperature**2 * div + (1 - cfg.alpha) * F.cross_entropy(zs, labels)


# ---------------------------------------------------------------- fixtures


def make_targets(zt, k, labels=None):
    """Cache the teacher's top-k (all of it when k = V) in the sparse format."""
    lp, ids = zt.log_softmax(-1).sort(-1, descending=True)
    return SparseTargets(ids[:, :k], lp[:, :k], lp[:, k:].exp().sum(-1), labels)


def problem(seed=0, n=N, v=V, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    zt = 2 * torch.randn(n, v, generator=g, dtype=dtype)
    zs = 2 * torch.randn(n, v, generator=g, dtype=dtype)
    labels = torch.randint(v, (n,), generator=g)
    return zt, zs, labels


def loss_and_grad(fn, *inputs):
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def cfg_for(loss, tail, T, **kw):
    kw = {"alpha": 1.0, "skew": 0.3, "beta": 0.7, "chunk_size": 3} | kw
    return DistillLossConfig(loss=loss, tail=tail, temperature=T, **kw)


def assert_matches(sparse, dense, rtol=1e-9, atol=1e-11):
    (l1, g1), (l2, g2) = sparse, dense
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("k", [V, 4], ids=["full", "topk"])
def test_matches_dense_reference_on_logits(loss, tail, T, k):
    zt, zs, labels = problem()
    cfg = cfg_for(loss, tail, T)
    t = make_targets(zt, k, labels)
    sparse = loss_and_grad(lambda z: distill_loss(z, identity, t, cfg), zs.requires_grad_())
    dense = loss_and_grad(lambda z: ref_loss(zt, z, labels, cfg, k), zs)
    assert_matches(sparse, dense)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_dense_reference_through_linear_head(loss, tail, T):
    zt, _, labels = problem()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, D, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=F64, requires_grad=True)
    cfg = cfg_for(loss, tail, T, alpha=0.6)
    t = make_targets(zt, V, labels)
    sparse = loss_and_grad(lambda h, w: distill_loss(h, lambda x: x @ w.T, t, cfg), hidden, weight)
    dense = loss_and_grad(lambda h, w: ref_loss(zt, h @ w.T, labels, cfg, V), hidden, weight)
    assert_matches(sparse, dense)


@pytest.mark.parametrize("tail", TAILS)
def test_fp32_and_linear_module_head(tail):
    zt, _, labels = problem()
    head = torch.nn.Linear(D, V)
    hidden = torch.randn(N, D, requires_grad=True)
    cfg = cfg_for("fkl", tail, 1.0, alpha=0.5)
    t = make_targets(zt.float(), 4, labels)
    sparse = loss_and_grad(lambda h: distill_loss(h, head, t, cfg), hidden)
    dense = loss_and_grad(lambda h: ref_loss(zt, head(h).double(), labels, cfg, 4).float(), hidden)
    assert_matches(sparse, dense, rtol=1e-5, atol=1e-6)


def test_bf16_head_is_upcast():
    zt, _, labels = problem()
    head = torch.nn.Linear(D, V).to(torch.bfloat16)
    hidden = torch.randn(N, D, dtype=torch.bfloat16, requires_grad=True)
    loss = distill_loss(hidden, head, make_targets(zt.float(), 4, labels), cfg_for("fkl", "bucket", 1.0))
    assert loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.isfinite().all()


# ---------------------------------------------------------------- mixing, scaling, reduction


def test_alpha_zero_is_cross_entropy():
    zt, zs, labels = problem()
    cfg = cfg_for("fkl", "bucket", 2.0, alpha=0.0)
    t = make_targets(zt, 3, labels)
    sparse = loss_and_grad(lambda z: distill_loss(z, identity, t, cfg), zs.requires_grad_())
    dense = loss_and_grad(lambda z: F.cross_entropy(z, labels), zs)
    assert_matches(sparse, dense)


def test_alpha_one_ignores_labels():
    zt, zs, labels = problem()
    cfg = cfg_for("rkl", "bucket", 1.0, alpha=1.0)
    a = distill_loss(zs, identity, make_targets(zt, 3, labels), cfg)
    b = distill_loss(zs, identity, make_targets(zt, 3, (labels + 1) % V), cfg)
    c = distill_loss(zs, identity, make_targets(zt, 3, None), cfg)
    assert a == b == c


def test_labels_required_when_alpha_below_one():
    zt, zs, _ = problem()
    with pytest.raises(ValueError, match="labels"):
        distill_loss(zs, identity, make_targets(zt, 3), cfg_for("fkl", "bucket", 1.0, alpha=0.5))


def test_mixing_and_temperature_squared():
    zt, zs, labels = problem()
    t = make_targets(zt, V, labels)
    mixed = distill_loss(zs, identity, t, cfg_for("jsd", "bucket", 2.0, alpha=0.3))
    p, q = torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1)
    div = ref_divergence("jsd", p, q, 0.3, 0.7).mean()
    torch.testing.assert_close(mixed, 0.3 * 4 * div + 0.7 * F.cross_entropy(zs, labels))


def test_num_items_divides_the_sum():
    zt, zs, labels = problem()
    t, cfg = make_targets(zt, 4, labels), cfg_for("skew-fkl", "bucket", 1.0, alpha=0.5)
    mean = distill_loss(zs, identity, t, cfg)
    torch.testing.assert_close(distill_loss(zs, identity, t, cfg, num_items=17), mean * N / 17)
    torch.testing.assert_close(distill_loss(zs, identity, t, cfg, num_items=torch.tensor(17)), mean * N / 17)


@pytest.mark.parametrize("tail", TAILS)
def test_chunking_invariance(tail):
    zt, zs, labels = problem(n=10)
    t = make_targets(zt, 4, labels)
    results = [
        loss_and_grad(lambda z: distill_loss(z, identity, t, cfg_for("jsd", tail, 2.0, alpha=0.5, chunk_size=c)), zs.clone().requires_grad_())  # noqa: B023 called at once
        for c in (1, 3, 10, 1024)
    ]
    for other in results[1:]:
        assert_matches(other, results[0], rtol=1e-12, atol=1e-13)


def test_empty_batch_is_zero_with_grad():
    head = torch.nn.Linear(D, V)
    hidden = torch.zeros(0, D, requires_grad=True)
    t = SparseTargets(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    loss = distill_loss(hidden, head, t, DistillLossConfig(loss="fkl"))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.shape == (0, D)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
def test_zero_when_student_equals_teacher(loss, tail, T):
    zt, _, _ = problem()
    zs = zt.clone().requires_grad_()
    value, (grad,) = loss_and_grad(lambda z: distill_loss(z, identity, make_targets(zt, V), cfg_for(loss, tail, T)), zs)
    assert abs(value.item()) < 1e-12
    if loss != "tvd":  # |p - q| has no gradient at p = q, only rounding-dependent subgradients
        assert grad.abs().max() < 1e-9


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
def test_non_negative_per_position(loss, tail):
    for seed in range(5):
        zt, zs, _ = problem(seed, n=32, dtype=torch.float32)
        t = make_targets(zt, 5)
        for T in (0.5, 1.0, 3.0):
            valid = t.logprobs.isfinite()
            q = student_atoms(zs, t.ids, valid, T, tail)
            p = teacher_atoms(t.logprobs, t.tail, T, tail)
            assert (divergence(q, p, cfg_for(loss, tail, T)) >= -1e-6).all()


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
def test_padded_ids_are_ignored(loss, tail, T):
    zt, zs, labels = problem()
    zt[0, 0] = 20.0  # token 0 (the pad id) is a real cached id in row 0 ...
    zt[1:, 0] = -20.0  # ... and outside the cache in the others
    t = make_targets(zt, 4, labels)
    pad = 2
    padded = SparseTargets(
        torch.cat([t.ids, torch.zeros(N, pad, dtype=torch.long)], -1),
        torch.cat([t.logprobs, torch.full((N, pad), -torch.inf, dtype=F64)], -1),
        t.tail,
        labels,
    )
    cfg = cfg_for(loss, tail, T, alpha=0.5)
    a = loss_and_grad(lambda z: distill_loss(z, identity, padded, cfg), zs.clone().requires_grad_())
    b = loss_and_grad(lambda z: distill_loss(z, identity, t, cfg), zs.clone().requires_grad_())
    assert a[0].isfinite() and a[1][0].isfinite().all()
    assert_matches(a, b)


# ---------------------------------------------------------------- memory


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # keep the graph (and so every saved tensor) alive while counting
    assert out.requires_grad
    return sum(storages.values())


def memory_case(n, v, tail, d=32, k=8, dense=False):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(d, v)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    lp = torch.randn(n, k, generator=g).log_softmax(-1) - 0.5
    t = SparseTargets(torch.randint(v, (n, k), generator=g), lp, 1 - lp.exp().sum(-1), torch.randint(v, (n,), generator=g))
    if dense:
        return saved_bytes(lambda: F.cross_entropy(head(hidden), t.labels))
    cfg = DistillLossConfig(loss="jsd", tail=tail, alpha=0.5, temperature=2.0, chunk_size=64)
    return saved_bytes(lambda: distill_loss(hidden, head, t, cfg))


@pytest.mark.parametrize("tail", TAILS)
def test_saved_activations_scale_with_n_k_not_vocab(tail):
    n, v = 512, 4096
    full_logits = n * v * 4
    assert memory_case(n, v, tail, dense=True) >= full_logits  # the probe does see [N, V] activations
    base = memory_case(n, v, tail)
    assert base < full_logits / 20
    assert memory_case(n, 2 * v, tail) == base
    assert 1.8 < memory_case(2 * n, v, tail) / base < 2.2


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"loss": "kl"}, "loss"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"skew": 2.0}, "skew"),
        ({"beta": -0.5}, "beta"),
        ({"tail": "drop"}, "tail"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_config_raises(kwargs, option):
    with pytest.raises(ValueError, match=option):
        DistillLossConfig(**kwargs)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError) as err:
        DistillLossConfig(loss="kl")
    assert all(name in str(err.value) for name in LOSSES)


# ---------------------------------------------------------------- fused linear path


def linear_problem(bias=True, dtype=F64, seed=1, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    head.requires_grad_(requires_grad)
    hidden = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    return head, hidden


def fused_vs_checkpointed_vs_dense(head, hidden, zt, labels, cfg, k):
    """(fused, checkpointed, dense) (loss, grads w.r.t. hidden and every trainable head parameter)."""
    from dataclasses import replace

    t = make_targets(zt, k, labels)
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    fused = loss_and_grad(lambda *_: distill_loss(hidden, head, t, cfg), *params)
    ckpt = loss_and_grad(lambda *_: distill_loss(hidden, head, t, replace(cfg, fused=False)), *params)
    dense = loss_and_grad(lambda *_: ref_loss(zt, head(hidden).double(), labels, cfg, k), *params)
    return fused, ckpt, dense


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("k", [V, 4], ids=["full", "topk"])
def test_fused_linear_matches_checkpointed_and_dense(loss, tail, T, k, alpha):
    zt, _, labels = problem()
    head, hidden = linear_problem()
    fused, ckpt, dense = fused_vs_checkpointed_vs_dense(head, hidden, zt, labels, cfg_for(loss, tail, T, alpha=alpha), k)
    assert len(fused[1]) == 3  # hidden, weight, bias
    assert_matches(fused, dense)
    assert_matches(fused, ckpt)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
def test_fused_linear_frozen_head(tail, T):
    zt, _, labels = problem()
    head, hidden = linear_problem(requires_grad=False)
    fused, ckpt, dense = fused_vs_checkpointed_vs_dense(head, hidden, zt, labels, cfg_for("jsd", tail, T, alpha=0.5), 4)
    assert len(fused[1]) == 1
    assert_matches(fused, dense)
    assert_matches(fused, ckpt)
    loss = distill_loss(hidden, head, make_targets(zt, 4, labels), cfg_for("jsd", tail, T, alpha=0.5))
    loss.backward()
    assert head.weight.grad is None and head.bias.grad is None and hidden.grad is not None


def test_fused_linear_no_grad_and_hidden_only_frozen():
    zt, _, labels = problem()
    head, hidden = linear_problem()
    t, cfg = make_targets(zt, 4, labels), cfg_for("fkl", "bucket", 1.0, alpha=0.5)
    with torch.no_grad():
        value = distill_loss(hidden, head, t, cfg)
    assert not value.requires_grad
    torch.testing.assert_close(value, ref_loss(zt, head(hidden).detach(), labels, cfg, 4), rtol=1e-9, atol=1e-11)
    frozen_hidden = hidden.detach()  # only the head trains
    (gw,) = torch.autograd.grad(distill_loss(frozen_hidden, head, t, cfg), [head.weight])
    (ref,) = torch.autograd.grad(ref_loss(zt, head(frozen_hidden), labels, cfg, 4), [head.weight])
    torch.testing.assert_close(gw, ref, rtol=1e-9, atol=1e-11)


def test_fused_linear_scales_by_incoming_grad_and_num_items():
    zt, _, labels = problem()
    head, hidden = linear_problem()
    t, cfg = make_targets(zt, 4, labels), cfg_for("skew-rkl", "bucket", 2.0, alpha=0.5)
    params = [hidden, head.weight, head.bias]
    a = loss_and_grad(lambda *_: 3.0 * distill_loss(hidden, head, t, cfg, num_items=17), *params)
    b = loss_and_grad(lambda *_: 3.0 * ref_loss(zt, head(hidden), labels, cfg, 4) * N / 17, *params)
    assert_matches(a, b)


def test_fused_linear_padded_ids_and_chunking():
    zt, _, labels = problem(n=10)
    zt[0, 0] = 20.0  # pad id 0 is a real cached id in row 0 and not elsewhere
    zt[1:, 0] = -20.0
    t = make_targets(zt, 4, labels)
    padded = SparseTargets(torch.cat([t.ids, torch.zeros(10, 2, dtype=torch.long)], -1),
                           torch.cat([t.logprobs, torch.full((10, 2), -torch.inf, dtype=F64)], -1), t.tail, labels)
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(D, V, dtype=F64)
    hidden = torch.randn(10, D, generator=g, dtype=F64, requires_grad=True)
    params = [hidden, head.weight, head.bias]
    for tail in TAILS:
        results = [
            loss_and_grad(lambda *_: distill_loss(hidden, head, targets, cfg_for("jsd", tail, 2.0, alpha=0.5, chunk_size=c)), *params)  # noqa: B023 called at once
            for targets in (t, padded) for c in (1, 3, 10)
        ]
        for other in results[1:]:
            assert_matches(other, results[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
def test_fused_linear_bf16_weight(loss, tail, T):
    """bf16 head: logits in bf16, loss in fp32; close to the fp64 reference on the same bf16 values."""
    zt, _, labels = problem()
    head, hidden = linear_problem(dtype=torch.bfloat16)
    cfg = cfg_for(loss, tail, T, alpha=0.5)
    t = make_targets(zt.float(), 4, labels)
    params = [hidden, head.weight, head.bias]
    value, grads = loss_and_grad(lambda *_: distill_loss(hidden, head, t, cfg), *params)
    assert value.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3

    ref_params = [p.detach().double().requires_grad_() for p in params]
    h64, w64, b64 = ref_params
    ref_value, ref_grads = loss_and_grad(lambda *_: ref_loss(zt, h64 @ w64.T + b64, labels, cfg, 4), *ref_params)
    torch.testing.assert_close(value.double(), ref_value, rtol=3e-2, atol=3e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=5e-2, atol=5e-2 * r.abs().max().item())
    ckpt = loss_and_grad(lambda *_: distill_loss(hidden, head, t, cfg_for(loss, tail, T, alpha=0.5, fused=False)), *params)
    torch.testing.assert_close(value, ckpt[0], rtol=1e-5, atol=1e-5)


def fused_saved_bytes(n, v, tail, d=32, k=8, frozen=False):
    """Bytes autograd keeps for backward: saved tensors (hooks) plus the gradients held by the fused node."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(d, v).requires_grad_(not frozen)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    lp = torch.randn(n, k, generator=g).log_softmax(-1) - 0.5
    t = SparseTargets(torch.randint(v, (n, k), generator=g), lp, 1 - lp.exp().sum(-1), torch.randint(v, (n,), generator=g))
    cfg = DistillLossConfig(loss="jsd", tail=tail, alpha=0.5, temperature=2.0, chunk_size=64)
    storages: dict[int, int] = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = distill_loss(hidden, head, t, cfg)
    node, stack = None, [out.grad_fn]
    while stack and node is None:  # find the fused node in the graph
        fn = stack.pop()
        if type(fn).__name__ == "_FusedLinearDistillBackward":
            node = fn
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    assert node is not None
    for held in (node.grad_weight, node.grad_bias):
        if held is not None:
            storages[held.untyped_storage().data_ptr()] = held.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("tail", TAILS)
def test_fused_linear_memory_is_n_d_plus_v_d(tail):
    n, v, d = 512, 4096, 32
    assert fused_saved_bytes(n, v, tail) == 4 * (n * d + v * d + v)  # grad hidden, weight, bias: nothing [N, V] or [C, V]
    assert fused_saved_bytes(2 * n, 2 * v, tail) == 4 * (2 * n * d + 2 * v * d + 2 * v)
    assert fused_saved_bytes(n, v, tail, frozen=True) == 4 * n * d  # frozen head: no weight gradient allocated


def test_fused_linear_backward_runs_once():
    zt, _, labels = problem()
    head, hidden = linear_problem()
    loss = distill_loss(hidden, head, make_targets(zt, 4, labels), cfg_for("fkl", "bucket", 1.0))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_hooked_or_subclassed_linear_takes_the_generic_path():
    from kdpipe.losses.fused import _fusable_linear

    head = torch.nn.Linear(D, V)
    assert _fusable_linear(head)
    handle = head.register_forward_hook(lambda *a: None)
    assert not _fusable_linear(head)
    handle.remove()

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert not _fusable_linear(Scaled(D, V))
    assert not _fusable_linear(lambda x: x)


# ---------------------------------------------------------------- registry


def test_registry_names_are_the_cli_choices_and_load_no_torch():
    """`kdpipe --help` lists --loss/--tail from kdpipe.losses, which (with the stage configs) imports no torch."""
    import subprocess
    import sys
    import typing

    from kdpipe.losses import DIVERGENCES, TAIL_MODES
    from kdpipe.stages.train_student import TrainStudentConfig

    hints = typing.get_type_hints(TrainStudentConfig)
    assert typing.get_args(hints["loss"]) == LOSSES == tuple(DIVERGENCES)
    assert typing.get_args(hints["tail"]) == TAIL_MODES
    code = ("import sys, kdpipe.losses, kdpipe.train.setup, kdpipe.stages.train_student, kdpipe.stages.finetune; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
