"""engine/objectives.py: the DPO loss against the textbook formulas (float64 autograd), the fused path
(kernels.sequence_objective, the trainer's only one) against the unfused oracle (sequence log-prob sums +
autograd through Objective.loss), per micro-batch and over a few trainer steps, and the objective's
config section (dpo.objective.*, old keys named)."""
import pytest
import torch
import torch.nn.functional as F

from engine.config import DPOConfig, DPOObjectiveConfig, TrainConfig, TrainConfigError
from engine.data import PreferencePair, SFTExample, epoch_batches, example_length, rank_micro_batches
from engine.distributed import init_distributed
from engine.objectives import DPOObjective, SFTObjective, dpo_loss
from engine.train_backends import TorchRunner
from engine.steps import PolicyLoss
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from engine.zero3 import open_init
from model.checkpoint import load_pretrained, save_pretrained
from common.errors import ConfigError
from model.config import LlamaConfig
from model.llama import Llama
from test_trainer import examples, ids  # noqa: F401  (the same tiny data; `examples` is a fixture)

V = 96
LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
CFG = TrainConfig(lr=1e-3, min_lr=1e-4, global_batch=8, micro_batch=2, dropout=0.0, log_every=1,
                  checkpoint_every=0, backend="torch", seed=5)


def textbook(pc, pr, rc, rr, beta, loss_type, eps):
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * m) - eps * F.logsigmoid(-beta * m)
    elif loss_type == "ipo":
        losses = (m - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * m)
    else:  # robust (Chowdhury et al. 2024, as in TRL)
        losses = (-(1 - eps) * F.logsigmoid(beta * m) + eps * F.logsigmoid(-beta * m)) / (1 - 2 * eps)
    return losses.mean()


@pytest.mark.parametrize("loss_type,eps", LOSSES)
def test_dpo_loss_and_grads_match_textbook(loss_type, eps):
    gen = torch.Generator().manual_seed(1)
    ref_inputs = [(-20 * torch.rand(37, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    want = textbook(*ref_inputs, 0.3, loss_type, eps)
    want_grads = torch.autograd.grad(want, ref_inputs)
    inputs = [x.detach().float().requires_grad_() for x in ref_inputs]
    cfg = DPOObjectiveConfig(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    loss, chosen, rejected = dpo_loss(*inputs, cfg)
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for got, ref in zip(torch.autograd.grad(loss, inputs), want_grads):
        assert (got.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1e-3)
    pc, pr, rc, rr = (x.detach() for x in ref_inputs)
    assert torch.allclose(chosen.double(), 0.3 * (pc - rc), atol=1e-5)
    assert torch.allclose(rejected.double(), 0.3 * (pr - rr), atol=1e-5)
    f64 = [x.detach().requires_grad_() for x in ref_inputs[:2]] + [x.detach() for x in ref_inputs[2:]]
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, *f64[2:], cfg)[0], f64[:2])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_extreme_margins_stay_finite(loss_type):
    # |beta * m| ~ 1e3: logsigmoid/sigmoid must not overflow in either direction.
    pc = torch.tensor([0.0, -1e4, -5.0], requires_grad=True)
    pr = torch.tensor([-1e4, 0.0, -5.0], requires_grad=True)
    ref = torch.zeros(3)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    loss, _, _ = dpo_loss(pc, pr, ref, ref, DPOObjectiveConfig(loss_type=loss_type, label_smoothing=eps))
    grads = torch.autograd.grad(loss, (pc, pr))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    want = textbook(pc.detach().double(), pr.detach().double(), ref.double(), ref.double(), 0.1, loss_type, eps)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    d = tmp_path_factory.mktemp("m0") / "m0"
    config = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), d)
    return d


@pytest.fixture(scope="module")
def ref_pairs(m0):
    g = torch.Generator().manual_seed(2)
    pairs = [PreferencePair(f"p{i}", ids(g, 2 + i % 3), ids(g, 3 + i % 4), ids(g, 2 + i % 5)) for i in range(16)]
    return compute_reference_logprobs(m0, pairs, CFG)


def objectives():
    return [SFTObjective()] + [DPOObjective(DPOObjectiveConfig(beta=0.5, loss_type=t, label_smoothing=e, nll_weight=w))
                               for (t, e), w in zip(LOSSES, (0.0, 0.3, 0.2, 0.0, 1.0))]


@pytest.mark.parametrize("index", range(len(objectives())), ids=lambda i: ["sft", "sigmoid", "sigmoid_ls", "ipo",
                                                                            "hinge", "robust"][i])
def test_fused_gradients_match_the_unfused_oracle(index, m0, examples, ref_pairs):
    objective = objectives()[index]
    data = examples if objective.kind == "sft" else ref_pairs
    items = data[:6]
    # a random model (not the reference) so the DPO margins, hinge's kink included, are not all zero
    model = Llama(load_pretrained(m0).config).init_weights(0.05, torch.Generator().manual_seed(9)).double()
    module = PolicyLoss(model, "torch")
    b = objective.collate(items, max_len=64, pad_multiple=1, pad_id=0, device="cpu")
    norm = objective.normaliser(data[:8], 64)  # a global batch larger than this micro-batch
    value, logp_sum, count = module(b["input_ids"], b["targets"], b["mask"], *objective.chunk(b, norm))
    value.backward()
    fused = {n: p.grad.clone() for n, p in module.named_parameters()}
    stats = objective.stats(b, value, logp_sum, count, norm)
    module.zero_grad()
    sums, counts = module(b["input_ids"], b["targets"], b["mask"])
    oracle = objective.loss(b, sums, counts, norm)
    oracle.backward()
    assert value.item() == pytest.approx(oracle.item(), rel=1e-10)
    assert stats.shape == (len(objective.stat_names),) and stats[0].item() == pytest.approx(oracle.item(), rel=1e-6)
    for n, p in module.named_parameters():
        assert torch.allclose(fused[n], p.grad, rtol=1e-9, atol=1e-12), n
    assert any(g.abs().max() > 0 for g in fused.values())


def hand_loop(m0, objective, data, cfg, steps):
    """The trainer's step, written out with the unfused objective: sums, Objective.loss, autograd."""
    dist = init_distributed(use_deepspeed=False)
    runner = TorchRunner(open_init(m0, cfg.dropout), cfg, dist, torch.float32, steps)
    runner.train(True)
    lengths, losses = [example_length(x) for x in data], []
    batches = [b for epoch in range(cfg.epochs) for b in epoch_batches(lengths, cfg.global_batch, cfg.seed, epoch,
                                                                          cfg.length_grouped)]
    for batch in batches[:steps]:
        norm, total = objective.normaliser([data[i] for i in batch], 64), 0.0
        for micro in rank_micro_batches(batch, cfg.micro_batch, 0, 1):
            b = objective.collate([data[i] for i in micro], max_len=64, pad_multiple=1, pad_id=0, device="cpu")
            loss = objective.loss(b, *runner.forward(b["input_ids"], b["targets"], b["mask"]), norm)
            runner.backward(loss)
            runner.step()
            total += loss.item()
        losses.append(total)
    return losses, runner.module.model.state_dict()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trainer_trains_like_the_unfused_oracle(kind, m0, examples, ref_pairs, tmp_path):
    # Same losses and final weights whether the objective's gradients come from the fused op (computed in
    # forward, 3 lm_head matmuls) or from sequence_logprobs + autograd (4), over 3 optimizer steps.
    if kind == "sft":
        cfg, data, run, objective = CFG.replace(epochs=2, max_steps=3), examples, train_sft, SFTObjective()
    else:
        cfg = DPOConfig.extend(CFG.replace(epochs=2, max_steps=3), loss_type="ipo", nll_weight=0.3)
        data, run, objective = ref_pairs, train_dpo, DPOObjective(cfg.objective)
    result = run(m0, data, cfg, tmp_path / "fused")
    losses, weights = hand_loop(m0, objective, data, cfg, 3)
    assert result.losses == pytest.approx(losses, rel=1e-6) and len(set(losses)) == 3
    got = load_pretrained(tmp_path / "fused").state_dict()
    assert max((got[k] - weights[k]).abs().max().item() for k in weights) < 1e-5


# --- config: the objective's own section ----------------------------------------------------------
def test_dpo_config_shape_and_defaults():
    from engine.config import dpo_config

    cfg = dpo_config()
    assert isinstance(cfg, DPOConfig) and cfg.objective == DPOObjectiveConfig(beta=0.1, loss_type="sigmoid")
    assert not any(hasattr(TrainConfig(), k) for k in ("beta", "loss_type", "label_smoothing", "nll_weight",
                                                        "fused_objective"))
    back = DPOConfig.from_dict(DPOConfig.extend(CFG, beta=0.2, nll_weight=1.0).to_dict())
    assert back.objective == DPOObjectiveConfig(beta=0.2, nll_weight=1.0) and back.lr == CFG.lr
    assert DPOConfig.extend(back, loss_type="ipo").objective.beta == 0.2  # extending keeps what was set


@pytest.mark.parametrize("d, match", [({"beta": 0.2}, "beta moved to DPOConfig.objective.beta"),
                                      ({"fused_objective": False}, "fused_objective was removed"),
                                      ({"objective": {"betta": 1}}, r"unknown key\(s\) \['objective.betta'\]")])
def test_old_and_unknown_keys_in_python(d, match):
    with pytest.raises(TrainConfigError, match=match) as err:
        DPOConfig.from_dict(d) if "objective" in d else TrainConfig.from_dict(d)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, match", [
    ("dpo.beta=0.5", r"loop config: dpo\.beta moved to dpo\.objective\.beta$"),
    ("dpo.loss_type=ipo", r"dpo\.loss_type moved to dpo\.objective\.loss_type$"),
    ("sft.nll_weight=1.0", r"sft\.nll_weight moved to dpo\.objective\.nll_weight \(only the DPO stage"),
    ("dpo.fused_objective=false", r"dpo\.fused_objective was removed"),
    ("dpo.objective.loss_type=kto", r"dpo\.objective\.loss_type='kto' is unknown"),
    ("dpo.objective.label_smoothing=0.1", None),
    ("dpo.objective.beta=0", r"dpo\.objective\.beta=0\.0 must be positive"),
])
def test_loop_config_keys(override, match):
    from loop.config import load_config

    if match is None:
        cfg = load_config(None, [override])
        assert cfg.dpo.objective == DPOObjectiveConfig(label_smoothing=0.1)  # the other objective keys keep defaults
        return
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_bad_objective_fails_before_any_work(ref_pairs, tmp_path):
    cfg = DPOConfig.extend(CFG, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(TrainConfigError, match="objective.label_smoothing") as err:  # init_dir does not exist
        train_dpo(tmp_path / "missing", ref_pairs, cfg, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
