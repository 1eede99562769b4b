"""bench/dpo_vs_trl.py's parts that decide what is compared: the pairs, the TRL side's tokenizer (it must
give back exactly the shared ids) and the training probe's memory reading."""
import pytest

from bench.dpo_vs_trl import MAX_LEN, MAX_PAIR, MIN_PAIR, VOCAB, synthetic_pairs
from bench.trl_side import BOS, EOS, TrainingProbe, real_tokens, text, tokenizer_json


def test_pairs_are_fixed_and_in_range():
    pairs = synthetic_pairs(64, seed=0)
    assert pairs == synthetic_pairs(64, seed=0) and pairs != synthetic_pairs(64, seed=1)
    lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    assert MIN_PAIR <= min(lengths) and max(lengths) <= MAX_PAIR <= MAX_LEN
    for p in pairs:
        assert p["prompt_ids"][0] == BOS and p["chosen_ids"][-1] == EOS and p["rejected_ids"][-1] == EOS
        assert all(EOS < t < VOCAB for t in p["prompt_ids"][1:] + p["chosen_ids"][:-1] + p["rejected_ids"][:-1])
    assert real_tokens(pairs[:1], 2) == 2 * (2 * len(pairs[0]["prompt_ids"]) + len(pairs[0]["chosen_ids"])
                                             + len(pairs[0]["rejected_ids"]))


def test_trl_tokenizer_gives_back_the_shared_ids(tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(VOCAB)))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    for p in synthetic_pairs(4, seed=3):
        prompt, chosen = text(p["prompt_ids"]), text(p["chosen_ids"], " ")
        assert tok(prompt)["input_ids"] == p["prompt_ids"]
        assert tok(prompt + chosen)["input_ids"] == p["prompt_ids"] + p["chosen_ids"]
        assert chosen.endswith(tok.eos_token)  # DPOTrainer then adds no EOS of its own


def test_probe_sees_growth_after_start_only():
    before = bytearray(64 << 20)  # resident before start(): must not count
    before[::4096] = b"x" * len(before[::4096])
    del before
    probe = TrainingProbe()
    probe.start()
    during = bytearray(32 << 20)
    during[::4096] = b"y" * len(during[::4096])
    probe.stop()
    r = probe.result(tokens=100)
    assert 30 <= r["growth_mb"] < 60, r
    assert r["tokens"] == 100 and r["tokens_per_s"] > 0
    del during


def test_trl_side_gets_the_library_caches_unless_asked(tmp_path, monkeypatch):
    from bench.dpo_vs_trl import CAPACITY, EXPORTED, KEYS, child_env

    for k in KEYS:  # as in the parent once `import engine` has exported its bound
        monkeypatch.setenv(k, str(CAPACITY))
    assert all(child_env("ours", tmp_path, 2)[k] == str(CAPACITY) for k in KEYS)
    trl = child_env("trl", tmp_path, 2, EXPORTED)
    assert {k: trl.get(k) for k in KEYS} == {k: EXPORTED.get(k) for k in KEYS}
    assert all(child_env("trl", tmp_path, 2, {k: str(CAPACITY) for k in KEYS})[k] == str(CAPACITY) for k in KEYS)
