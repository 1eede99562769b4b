"""Metrics sinks and progress, read back from what was written: metrics.jsonl, TensorBoard's event files
(tensorboard's EventAccumulator), a W&B offline run (its .wandb records, decoded with wandb's protobuf
schema); resume without doubled steps; periodic lines off a terminal, a bar on one; rank 0 alone
writes under torchrun (2 ranks, ZeRO-3) and DeepSpeed's gradient norm is the plain torch one."""
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import DPOConfig, TrainConfig
from engine.data import PreferencePair, SFTExample, epoch_batches, example_length
from engine.metrics_log import METRICS_FILE, MetricsLogError, MetricsSink, read_metrics
from engine.progress import Progress
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from model.checkpoint import load_pretrained, save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

ROOT = Path(__file__).resolve().parent.parent
V = 96
CFG = TrainConfig(lr=1e-3, min_lr=1e-4, global_batch=8, micro_batch=4, dropout=0.0, log_every=2,
                  checkpoint_every=0, backend="torch", seed=5)
STEP_KEYS = {"stage", "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
DPO_KEYS = STEP_KEYS | {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll"}


def make_model(directory: Path) -> Path:
    config = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), directory)
    return directory


def make_data(seed=1):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    sft = [[ids(2 + i % 5), ids(3 + i % 7)] for i in range(24)]
    pairs = [[f"p{i}", ids(2 + i % 3), ids(3 + i % 4), ids(2 + i % 5)] for i in range(16)]
    return sft, pairs


@pytest.fixture(scope="module")
def m0(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m0") / "m0")


@pytest.fixture(scope="module")
def data():
    sft, pairs = make_data()
    return [SFTExample(*e) for e in sft], [PreferencePair(*p) for p in pairs]


def tb_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, merged summary) of the one offline run under run_dir/wandb.

    wandb 0.2x+ ships no Python reader of its .wandb file; the file is LevelDB's log format (32 KiB
    blocks of [crc32c u32, length u16, type u8] chunks after a 7-byte ":W&B" header), each record a
    wandb_internal_pb2.Record, which wandb's own schema decodes."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            records.append(chunks)
            chunks = b""
    history, summary = [], {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    return history, summary


def steps_of(records, stage):
    return [r for r in records if r["stage"] == stage and "step" in r]


def first_step_grad_norm(m0: Path, examples, cfg: TrainConfig) -> float:
    """The gradient norm of step 1's objective (mean NLL over the batch's response tokens), by autograd."""
    model = load_pretrained(m0, dtype=torch.float32)
    batch = epoch_batches([example_length(x) for x in examples], cfg.global_batch, cfg.seed, 0,
                          cfg.length_grouped)[0]
    total, count = 0.0, 0
    for i in batch:
        e = examples[i]
        x = torch.tensor([e.prompt_ids + e.response_ids])
        logp = F.log_softmax(model(x).float(), -1)[0]
        targets = torch.tensor(e.response_ids)
        total = total + logp[len(e.prompt_ids) - 1 + torch.arange(len(targets)), targets].sum()
        count += len(targets)
    (-total / count).backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


# --- the sinks, one process ------------------------------------------------------------------------
def test_sft_and_dpo_records_reach_jsonl_tensorboard_and_wandb(m0, data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    examples, pairs = data
    run = tmp_path / "run"
    sink = MetricsSink(run, ["jsonl", "tensorboard", "wandb"], config={"what": "test"})
    assert not run.exists()  # nothing is created before the first record
    sft_cfg = CFG.replace(max_steps=3)
    sft = train_sft(m0, examples, sft_cfg, tmp_path / "sft", sink=sink.stage("sft/M1"))
    sink.stage("sft/M1").summary({"steps": sft.steps, "last_loss": sft.losses[-1]})
    ref = compute_reference_logprobs(m0, pairs, CFG)
    dpo = train_dpo(m0, ref, DPOConfig.extend(CFG.replace(max_steps=2), nll_weight=0.5), tmp_path / "dpo",
                    sink=sink.stage("iter_1/6_dpo"))
    sink.close()

    records = read_metrics(run / METRICS_FILE)
    sft_lines, dpo_lines = steps_of(records, "sft/M1"), steps_of(records, "iter_1/6_dpo")
    assert [r["step"] for r in sft_lines] == [1, 2, 3] and [r["step"] for r in dpo_lines] == [1, 2]
    assert all(set(r) == STEP_KEYS for r in sft_lines) and all(set(r) == DPO_KEYS for r in dpo_lines)
    assert [r["loss"] for r in sft_lines] == pytest.approx(sft.losses, rel=1e-12)
    assert [r["loss"] for r in dpo_lines] == pytest.approx(dpo.losses, rel=1e-12)
    assert dpo_lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in sft_lines + dpo_lines)  # CPU: no peak
    assert sft_lines[0]["lr"] == pytest.approx(1e-3) and sft_lines[2]["lr"] < sft_lines[1]["lr"]
    # grad norm before clipping, checked against autograd on the same batch
    assert sft_lines[0]["grad_norm"] == pytest.approx(first_step_grad_norm(m0, examples, sft_cfg), rel=1e-4)
    assert all(r["grad_norm"] > 0 for r in sft_lines + dpo_lines)
    assert {"stage": "sft/M1", "summary": {"steps": 3, "last_loss": sft.losses[-1]}} in records

    tb = tb_scalars(run / "tensorboard" / "sft" / "M1")
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(tb) and "mfu" not in tb  # None is not a scalar
    assert [s for s, _ in tb["loss"]] == [1, 2, 3]
    assert [v for _, v in tb["loss"]] == pytest.approx(sft.losses, rel=1e-6)
    tb_dpo = tb_scalars(run / "tensorboard" / "iter_1" / "6_dpo")
    assert [v for _, v in tb_dpo["rewards/accuracies"]] == pytest.approx([r["rewards/accuracies"] for r in dpo_lines])

    history, summary = wandb_records(run)
    logged = [h for h in history if "sft/M1/loss" in h]
    assert [h["sft/M1/step"] for h in logged] == [1, 2, 3]
    assert [h["sft/M1/loss"] for h in logged] == pytest.approx(sft.losses, rel=1e-12)
    assert [h["iter_1/6_dpo/nll"] for h in history if "iter_1/6_dpo/nll" in h] == pytest.approx(
        [r["nll"] for r in dpo_lines], rel=1e-12)
    assert summary["sft/M1/summary"] == {"steps": 3, "last_loss": sft.losses[-1]}
    assert (run / "wandb_run_id").read_text() in str(next((run / "wandb").glob("offline-run-*")))


class Killed(Exception):
    pass


def test_resume_rewrites_a_stage_without_doubled_steps(m0, data, tmp_path):
    pytest.importorskip("tensorboard")
    examples, _ = data
    cfg = CFG.replace(dropout=0.1, checkpoint_every=2, epochs=2, log_every=1)  # 6 steps
    full = train_sft(m0, examples, cfg, tmp_path / "full", resume=False)
    run = tmp_path / "run"
    sink = MetricsSink(run, ["tensorboard"])
    sink.log_summary("seed", {"ift": 24})  # another stage's lines are left alone

    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_sft(m0, examples, cfg, tmp_path / "out", on_step=kill, sink=sink.stage("sft/M1"))
    assert [r["step"] for r in steps_of(read_metrics(run / METRICS_FILE), "sft/M1")] == [1, 2, 3, 4, 5]
    with open(run / METRICS_FILE, "a") as f:
        f.write('{"stage": "sft/M1", "step": 6, "lo')  # a line torn by the kill
    sink.close()

    sink = MetricsSink(run, ["tensorboard"])  # the resumed process: checkpoint at step 4
    resumed = train_sft(m0, examples, cfg, tmp_path / "out", sink=sink.stage("sft/M1"))
    sink.stage("sft/M1").summary({"steps": 6})
    sink.stage("sft/M1").summary({"steps": 6, "again": True})  # a rerun's summary replaces the first
    sink.close()
    assert resumed.losses == full.losses
    records = read_metrics(run / METRICS_FILE)
    assert len(records) == len((run / METRICS_FILE).read_text().splitlines())  # every line is whole JSON
    lines = steps_of(records, "sft/M1")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == full.losses
    assert [r for r in records if "summary" in r] == [{"stage": "seed", "summary": {"ift": 24}},
                                                      {"stage": "sft/M1", "summary": {"steps": 6, "again": True}}]
    tb = tb_scalars(run / "tensorboard" / "sft" / "M1")
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4, 5, 6]  # the killed run's step 5 was purged
    assert [v for _, v in tb["loss"]] == pytest.approx(full.losses, rel=1e-6)

    sink = MetricsSink(run, ["tensorboard"])  # a fresh start of the stage drops all its lines
    sink.begin("sft/M1", 0)
    assert steps_of(read_metrics(run / METRICS_FILE), "sft/M1") == []
    assert not (run / "tensorboard" / "sft" / "M1").exists()


def test_unknown_or_missing_logger_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(MetricsLogError, match=r"run\.log_to: 'mlflow' is not a logger"):
        MetricsSink(tmp_path, ["jsonl", "mlflow"])
    assert MetricsSink(tmp_path, ["tensorboard", "jsonl"]).log_to == ("jsonl", "tensorboard")
    assert MetricsSink(tmp_path, []).log_to == ("jsonl",)  # jsonl is always on
    assert not any(tmp_path.iterdir())


# --- progress ------------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_training_prints_plain_lines_every_log_every_steps(m0, data, tmp_path, capsys):
    examples, pairs = data
    train_sft(m0, examples, CFG.replace(epochs=2, log_every=2), tmp_path / "sft")  # 6 steps
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [line.split(" step ")[1].split()[0] for line in err.splitlines() if "] sft step " in line]
    assert steps == ["2/6", "4/6", "6/6"]
    compute_reference_logprobs(m0, pairs, CFG.replace(ref_micro_batch=2, log_every=3))  # 8 batches
    err = capsys.readouterr().err
    assert [line.split("batch ")[1].split()[0] for line in err.splitlines() if "reference log-probs: batch" in line] \
        == ["3/8", "6/8"]


def test_on_a_terminal_training_draws_a_bar_with_loss_and_tokens_per_s(m0, data, tmp_path, monkeypatch):
    examples, _ = data
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    train_sft(m0, examples, CFG.replace(max_steps=2, log_every=1), tmp_path / "sft")
    out = term.getvalue()
    frames = [f for f in out.split("\r") if "sft" in f and "/2" in f]
    assert frames and any("2/2" in f and "loss=" in f and "tok_s=" in f for f in frames), out[-500:]
    assert "] sft step 1/2" not in out  # the periodic line is the bar's postfix here
    with Progress(3, "x", stream=FakeTerminal(), enabled=False) as p:
        assert not p.is_bar  # only rank 0 draws


# --- two ranks -----------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_two_ranks_only_rank0_writes_and_grad_norm_matches_torch(tmp_path):
    pytest.importorskip("tensorboard")
    work = tmp_path
    make_model(work / "m0")
    sft, pairs = make_data()
    cfg = dict(lr=1e-3, min_lr=1e-4, global_batch=8, micro_batch=2, dropout=0.0, log_every=2, checkpoint_every=0,
               zero_stage=3, backend="deepspeed", seed=3, grad_clip=1.0)
    (work / "data.json").write_text(json.dumps({"cfg": cfg, "sft": sft, "pairs": pairs}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_scripts" / "metrics_train.py"), str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = work / "run"  # both ranks held a sink on this directory; rank 0 alone wrote
    text = (run / METRICS_FILE).read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in steps_of(records, "sft/M1")] == [1, 2, 3]
    assert [r["step"] for r in steps_of(records, "iter_1/6_dpo")] == [1, 2]  # 16 pairs, 8 per step
    assert all(set(r) == STEP_KEYS for r in steps_of(records, "sft/M1"))
    assert all(set(r) == DPO_KEYS for r in steps_of(records, "iter_1/6_dpo"))
    for stage in ("sft/M1", "iter_1/6_dpo"):
        assert len(list((run / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1

    # the same stages in one process with plain torch: same losses and (pre-clip) gradient norms
    plain = TrainConfig(**{**cfg, "backend": "torch"})
    sft_t = train_sft(work / "m0", [SFTExample(*e) for e in sft], plain.replace(max_steps=3), work / "sft_torch")
    ref = compute_reference_logprobs(work / "m0", [PreferencePair(*p) for p in pairs], plain)
    dpo_t = train_dpo(work / "m0", ref, plain.replace(max_steps=3), work / "dpo_torch")
    for stage, result in (("sft/M1", sft_t), ("iter_1/6_dpo", dpo_t)):
        lines = steps_of(records, stage)
        assert [r["loss"] for r in lines] == pytest.approx(result.losses, abs=1e-5)
        assert [r["grad_norm"] for r in lines] == pytest.approx([m["grad_norm"] for m in result.metrics], rel=1e-4)


# --- the loop: a tiny world run ------------------------------------------------------------------
WORLD = ("data.world={n_ift: 32, n_eft_train: 8, n_eft_eval: 3, n_eval_prompts: 6, corpus_docs: 200, "
         "pretrain_steps: 4, pretrain_batch: 4, pretrain_seq_len: 128, tokenizer_vocab_size: 512, "
         "model_overrides: {dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, max_seq_len: 384}}")
LOOP = [WORLD, "run.iterations=1", "run.chunk_size=4", "prompts.num_prompts=6", "prompts.attempts_factor=1.5",
        "prompts.world_filter=false", "prompts.min_words=1", "prompts.max_words=200", "prompts.rouge_threshold=1.0",
        "prompts.max_new_tokens=16", "responses.max_new_tokens=12", "judge.mode=expected", "judge.max_new_tokens=12",
        "eval.enabled=false", "eval.sft_baseline=false", "sft.global_batch=16", "sft.micro_batch=8",
        "sft.log_every=2", "dpo.epochs=2", "dpo.global_batch=2", "dpo.micro_batch=2", "dpo.log_every=1"]


def test_a_loop_run_writes_metrics_jsonl_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    cmd = [sys.executable, "loop/iterate.py", "--run-dir", str(run), *LOOP,
           f"data.world_cache_dir={tmp_path / 'cache'}", "run.log_to=[tensorboard]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run / METRICS_FILE)
    assert len(records) == len((run / METRICS_FILE).read_text().splitlines())
    # one summary line per finished stage, equal to its done.json
    done = {str(p.parent.relative_to(run)): json.loads(p.read_text()) for p in run.rglob("done.json")}
    summaries = {r["stage"]: r["summary"] for r in records if "summary" in r}
    assert len(summaries) == len([r for r in records if "summary" in r])
    assert set(summaries) == set(done) and {"seed", "m0", "sft/M1", "iter_1/6_dpo"} <= set(done)
    for stage in done:
        assert summaries[stage] == json.loads(json.dumps(done[stage])), stage
    # per-step lines of the three trainings (M0 pretraining at its log steps)
    assert [r["step"] for r in steps_of(records, "m0")] == [1, 4]
    sft, dpo = steps_of(records, "sft/M1"), steps_of(records, "iter_1/6_dpo")
    assert [r["step"] for r in sft] == list(range(1, done["sft/M1"]["steps"] + 1))
    assert [r["step"] for r in dpo] == list(range(1, done["iter_1/6_dpo"]["steps"] + 1))
    assert all(set(r) == STEP_KEYS for r in sft) and all(set(r) == DPO_KEYS for r in dpo)
    assert sft[-1]["loss"] == done["sft/M1"]["last_loss"] and dpo[-1]["loss"] == done["iter_1/6_dpo"]["last_loss"]
    for stage, lines in (("sft/M1", sft), ("iter_1/6_dpo", dpo)):
        tb = tb_scalars(run / "tensorboard" / stage)
        assert [s for s, _ in tb["loss"]] == [r["step"] for r in lines]
        assert [v for _, v in tb["grad_norm"]] == pytest.approx([r["grad_norm"] for r in lines], rel=1e-6)
    # off a terminal, training reports in plain lines every log_every steps
    assert "\r" not in proc.stderr
    assert "sft step 2/" in proc.stderr and "sft step 1/" not in proc.stderr
