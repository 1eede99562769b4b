"""One tokenizer interface over SentencePiece (tokenizer.model), HF `tokenizers` (tokenizer.json) and
the tokenizer a GGUF file embeds, with the built-in chat formats of model/chat_templates.py."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import chat_templates

SPM_FILE, HF_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; one line naming the file (and key)."""

    def __init__(self, file, problem: str):
        super().__init__(" ".join(f"{file}: {problem}".split()))


class _SentencePiece:
    def __init__(self, model_proto: bytes):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def save(self, directory: Path) -> None:
        _write_atomic(directory / SPM_FILE, self.model_proto)


class _HFTokenizers:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def save(self, directory: Path) -> None:
        _write_atomic(directory / HF_FILE, self.tok.to_str().encode("utf-8"))


class Tokenizer:
    """encode/decode plus what the engine needs to know: bos/eos/pad ids and the chat format.

    add_bos says whether the checkpoint expects bos before plain text (it decides chatml's bos);
    encode's bos argument is always obeyed."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, add_bos: bool,
                 chat_template: str, template_source: str | None = None):
        if chat_template not in chat_templates.TEMPLATES:
            raise ValueError(f"unknown chat template {chat_template!r} (built in: {', '.join(chat_templates.TEMPLATES)})")
        self._backend = backend
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.pad_id = pad_id if pad_id is not None else eos_id  # pad positions are masked; any real id works
        self.chat_template = chat_template
        self._template_source = template_source  # the checkpoint's Jinja text, kept when it is this format
        self.vocab_size = backend.vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self._backend.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        """The id of one whole vocabulary entry (e.g. '<|im_end|>'), or None."""
        return self._backend.token_id(token)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        ids = [self.eos_id] + [self.token_id(t) for t in chat_templates.END_OF_TURN[self.chat_template]]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return chat_templates.render(self.chat_template, self, messages, add_generation_prompt)

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files (tokenizer.model or tokenizer.json, plus tokenizer_config.json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        name = lambda i: None if i is None else self._backend.token(i)  # noqa: E731
        config = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
                  "add_bos_token": self.add_bos, "add_eos_token": False,
                  "chat_template": self._template_source or chat_templates.JINJA[self.chat_template]}
        _write_atomic(directory / CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- loading -----------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """path: tokenizer.model, tokenizer.json, a directory holding either, or a .gguf file.
    chat_template: a built-in name to override what the checkpoint declares."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _from_gguf(path, chat_template)
    if path.is_dir():
        for name in (HF_FILE, SPM_FILE):  # tokenizer.json is the complete one when both exist
            if (path / name).is_file():
                return load_tokenizer(path / name, chat_template)
        raise TokenizerError(path, f"no {HF_FILE} or {SPM_FILE} in this directory")
    if not path.is_file():
        raise TokenizerError(path, "no such file")
    config = _read_config(path.parent)
    if path.suffix == ".json":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = _HFTokenizers(HFTokenizer.from_file(str(path)))
        except Exception as e:
            raise TokenizerError(path, f"cannot read tokenizer.json ({type(e).__name__}: {e})") from None
        ids = {k: _config_token_id(backend, config, k) for k in ("bos", "eos", "pad")}
    else:
        try:
            backend = _SentencePiece(path.read_bytes())
        except Exception as e:
            raise TokenizerError(path, f"cannot read SentencePiece model ({type(e).__name__}: {e})") from None
        sp = backend.sp
        ids = {k: _config_token_id(backend, config, k) for k in ("bos", "eos", "pad")}
        for key, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
            if ids[key] is None and value >= 0:
                ids[key] = value
    add_bos = config.get("add_bos_token", ids["bos"] is not None and backend.token_id("<|im_start|>") is None)
    return _build(backend, ids, bool(add_bos), config.get("chat_template"), chat_template, path)


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json (plus special_tokens_map.json) beside the tokenizer, if any."""
    config = {}
    for name in ("special_tokens_map.json", CONFIG_FILE):
        f = directory / name
        if f.is_file():
            try:
                config.update(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise TokenizerError(f, f"not valid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # HF allows named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        config["chat_template"] = named.get("default") or next(iter(named.values()), None)
    return config


def _config_token_id(backend, config: dict, key: str) -> int | None:
    token = config.get(f"{key}_token")
    if isinstance(token, dict):  # HF's AddedToken form
        token = token.get("content")
    return backend.token_id(token) if isinstance(token, str) else None


def _build(backend, ids: dict, add_bos: bool, template_text: str | None, override: str | None, source) -> Tokenizer:
    detected = chat_templates.detect(template_text)
    if override is not None:
        name = override
    elif detected is not None:
        name = detected
    elif template_text in chat_templates.TEMPLATES:  # a bare name, as this engine's own exports may hold
        name = template_text
    elif template_text:
        # a format we cannot render (Gemma, Phi, ...): guessing one would train on the wrong markers
        raise TokenizerError(source, "the checkpoint's chat template is not one the engine recognises (built in: "
                             f"{', '.join(chat_templates.TEMPLATES)}); name the format to use with chat_template= "
                             "(model.chat_template in a loop config)")
    elif backend.token_id("<|im_start|>") is not None:
        name = "chatml"
    elif backend.token_id("<|start_header_id|>") is not None:
        name = "llama3"
    else:
        name = "llama2"
    try:
        return Tokenizer(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], add_bos=add_bos,
                         chat_template=name, template_source=template_text if detected == name else None)
    except ValueError as e:
        raise TokenizerError(source, str(e)) from None


def _from_gguf(path: Path, chat_template: str | None) -> Tokenizer:
    from .gguf_format import metadata, open_gguf
    from .gguf_tokenizer import byte_level_bpe, spm_model_proto
    from .weight_loading import CheckpointError

    try:
        reader = open_gguf(path)
    except CheckpointError as e:
        raise TokenizerError(path, e.problem) from None
    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(path, "no embedded tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = metadata(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {"bos": metadata(reader, "tokenizer.ggml.bos_token_id"), "eos": metadata(reader, "tokenizer.ggml.eos_token_id"),
           "pad": metadata(reader, "tokenizer.ggml.padding_token_id")}
    if kind == "llama":
        scores = metadata(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = metadata(reader, "tokenizer.ggml.unknown_token_id", 0)
        proto = spm_model_proto(tokens, scores, types, add_dummy_prefix=metadata(reader, "tokenizer.ggml.add_space_prefix", True),
                                unk_id=unk, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])
        backend = _SentencePiece(proto)
        add_bos = metadata(reader, "tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    elif kind == "gpt2":
        try:
            backend = _HFTokenizers(byte_level_bpe(tokens, types, metadata(reader, "tokenizer.ggml.merges", []),
                                                   metadata(reader, "tokenizer.ggml.pre")))
        except ValueError as e:
            raise TokenizerError(path, str(e)) from None
        add_bos = metadata(reader, "tokenizer.ggml.add_bos_token", False)
    else:
        raise TokenizerError(path, f"unsupported tokenizer.ggml.model={kind!r} (supported: llama, gpt2)")
    return _build(backend, ids, bool(add_bos), metadata(reader, "tokenizer.chat_template"), chat_template, path)
