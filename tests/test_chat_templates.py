"""A checkpoint's own Jinja chat template against transformers' apply_chat_template(tokenize=True).

One tiny byte-level BPE (the `tokenizers` library) carries every family's special tokens; each case
saves it with one real-world-style template (Mistral [INST], Qwen2 ChatML with its default system
prompt, Gemma <start_of_turn>, Zephyr, Phi-3, Llama 3, and one using namespace/tojson/loop controls),
loads it with ours and with transformers.AutoTokenizer, and compares ids exactly: with and without a
system message, add_generation_prompt both ways, multi-turn. Then the training view: an assistant reply
as ids ends with the template's end-of-turn token and continues the prompt as the full render does.
Also: the same template embedded in a GGUF, Llama 2's template over a SentencePiece model, a template
that raises, a syntax error, and a named built-in format winning over the checkpoint's template.
"""
import json
from pathlib import Path

import pytest

from model.jinja_template import ChatTemplateError
from model.tokenizer import TokenizerError, load_tokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SPM = ROOT / "tests" / "fixtures" / "llama2-spm" / "tokenizer.model"

SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
            "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]"]
CORPUS = ["The capital of France is Paris. What is 2 + 2? It is 4.", "Hello! How are you today?",
          "You are a helpful assistant. Be brief and kind.", "user assistant system model answer question",
          "Ünïcødé, émojis 🦙 and <tags> & 'quotes' \"double\"", "\n\n  indented\ttabs\n"] * 4

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
# trim_blocks matters here: each block tag's newline goes, the newline after each {{ }} stays
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
PHI3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
# namespace, tojson (not HTML-escaped), {% continue %}: the environment's extras
EXTRAS = """{%- set ns = namespace(system=none, turns=0) -%}
{%- for m in messages -%}
    {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- continue -%}{%- endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {{- '<|im_start|>' + m['role'] + '\\n' -}}
    {%- if ns.system is not none and ns.turns == 1 -%}{{- {'system': ns.system} | tojson -}}{{- '\\n' -}}{%- endif -%}
    {{- m['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

# name: (template, bos, eos, generation_config eos ids (token names) or None, end of turn, supports system)
CASES = {
    "mistral": (MISTRAL, "<s>", "</s>", None, "</s>", True),
    "qwen2": (QWEN2, None, "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"], "<|im_end|>", True),
    "gemma": (GEMMA, "<s>", "</s>", None, "<end_of_turn>", True),
    "zephyr": (ZEPHYR, None, "</s>", None, "</s>", True),
    "phi3": (PHI3, "<s>", "<|endoftext|>", None, "<|end|>", True),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|end_of_text|>", "<|eot_id|>"], "<|eot_id|>", True),
    "extras": (EXTRAS, None, "<|endoftext|>", None, "<|im_end|>", True),
}
SYSTEM = {"role": "system", "content": "You are terse. Use <b>tags</b> & 'quotes'."}
U1, A1 = {"role": "user", "content": " What is 2 + 2? "}, {"role": "assistant", "content": "It is 4.\n"}
U2 = {"role": "user", "content": "Ünïcødé 🦙 and\n\nnewlines"}
CONVERSATIONS = [[U1], [SYSTEM, U1], [U1, A1], [U1, A1, U2], [SYSTEM, U1, A1, U2]]


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def checkpoint_dir(root: Path, base: Path, name: str) -> Path:
    template, bos, eos, stops, _, _ = CASES[name]
    d = root / name
    d.mkdir()
    (d / "tokenizer.json").write_bytes(base.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "unk_token": "<unk>",
              "chat_template": template}
    if bos is not None:
        config["bos_token"] = bos
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if stops is not None:
        vocab = json.loads(base.read_text())["added_tokens"]
        ids = {t["content"]: t["id"] for t in vocab}
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[s] for s in stops]}))
    return d


def hf_ids(hf, messages, add_generation_prompt):
    return list(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                       return_dict=True)["input_ids"])


@pytest.mark.parametrize("name", list(CASES))
def test_ids_equal_transformers(name, base_tokenizer, tmp_path):
    d = checkpoint_dir(tmp_path, base_tokenizer, name)
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.chat_template == "jinja"
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == hf_ids(hf, messages, gen), \
                (messages, gen, ours.decode(ours.apply_chat_template(messages, gen)))

    # Stop ids: eos, the template's end of turn, generation_config.json's list.
    _, _, eos, stops, end, _ = CASES[name]
    want = {ours.token_id(t) for t in [eos, end] + (stops or [])}
    assert set(ours.stop_ids) == want and ours.stop_ids[0] == ours.eos_id
    assert ours.end_of_turn_id == ours.token_id(end)

    # A reply as training ids: after the prompt's ids it spells the closed conversation up to its end of
    # turn; the same ids as the whole conversation's wherever the tokenizer does not merge across the cut.
    for text in ("It is 4.", "Paris, of course 🦙"):
        prompt = ours.apply_chat_template([U1])
        reply = ours.reply_ids(text, finished=True)
        closed = [U1, {"role": "assistant", "content": text}]
        closed_text = hf.apply_chat_template(closed, tokenize=False)
        assert hf.decode(prompt + reply) == closed_text[:closed_text.rindex(end) + len(end)]
        assert reply[-1] == ours.token_id(end) and ours.decode(reply[:-1]).strip() == text
        closed_ids = hf_ids(hf, closed, False)
        if closed_ids[:len(prompt)] == prompt:
            assert prompt + reply == closed_ids[:len(prompt) + len(reply)]
        assert ours.reply_ids(text, finished=False) == reply[:-1]  # cut by length: no end of turn


def test_a_raising_template_is_one_line_naming_the_checkpoint(base_tokenizer, tmp_path):
    d = checkpoint_dir(tmp_path, base_tokenizer, "mistral")
    tok = load_tokenizer(d)
    with pytest.raises(ChatTemplateError) as e:
        tok.apply_chat_template([U1, U2])  # roles must alternate
    assert str(e.value).startswith(str(d / "tokenizer.json")) and "must alternate" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(Exception, match="must alternate"):  # transformers refuses it too
        hf_ids(transformers.AutoTokenizer.from_pretrained(d), [U1, U2], True)

    # One that raises on every conversation cannot be loaded at all; a syntax error names its line.
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('This model has no chat format.') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="This model has no chat format") as e:
        load_tokenizer(d)
    assert str(e.value).startswith(str(d / "tokenizer.json")) and "\n" not in str(e.value)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% if %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="chat template: line 2") as e:
        load_tokenizer(d)
    assert "\n" not in str(e.value)


def test_sandbox_refuses_python_internals(base_tokenizer, tmp_path):
    d = checkpoint_dir(tmp_path, base_tokenizer, "qwen2")
    config = json.loads((d / "tokenizer_config.json").read_text())
    for evil in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                 "{{ messages.append(1) }}"):
        config["chat_template"] = evil + QWEN2
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(TokenizerError, match="chat template"):
            load_tokenizer(d)


def test_named_builtin_wins_and_saves_back(base_tokenizer, tmp_path):
    d = checkpoint_dir(tmp_path, base_tokenizer, "qwen2")
    own, builtin = load_tokenizer(d), load_tokenizer(d, chat_template="chatml")
    assert builtin.chat_template == "chatml"
    alone = [U1]
    assert own.apply_chat_template(alone) != builtin.apply_chat_template(alone)  # no default system prompt
    assert builtin.apply_chat_template([SYSTEM, U1]) == own.apply_chat_template([SYSTEM, U1])
    assert builtin.reply_ids("It is 4.") == own.reply_ids("It is 4.")  # ends with <|im_end|>, not eos
    # Saved, each reads back as what it was: the checkpoint's template, or the built-in format.
    own.save(tmp_path / "own")
    builtin.save(tmp_path / "builtin")
    again, again_builtin = load_tokenizer(tmp_path / "own"), load_tokenizer(tmp_path / "builtin")
    assert again.chat_template == "jinja" and again_builtin.chat_template == "chatml"
    assert again.apply_chat_template(alone) == own.apply_chat_template(alone) == hf_ids(
        transformers.AutoTokenizer.from_pretrained(tmp_path / "own"), alone, True)
    assert again.stop_ids == own.stop_ids and again_builtin.stop_ids == builtin.stop_ids
    # transformers' own chat_template.jinja file wins over tokenizer_config.json's entry.
    (d / "chat_template.jinja").write_text(ZEPHYR)
    assert load_tokenizer(d).apply_chat_template(alone) == hf_ids(transformers.AutoTokenizer.from_pretrained(d),
                                                                   alone, True)


def test_gguf_with_a_template(base_tokenizer, tmp_path):
    """The same vocabulary and Qwen2 template embedded in a GGUF (llama.cpp's "gpt2" tokenizer, eot id)."""
    gguf = pytest.importorskip("gguf")
    d = checkpoint_dir(tmp_path, base_tokenizer, "qwen2")
    raw = json.loads(base_tokenizer.read_text())
    vocab = {**raw["model"]["vocab"], **{t["content"]: t["id"] for t in raw["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in raw["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_eot_token_id(vocab["<|im_end|>"])
    w.add_chat_template(QWEN2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok, hf = load_tokenizer(tmp_path / "m.gguf"), transformers.AutoTokenizer.from_pretrained(d)
    assert tok.chat_template == "jinja" and set(tok.stop_ids) == {vocab["<|endoftext|>"], vocab["<|im_end|>"]}
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == hf_ids(hf, messages, True)
    # Saved (as a GGUF init's HF export is), the template and the eot id come back.
    tok.save(tmp_path / "export")
    again = load_tokenizer(tmp_path / "export")
    assert again.stop_ids == tok.stop_ids and again.apply_chat_template([U1]) == tok.apply_chat_template([U1])


def test_llama2_template_over_sentencepiece(tmp_path):
    """Meta's Llama 2 chat template (HF's) over the SentencePiece model: "<s>" and "</s>" in the rendered
    text become control ids, as transformers' LlamaTokenizer reads them; equal to the built-in llama2."""
    llama2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
              "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
              "{% endif %}{% for message in loop_messages %}"
              "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
              "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
              "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
              "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
              "{% endfor %}")
    (tmp_path / "tokenizer.model").write_bytes(SPM.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": llama2}))
    ours, builtin = load_tokenizer(tmp_path), load_tokenizer(tmp_path, chat_template="llama2")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.chat_template == "jinja" and ours.stop_ids == (2,)
    for messages in ([U1], [SYSTEM, U1], [SYSTEM, U1, A1, U2]):
        assert ours.apply_chat_template(messages) == hf_ids(hf, messages, True) == builtin.apply_chat_template(messages)
    assert ours.reply_ids("It is 4.")[-1] == 2


@pytest.mark.multiproc
def test_loop_trains_and_stops_on_the_templates_end_of_turn(base_tokenizer, tmp_path):
    """2 ranks (torchrun, gloo, ZeRO-3): the loop's SFT examples from a Jinja checkpoint train on the prompt's
    ids + the reply + <|im_end|> (not eos), and the trained model, sampled greedily with the tokenizer's
    stop ids, says the reply and stops on <|im_end|>."""
    import os
    import subprocess
    import sys

    import torch

    from model.checkpoint import save_pretrained
    from model.config import LlamaConfig
    from model.llama import Llama

    tokdir = checkpoint_dir(tmp_path, base_tokenizer, "qwen2")
    (tokdir / "generation_config.json").unlink()  # the end of turn must come from the template itself
    tok = load_tokenizer(tokdir)
    config = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         max_seq_len=128)
    save_pretrained(Llama(config).init_weights(0.05, torch.Generator().manual_seed(0)), tmp_path / "m0",
                    tokenizer_dir=tokdir)
    rows = [{"id": "a", "prompt": "What is 2 + 2?", "response": "It is 4."},
            {"id": "b", "prompt": "The capital of France?", "response": "Paris!"}]
    (tmp_path / "ift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_scripts" / "jinja_chat_train.py"), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    out = ranks[0]
    im_end, eos = tok.token_id("<|im_end|>"), tok.eos_id
    assert im_end != eos and out["stop_ids"] == [eos, im_end] == out["exported_stop_ids"]
    assert out["exported_template"] == "jinja"
    hf = transformers.AutoTokenizer.from_pretrained(tokdir)
    for (prompt, response), row in zip(out["examples"], rows):
        assert prompt == hf_ids(hf, [{"role": "user", "content": row["prompt"]}], True)
        user = {"role": "user", "content": row["prompt"]}
        closed = hf_ids(hf, [user, {"role": "assistant", "content": row["response"]}], False)
        assert prompt + response == closed[:-1]  # all but the newline the template writes after <|im_end|>
        assert response[-1] == im_end
    for c, row in zip(out["completions"], rows):
        assert c["finish_reason"] == "stop" and c["token_ids"][-1] == im_end, c
        assert c["text"] == row["response"]
