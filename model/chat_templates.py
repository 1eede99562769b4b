"""The built-in chat formats (Llama 2 [INST], Llama 3 headers, ChatML), rendered straight to token ids.

Special tokens are placed by id and only the text between them goes through the tokenizer, the
way Meta's reference ChatFormat does; so what a user writes can never become a control token.
They are named overrides (model.chat_template) and the format of a checkpoint that ships no template;
a checkpoint's own Jinja template renders through model/jinja_template.py. The Jinja text of each
format is kept here so a saved tokenizer_config.json names it again (read back as this format)."""
from __future__ import annotations

from typing import Protocol

TEMPLATES = ("llama2", "llama3", "chatml")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Tokens that end an assistant turn, besides eos, under each format.
END_OF_TURN = {"llama2": (), "llama3": ("<|eot_id|>", "<|end_of_text|>"), "chatml": ("<|im_end|>",)}

JINJA = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
               "{% if loop.index0 == 0 and system_message != false %}"
               "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
               "{% else %}{% set content = message['content'] %}{% endif %}"
               "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
               "{% endfor %}"),
}


class TextEncoder(Protocol):
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def token_id(self, token: str) -> int | None: ...


def render(name: str, tok: TextEncoder, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    if name == "llama2":
        return _llama2(tok, messages)
    if name == "llama3":
        return _llama3(tok, messages, add_generation_prompt)
    if name == "chatml":
        return _chatml(tok, messages, add_generation_prompt)
    raise ValueError(f"unknown chat template {name!r} (built in: {', '.join(TEMPLATES)})")


def _special(tok: TextEncoder, token: str, name: str) -> int:
    token_id = tok.token_id(token)
    if token_id is None:
        raise ValueError(f"chat template {name!r} needs the token {token!r}, which this tokenizer lacks")
    return token_id


def _llama2(tok: TextEncoder, messages: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion: each [INST] exchange wrapped in bos ... eos."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise ValueError("llama2 chat template: a system message must be followed by a user message")
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    for i, m in enumerate(msgs):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("llama2 chat template: messages must alternate user/assistant (after an optional system)")
    ids: list[int] = []
    for i in range(0, len(msgs) - 1, 2):
        user, answer = msgs[i]["content"].strip(), msgs[i + 1]["content"].strip()
        ids += tok.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
    if len(msgs) % 2:
        ids += tok.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def _llama3(tok: TextEncoder, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Meta's llama3 ChatFormat: <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>."""
    start, end = _special(tok, "<|start_header_id|>", "llama3"), _special(tok, "<|end_header_id|>", "llama3")
    eot = _special(tok, "<|eot_id|>", "llama3")

    def header(role: str) -> list[int]:
        return [start] + tok.encode(role, bos=False) + [end] + tok.encode("\n\n", bos=False)

    ids = [tok.bos_id] if tok.bos_id is not None else []
    for m in messages:
        ids += header(m["role"]) + tok.encode(m["content"].strip(), bos=False) + [eot]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


def _chatml(tok: TextEncoder, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """<|im_start|>role\\ncontent<|im_end|>\\n per message; bos only if the tokenizer adds one by default."""
    start, end = _special(tok, "<|im_start|>", "chatml"), _special(tok, "<|im_end|>", "chatml")
    newline = tok.encode("\n", bos=False)
    ids = [tok.bos_id] if tok.add_bos and tok.bos_id is not None and tok.bos_id != start else []
    for m in messages:
        ids += [start] + tok.encode(f"{m['role']}\n{m['content']}", bos=False) + [end] + newline
    if add_generation_prompt:
        ids += [start] + tok.encode("assistant\n", bos=False)
    return ids
