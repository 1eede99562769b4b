"""sequence_objective (fused lm_head + per-sequence objective, gradients in forward), both impls, against a
float64 naive oracle: logits -> log_softmax -> gather -> per-sequence sums -> objective -> autograd.

Device-agnostic like the other kernel tests: compiled kernels on a CUDA machine with TRITON_INTERPRET=0,
otherwise CPU with the Triton interpreter (sizes kept small for it).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import sequence_logprobs
from kernels.impl import is_interpreted
from kernels.sequence_objective import _row_stats_kernel, sequence_objective

DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreted(_row_stats_kernel) else "cpu"
IMPLS = ("torch", "triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got, ref):
    scale = ref.abs().max().clamp(min=1e-30)
    return ((got.double() - ref).abs().max() / scale).item()


def make_batch(pairs, length, dim, vocab, dtype, seed=0, scale=1.0):
    """2 * pairs rows (chosen then rejected): a prompt region, a response, right padding; row 1 all masked."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = (torch.randn(rows, length, dim, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows):
        start = int(torch.randint(0, length // 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=gen))
        mask[r, start:end] = True
        targets[r, end:] = -100  # padding beyond the response, as collate writes it
    mask[1] = False
    ref = torch.randn(rows, generator=gen, dtype=torch.float64) * 5 - 20
    return hidden, weight, targets.to(DEVICE), mask.to(DEVICE), ref.to(DEVICE)


def dpo_objective(ref, pairs, beta=0.1, nll_weight=0.5):
    """Sigmoid DPO + RPO's NLL term, as a sum over pairs (rows come as chosen, rejected per pair)."""
    def fn(logp, count, rows):
        chosen, rejected = logp[0::2], logp[1::2]
        margin = (chosen - ref[rows[0::2]].to(logp.dtype)) - (rejected - ref[rows[1::2]].to(logp.dtype))
        nll = -(chosen / count[0::2].clamp(min=1))
        return (-F.logsigmoid(beta * margin)).sum() / pairs + nll_weight * nll.sum() / pairs
    return fn


def sft_objective(total_tokens):
    return lambda logp, count, rows: -logp.sum() / total_tokens


def pair_groups(pairs):
    return [[i, i + pairs] for i in range(pairs)]


def oracle(hidden, weight, targets, mask, objective, groups):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    valid = mask & (targets != -100)
    logp = torch.log_softmax(h64 @ w64.T, dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    seq = torch.where(valid, logp, 0.0).sum(dim=1)
    count = valid.sum(dim=1).double()
    value = sum(objective(seq[g], count[g], torch.tensor(g, device=hidden.device)) for g in groups)
    grad_h, grad_w = torch.autograd.grad(value, (h64, w64))
    return value, seq, grad_h, grad_w


def check(hidden, weight, targets, mask, objective, groups, impl, block_elements=None, tol=None):
    out = sequence_objective(hidden, weight, targets, mask, objective, groups, impl=impl,
                             block_elements=block_elements)
    grad_h, grad_w = torch.autograd.grad(out.value, (hidden, weight))
    value, seq, ref_h, ref_w = oracle(hidden, weight, targets, mask, objective, groups)
    tol = tol or TOL[hidden.dtype]
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert rel_err(out.value, value) < tol, (out.value, value)
    assert rel_err(out.sum, seq) < tol, rel_err(out.sum, seq)
    assert rel_err(grad_h, ref_h) < tol, rel_err(grad_h, ref_h)
    assert rel_err(grad_w, ref_w) < tol, rel_err(grad_w, ref_w)
    assert grad_h.dtype == hidden.dtype and grad_w.dtype == weight.dtype
    return out, grad_h, grad_w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_objective_matches_float64(impl, dtype):
    pairs = 3
    hidden, weight, targets, mask, ref = make_batch(pairs, 9, 24, 97, dtype)
    out, grad_h, _ = check(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs), impl)
    assert out.count[1] == 0 and out.sum[1] == 0  # the all-masked row
    assert (grad_h[~(mask & (targets != -100))] == 0).all()  # masked positions get exactly zero gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_elements", [97 * 5, 97 * 13, 97])
def test_chunking_and_two_pass_groups_match(impl, block_elements):
    # 5 rows of logits per block: pairs are split over several chunks and most pairs exceed the block
    # (two passes with recompute); 13 rows: several pairs per chunk; 1 row: every token its own block.
    pairs = 4
    hidden, weight, targets, mask, ref = make_batch(pairs, 7, 16, 97, torch.float32, seed=1)
    check(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs), impl,
          block_elements=block_elements)


@pytest.mark.parametrize("impl", IMPLS)
def test_sft_objective_default_groups(impl):
    hidden, weight, targets, mask, _ = make_batch(3, 11, 20, 131, torch.float32, seed=2)
    total = int((mask & (targets != -100)).sum())
    check(hidden, weight, targets, mask, sft_objective(total), [[r] for r in range(6)], impl,
          block_elements=131 * 8)
    out = sequence_objective(hidden, weight, targets, mask, sft_objective(total), impl=impl)
    plain = sequence_logprobs(hidden, weight, targets, mask, impl=impl)
    assert rel_err(out.sum, plain.sum.double()) < 1e-5 and torch.equal(out.count, plain.count)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_stay_finite(impl):
    pairs = 2
    hidden, weight, targets, mask, ref = make_batch(pairs, 6, 16, 90, torch.float32, seed=3, scale=4e3)
    out = sequence_objective(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs),
                             impl=impl)
    grad_h, grad_w = torch.autograd.grad(out.value, (hidden, weight))
    _, seq, ref_h, _ = oracle(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs))
    assert seq.abs().max() > 1e3 and rel_err(out.sum, seq) < 1e-5
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    # fp32 logits at |x| ~ 1e4 carry ~1e-3 absolute error, so the softmax gradient cannot reach 1e-5.
    assert rel_err(grad_h, ref_h) < 1e-2


def test_torch_impl_float64_is_exact():
    # In float64 the op must agree with the naive float64 autograd to rounding (the role gradcheck plays for
    # ops whose backward can run twice; this one hands its gradients over once).
    pairs = 2
    hidden, weight, targets, mask, ref = make_batch(pairs, 4, 5, 7, torch.float64, seed=4)
    check(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs), "torch",
          block_elements=7 * 3, tol=1e-12)


def test_upstream_gradient_scales_and_second_backward_is_refused():
    hidden, weight, targets, mask, ref = make_batch(2, 5, 8, 33, torch.float32, seed=5)
    run = lambda: sequence_objective(hidden, weight, targets, mask, dpo_objective(ref, 2), pair_groups(2),  # noqa: E731
                                     impl="torch").value
    g1 = torch.autograd.grad(run(), hidden)[0]
    value = run()
    g3 = torch.autograd.grad(3 * value, hidden, retain_graph=True)[0]
    torch.testing.assert_close(g3, 3 * g1)
    with pytest.raises(RuntimeError, match="sequence_objective.py: backward ran twice"):
        torch.autograd.grad(value, hidden)
    const = sequence_objective(hidden, weight, targets, mask, lambda s, c, r: torch.zeros(()), impl="torch")
    assert const.value.item() == 0
    assert (torch.autograd.grad(const.value, weight)[0] == 0).all()


def test_bad_groups_and_shapes_are_one_line_errors():
    hidden, weight, targets, mask, _ = make_batch(2, 5, 8, 33, torch.float32)
    fn = sft_objective(1)
    with pytest.raises(ValueError, match="sequence_objective.py: groups must cover rows 0..3 exactly once"):
        sequence_objective(hidden, weight, targets, mask, fn, [[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="sequence_objective.py: expected hidden"):
        sequence_objective(hidden[0], weight, targets, mask, fn)
    bad = targets.clone()
    bad[0, 0], mask[0, 0] = 33, True
    with pytest.raises(ValueError, match="target id 33"):
        sequence_objective(hidden, weight, bad, mask, fn)


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_without_tokens(impl):
    # A pair with no response tokens at all: its objective term still counts (sums are 0), and it gets no
    # gradient; the other pair is unaffected.
    pairs = 2
    hidden, weight, targets, mask, ref = make_batch(pairs, 6, 8, 33, torch.float32, seed=6)
    mask[0], mask[pairs] = False, False
    check(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs), impl)
    mask[:] = False
    out = sequence_objective(hidden, weight, targets, mask, dpo_objective(ref, pairs), pair_groups(pairs), impl=impl)
    assert (out.count == 0).all() and (out.sum == 0).all()
    grad_h, grad_w = torch.autograd.grad(out.value, (hidden, weight))
    assert (grad_h == 0).all() and (grad_w == 0).all()
