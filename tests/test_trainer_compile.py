"""`compile` under the DeepSpeed runner (ZeRO-3, one CPU process, inductor): SFT and DPO steps with compile
on give the losses of compile off within 1e-5 relative, and the decoder layers really ran compiled, with
ZeRO's parameter hooks kept out of the graphs (no graph breaks)."""
import shutil

import pytest
import torch

from engine.config import DPOConfig, TrainConfig
from engine.data import PreferencePair, SFTExample
from engine.trainer import compute_reference_logprobs, train_dpo, train_sft
from model.checkpoint import save_pretrained
from model.config import LlamaConfig
from model.llama import Llama

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="inductor needs a C++ compiler on CPU")
V = 96
# pad_to_multiple 16: every micro-batch has one shape per stage, so each layer compiles once (no dynamic-shape
# recompiles) and the test stays short
CFG = TrainConfig(lr=1e-3, min_lr=1e-4, global_batch=4, micro_batch=2, dropout=0.0, log_every=1, checkpoint_every=0,
                  backend="deepspeed", zero_stage=3, seed=3, max_steps=2, pad_to_multiple=16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("compile")
    config = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), work / "m0")
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    examples = [SFTExample(ids(2 + i % 5), ids(3 + i % 7)) for i in range(8)]
    pairs = [PreferencePair(f"p{i}", ids(2 + i % 3), ids(3 + i % 4), ids(2 + i % 5)) for i in range(8)]
    pairs = compute_reference_logprobs(work / "m0", pairs, CFG)
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cfg = CFG.replace(compile=compiled)
        sft = train_sft(work / "m0", examples, cfg, work / f"sft_{compiled}", resume=False)
        dpo = train_dpo(work / "m0", pairs, DPOConfig.extend(cfg, nll_weight=0.5), work / f"dpo_{compiled}",
                        resume=False)
        counters = torch._dynamo.utils.counters
        out[compiled] = dict(sft=sft.losses, dpo=dpo.losses, graphs=counters["stats"]["unique_graphs"],
                             breaks=dict(counters["graph_break"]))
    return out


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_compiled_losses_match_eager(runs, kind):
    eager, compiled = runs[False][kind], runs[True][kind]
    assert len(eager) == len(compiled) == 2 and len(set(eager)) == 2  # it trains: the update moved the loss
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_layers_ran_compiled_without_graph_breaks(runs):
    assert runs[False]["graphs"] == 0
    assert runs[True]["graphs"] >= 1, "compile=True compiled nothing"
    assert runs[True]["breaks"] == {}, runs[True]["breaks"]
