"""The training engine in one process (plain torch backend): schedule, batching and masks, objectives
against float64 full-logit references, config errors, resume, and the HF export."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.ckpt import export_hf
from engine.config import DPOConfig, TrainConfig, TrainConfigError, dpo_config, sft_config
from engine.data import (PreferencePair, SFTExample, collate_pairs, collate_sft, epoch_batches, example_length,
                         rank_micro_batches)
from engine.distributed import init_distributed
from engine.ds_config import build_ds_config
from engine.metrics import format_mfu, mfu, peak_flops
from engine.train_backends import TorchRunner
from engine.schedule import CosineSchedule, cosine_lr
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from engine.zero3 import open_init
from model.checkpoint import load_pretrained, save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

V = 96


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    d = tmp_path_factory.mktemp("m0") / "m0"
    config = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), d)
    (d / "tokenizer_config.json").write_text('{"chat_template": "llama2"}')
    return d


def ids(g, n):
    return torch.randint(3, V, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(1)
    return [SFTExample(ids(g, 2 + i % 5), ids(g, 3 + i % 7)) for i in range(24)]


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(2)
    return [PreferencePair(f"p{i}", ids(g, 2 + i % 3), ids(g, 3 + i % 4), ids(g, 2 + i % 5)) for i in range(16)]


CFG = TrainConfig(lr=1e-3, min_lr=1e-4, global_batch=8, micro_batch=2, dropout=0.0, log_every=1,
                  checkpoint_every=0, backend="torch", seed=5)


# --- schedule ------------------------------------------------------------------------------------
def test_cosine_schedule_warmup_peak_floor():
    assert cosine_lr(0, 10, 1.0, 0.1, warmup_steps=2) == pytest.approx(0.5)
    assert cosine_lr(1, 10, 1.0, 0.1, warmup_steps=2) == pytest.approx(1.0)
    assert cosine_lr(2, 10, 1.0, 0.1, warmup_steps=2) == pytest.approx(1.0)
    assert cosine_lr(6, 10, 1.0, 0.1, warmup_steps=2) == pytest.approx(0.55)
    assert cosine_lr(10, 10, 1.0, 0.1, warmup_steps=2) == pytest.approx(0.1)
    lrs = [cosine_lr(s, 10, 5.5e-6, 1.1e-6) for s in range(10)]
    assert lrs[0] == 5.5e-6 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 1.1e-6
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=9.0)
    sched = CosineSchedule(opt, 10, 1.0, 0.1)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    other = CosineSchedule(opt, 10, 1.0, 0.1)
    other.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(3, 10, 1.0, 0.1))


# --- batching --------------------------------------------------------------------------------------
def test_collate_masks_cover_response_tokens_only():
    b = collate_sft([SFTExample([5, 6, 7], [8, 9]), SFTExample([5], [10, 11, 12, 13, 14])], max_len=64,
                    pad_multiple=8, pad_id=0)
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    # position t predicts t+1: rows 2 and 3 predict 8 and 9 (the response), nothing else counts
    assert b["mask"][0].tolist() == [False, False, True, True, False, False, False, False]
    assert b["targets"][0, 2:4].tolist() == [8, 9]
    assert b["mask"][1].tolist() == [True] * 5 + [False] * 3
    assert b["num_tokens"] == 7 and b["real_tokens"] == 11 and b["padded_tokens"] == 16
    cut = collate_sft([SFTExample([5, 6, 7], [8, 9, 10, 11])], max_len=5)
    assert cut["input_ids"].shape == (1, 5) and cut["mask"][0].tolist() == [False, False, True, True, False]


def test_collate_pairs_chosen_then_rejected_and_needs_reference():
    p = PreferencePair("a", [4, 5], [6, 7, 8], [9])
    with pytest.raises(ValueError, match="'a' has no reference"):
        collate_pairs([p], max_len=64)
    b = collate_pairs([p.with_reference(-1.5, -2.5)], max_len=64)
    assert b["input_ids"].tolist() == [[4, 5, 6, 7, 8], [4, 5, 9, 0, 0]]
    assert b["mask"].sum(1).tolist() == [3, 1]
    assert b["ref_logps"].tolist() == [-1.5, -2.5] and b["num_pairs"] == 1


def test_length_grouped_order_is_deterministic_and_splits_by_rank(examples):
    lengths = [example_length(e) for e in examples]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0) and a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert len(a) == 3 and sorted(i for b in a for i in b) == list(range(24))
    spread = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert spread(a) <= spread(epoch_batches(lengths, 8, seed=1, epoch=0, length_grouped=False))
    one = rank_micro_batches(a[0], 2, 0, 1)
    two = rank_micro_batches(a[0], 2, 0, 2) + rank_micro_batches(a[0], 2, 1, 2)
    assert sorted(map(tuple, one)) == sorted(map(tuple, two)) and len(one) == 4


def test_right_padding_leaves_real_tokens_unchanged(m0):
    """The no-attention-mask claim in engine/data.py: padding after a sequence cannot change it."""
    model = load_pretrained(m0, dtype=torch.float64)
    short, long = SFTExample([3, 4], [5, 6]), SFTExample([7, 8, 9], [10, 11, 12, 13, 14])
    alone = collate_sft([short], max_len=64)
    padded = collate_sft([short, long], max_len=64, pad_multiple=8)
    h_alone = model(alone["input_ids"], return_hidden=True)[0]
    h_padded = model(padded["input_ids"], return_hidden=True)[0, : h_alone.shape[0]]
    assert torch.allclose(h_alone, h_padded, atol=1e-12)


# --- objectives against full-logit float64 references ---------------------------------------------
def _nll_sums(model, seqs):
    """[(prompt, response)] -> per-sequence summed log p(response | prompt), float64, full logits."""
    out = []
    for prompt, response in seqs:
        x = torch.tensor([prompt + response])
        logp = F.log_softmax(model(x).double(), -1)[0]
        out.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)))
    return out


def test_sft_loss_is_mean_nll_over_response_tokens(m0, examples, tmp_path):
    result = train_sft(m0, examples, CFG.replace(max_steps=1), tmp_path / "out")
    model = load_pretrained(m0, dtype=torch.float64)
    batch = epoch_batches([example_length(e) for e in examples], 8, CFG.seed, 0)[0]
    chosen = [examples[i] for i in batch]
    sums = _nll_sums(model, [(e.prompt_ids, e.response_ids) for e in chosen])
    want = -sum(sums) / sum(len(e.response_ids) for e in chosen)
    assert result.losses[0] == pytest.approx(want, abs=1e-5)
    assert result.steps == 1 and not (tmp_path / "out.ckpt").exists()


def test_reference_logprobs_and_first_dpo_step(m0, pairs, tmp_path):
    ref = compute_reference_logprobs(m0, pairs, CFG)
    model = load_pretrained(m0, dtype=torch.float64)
    want = _nll_sums(model, [(p.prompt_ids, p.chosen_ids) for p in pairs] +
                     [(p.prompt_ids, p.rejected_ids) for p in pairs])
    got = [p.ref_chosen for p in ref] + [p.ref_rejected for p in ref]
    assert got == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="no reference log-probs"):
        train_dpo(m0, pairs, CFG, tmp_path / "never")
    w = 0.5
    result = train_dpo(m0, ref, DPOConfig.extend(CFG.replace(max_steps=1), nll_weight=w), tmp_path / "dpo")
    batch = epoch_batches([example_length(p) for p in ref], 8, CFG.seed, 0)[0]
    nll = sum(-ref[i].ref_chosen / len(ref[i].chosen_ids) for i in batch) / len(batch)
    # dropout 0: the policy at step 0 is the reference, so the DPO term is exactly log 2
    assert result.losses[0] == pytest.approx(math.log(2) + w * nll, abs=1e-5)
    m = result.metrics[0]
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and m["nll"] == pytest.approx(nll, abs=1e-5)


# --- config errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [(dict(global_batch=10, micro_batch=4), "global_batch"),
                                         (dict(log_every=0), "log_every"),
                                         (dict(min_lr=1.0), "min_lr"),
                                         (dict(dtype="fp8"), "dtype")])
def test_bad_config_is_one_line_naming_the_key_before_any_work(change, key, examples, tmp_path):
    with pytest.raises(TrainConfigError) as err:  # init_dir does not exist: nothing was read
        train_sft(tmp_path / "missing", examples, CFG.replace(**change), tmp_path / "out")
    assert key in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TrainConfigError, match="global_batch"):
        CFG.replace(global_batch=8, micro_batch=4).validate(world_size=3)
    with pytest.raises(TrainConfigError, match="unknown key"):
        TrainConfig.from_dict({"lr": 1e-5, "learning_rate": 1})


def test_paper_defaults():
    assert (sft_config().lr, sft_config().min_lr) == (5.5e-6, 1.1e-6)
    assert (dpo_config().lr, dpo_config().min_lr) == (1e-6, 1e-7)
    assert sft_config().global_batch == 16 and sft_config().dropout == 0.1


def test_ds_config_derived_and_override(tmp_path):
    cfg = CFG.replace(zero_stage=3, offload_optimizer=True, param_persistence_threshold=0)
    ds = build_ds_config(cfg, world_size=2, dtype=torch.bfloat16, on_cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["gradient_clipping"] == 1.0
    override = tmp_path / "ds.json"
    override.write_text('{"zero_optimization": {"reduce_bucket_size": 1000}, "train_batch_size": 8}')
    ds = build_ds_config(cfg.replace(ds_config_override=str(override)), 2, torch.float32, False)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 3
    override.write_text('{"train_batch_size": 32}')
    with pytest.raises(TrainConfigError, match="train_batch_size"):
        build_ds_config(cfg.replace(ds_config_override=str(override)), 2, torch.float32, False)
    override.write_text('{"train_batch_size": 8,\n oops}')
    with pytest.raises(TrainConfigError, match=r"ds.json:2"):
        cfg.replace(ds_config_override=str(override)).validate(2)


def test_mfu_accounting():
    assert peak_flops("cpu") is None and format_mfu(mfu(1e4, LlamaConfig(), 512, None)) == "n/a"
    c = LlamaConfig()
    assert mfu(1000.0, c, 2048, 1e15) == pytest.approx(1000.0 * c.flops_per_token(2048) / 1e15)
    assert format_mfu(0.4567) == "45.7%"


# --- resume and export ---------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_kill_and_resume_is_bit_for_bit(m0, examples, tmp_path):
    cfg = CFG.replace(dropout=0.1, checkpoint_every=2, epochs=2, log_every=3)  # 6 steps, dropout RNG in play
    full = train_sft(m0, examples, cfg, tmp_path / "full", resume=False)

    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_sft(m0, examples, cfg, tmp_path / "run", on_step=kill)
    assert (tmp_path / "run.ckpt" / "latest").read_text() == "step4" and not (tmp_path / "run").exists()
    resumed = train_sft(m0, examples, cfg, tmp_path / "run")
    assert resumed.losses == full.losses and len(full.losses) == 6
    assert not (tmp_path / "run.ckpt").exists()  # removed after a complete export
    def kill_early(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_sft(m0, examples[:16], cfg, tmp_path / "other", on_step=kill_early)
    with pytest.raises(RuntimeError, match="different data"):
        train_sft(m0, examples, cfg, tmp_path / "other")


def test_export_loads_in_transformers_with_the_engines_logits(m0, examples, tmp_path):
    transformers = pytest.importorskip("transformers")
    dist = init_distributed(use_deepspeed=False)
    reader = open_init(m0, dropout=0.0)
    runner = TorchRunner(reader, CFG, dist, torch.float32, total_steps=2)
    batch = collate_sft(examples[:4], max_len=64)
    for _ in range(4):  # one optimizer step (4 micro-batches of 2 make the global batch of 8)
        logp_sum, _ = runner.forward(batch["input_ids"][:2], batch["targets"][:2], batch["mask"][:2])
        runner.backward(-logp_sum.sum() / 100)
        runner.step()
    export_hf(runner.full_state_dict(torch.float32), reader.config, m0, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer_config.json").read_text() == '{"chat_template": "llama2"}'
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    x = batch["input_ids"]
    model = runner.module.model.eval()
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
        moved = (ours - load_pretrained(m0)(x)).abs().max()
    assert moved > 1e-4 and torch.allclose(ours, theirs, atol=1e-5)
