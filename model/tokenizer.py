"""One tokenizer interface over SentencePiece (tokenizer.model), HF `tokenizers` (tokenizer.json) and
the tokenizer a GGUF file embeds. Chat format: the checkpoint's own Jinja template when it ships one
(model/jinja_template.py), else, or when named, a built-in one (model/chat_templates.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from common.atomic import atomic_write_bytes

from . import chat_templates
from .jinja_template import SPECIAL_TOKEN_NAMES, ChatTemplateError, JinjaTemplate

SPM_FILE, HF_FILE, CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
# transformers saves the template here (it wins over tokenizer_config.json's); generation_config.json
# lists the ids generation stops at (Llama 3 Instruct: <|end_of_text|> and <|eot_id|>)
TEMPLATE_FILE, GENERATION_FILE = "chat_template.jinja", "generation_config.json"
JINJA = "jinja"  # Tokenizer.chat_template when the checkpoint's own template renders


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
        self._control_re = None  # built on the first chat encoded

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def control_tokens(self) -> list[str]:
        sp = self.sp
        return [sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]

    def encode_chat(self, text: str) -> list[int]:
        """Rendered chat text. SentencePiece reads "<s>" as plain text, so control pieces are cut out first
        and each stretch between them encoded on its own (a dummy prefix per stretch, as Meta's reference
        encodes each [INST] exchange); user-defined pieces SentencePiece matches itself."""
        if self._control_re is None:
            controls = sorted(filter(None, self.control_tokens()), key=len, reverse=True)
            self._control_re = re.compile("(" + "|".join(map(re.escape, controls)) + ")" if controls else "(?!)")
        ids: list[int] = []
        for i, piece in enumerate(self._control_re.split(text)):
            if i % 2:
                ids.append(self.sp.piece_to_id(piece))
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def save(self, directory: Path) -> None:
        atomic_write_bytes(directory / SPM_FILE, self.model_proto)


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

    def control_tokens(self) -> list[str]:
        return [t.content for t in self.tok.get_added_tokens_decoder().values()]

    def encode_chat(self, text: str) -> list[int]:
        return self.encode(text)  # added tokens are matched in the text, as transformers' fast tokenizers do

    def save(self, directory: Path) -> None:
        atomic_write_bytes(directory / HF_FILE, self.tok.to_str().encode("utf-8"))


class Tokenizer:
    """encode/decode plus what the engine needs to know: bos/eos/pad ids and the chat format.

    chat_template: a built-in name (chat_templates.TEMPLATES) or "jinja", the checkpoint's own template
    (jinja: the JinjaTemplate). add_bos says whether the checkpoint expects bos before plain text (it
    decides chatml's bos); encode's bos argument is always obeyed. extra_stop_ids: ids the checkpoint
    declares generation stops at besides eos (generation_config.json, GGUF eot/eom)."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, add_bos: bool,
                 chat_template: str, template_source: str | None = None, jinja: JinjaTemplate | None = None,
                 extra_stop_ids: tuple[int, ...] = ()):
        if jinja is None and chat_template not in chat_templates.TEMPLATES:
            raise ValueError(f"unknown chat template {chat_template!r} (built in: {', '.join(chat_templates.TEMPLATES)})")
        self._backend = backend
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.pad_id = pad_id if pad_id is not None else eos_id  # pad positions are masked; any real id works
        self.chat_template = JINJA if jinja is not None else chat_template
        self._template_source = template_source  # the checkpoint's text of a built-in format, saved back as is
        self._jinja = jinja
        self._extra_stop_ids = tuple(extra_stop_ids)
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
    def end_of_turn_id(self) -> int | None:
        """The token that closes an assistant turn: the template's own (see model/jinja_template.py), the
        built-in format's (<|eot_id|>, <|im_end|>), else eos."""
        if self._jinja is not None:
            found = self._jinja.end_of_turn_id
        else:
            marks = map(self.token_id, chat_templates.END_OF_TURN[self.chat_template])
            found = next((i for i in marks if i is not None), None)
        return found if found is not None else self.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """eos first, then the end-of-turn tokens, then the checkpoint's declared stop ids."""
        if self._jinja is not None:
            ids = [self.eos_id, self._jinja.end_of_turn_id]
        else:
            ids = [self.eos_id] + [self.token_id(t) for t in chat_templates.END_OF_TURN[self.chat_template]]
        return tuple(dict.fromkeys(i for i in ids + list(self._extra_stop_ids) if i is not None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self._jinja is not None:
            return self._jinja.apply(messages, add_generation_prompt)
        return chat_templates.render(self.chat_template, self, messages, add_generation_prompt)

    def reply_ids(self, text: str, finished: bool = True) -> list[int]:
        """An assistant reply as training ids: what the model generates after apply_chat_template(...,
        add_generation_prompt=True) to say `text`, through the end-of-turn token when finished."""
        if self._jinja is not None:
            return self._jinja.reply_ids(text, finished, self.end_of_turn_id)
        ids = self.encode(text, bos=False, eos=False)
        end = self.end_of_turn_id
        return ids + [end] if finished and end is not None else ids

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files (tokenizer.model or tokenizer.json, plus tokenizer_config.json, and
        generation_config.json when the checkpoint declared stop ids besides eos)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(directory)
        name = lambda i: None if i is None else self._backend.token(i)  # noqa: E731
        config = dict(self._jinja.special_tokens) if self._jinja is not None else {}
        config.update({"bos_token": name(self.bos_id), "eos_token": name(self.eos_id), "pad_token": name(self.pad_id),
                       "add_bos_token": self.add_bos, "add_eos_token": False,
                       "chat_template": (self._jinja.text if self._jinja is not None else
                                         self._template_source or chat_templates.JINJA[self.chat_template])})
        atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        if self._extra_stop_ids:
            stops = list(dict.fromkeys([i for i in (self.eos_id,) if i is not None] + list(self._extra_stop_ids)))
            atomic_write_bytes(directory / GENERATION_FILE, (json.dumps({"eos_token_id": stops}, indent=2) + "\n").encode())


# --- loading -----------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """path: tokenizer.model, tokenizer.json, a directory holding either, or a .gguf file.
    chat_template: a built-in name, which wins over the checkpoint's own template."""
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
        specials = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _config_token(config, k)) is not None}
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
        # as transformers' LlamaTokenizer: bos/eos/unk default to the model's own pieces
        specials = {k: t for k in SPECIAL_TOKEN_NAMES if (t := _config_token(config, k)) is not None}
        for key, value in (("bos_token", ids["bos"]), ("eos_token", ids["eos"]), ("unk_token", sp.unk_id())):
            if key not in specials and value is not None and value >= 0:
                specials[key] = sp.id_to_piece(value)
    add_bos = config.get("add_bos_token", ids["bos"] is not None and backend.token_id("<|im_start|>") is None)
    stops = _generation_stop_ids(path.parent)
    return _build(backend, ids, bool(add_bos), config.get("chat_template"), chat_template, path, specials, stops)


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json (plus special_tokens_map.json, and chat_template.jinja, which wins for the
    template as in transformers) beside the tokenizer, if any."""
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
    if (directory / TEMPLATE_FILE).is_file():
        config["chat_template"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    return config


def _generation_stop_ids(directory: Path) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list of ids), if the file is there."""
    f = directory / GENERATION_FILE
    if not f.is_file():
        return ()
    try:
        value = json.loads(f.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise TokenizerError(f, f"not a JSON object ({e})") from None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) for v in values if v is not None):
        raise TokenizerError(f, f"eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(v for v in values if v is not None)


def _config_token(config: dict, key: str) -> str | None:
    token = config.get(key)
    if isinstance(token, dict):  # HF's AddedToken form
        token = token.get("content")
    return token if isinstance(token, str) else None


def _config_token_id(backend, config: dict, key: str) -> int | None:
    token = _config_token(config, f"{key}_token")
    return backend.token_id(token) if token is not None else None


def _build(backend, ids: dict, add_bos: bool, template_text: str | None, override: str | None, source,
           specials: dict[str, str], stop_ids: tuple[int, ...]) -> Tokenizer:
    own = next((n for n, text in chat_templates.JINJA.items() if template_text == text), None)
    jinja = None
    if override is not None:
        name = override
    elif template_text in chat_templates.TEMPLATES:  # a bare name, as this engine's own exports may hold
        name = template_text
    elif own is not None:  # this engine's text of a built-in format: the same format again
        name = own
    elif template_text:
        name = JINJA
        try:
            jinja = JinjaTemplate(template_text, encode=backend.encode_chat, token_id=backend.token_id,
                                  special_tokens=specials, control_tokens=backend.control_tokens(), source=source)
        except ChatTemplateError as e:
            raise TokenizerError(source, str(e).removeprefix(f"{source}: ")) from None
    elif backend.token_id("<|im_start|>") is not None:
        name = "chatml"
    elif backend.token_id("<|start_header_id|>") is not None:
        name = "llama3"
    else:
        name = "llama2"
    stop_ids = tuple(i for i in stop_ids if i != ids["eos"] and 0 <= i < backend.vocab_size)
    try:
        return Tokenizer(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], add_bos=add_bos,
                         chat_template=name, template_source=template_text if own == name else None, jinja=jinja,
                         extra_stop_ids=stop_ids)
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
    # the special tokens a template may name, from the ids llama.cpp's converter records
    specials = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("sep_token", "seperator"),
                      ("pad_token", "padding"), ("cls_token", "cls"), ("mask_token", "mask")):
        i = metadata(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            specials[name] = tokens[i]
    # llama.cpp's end-of-turn and end-of-message ids (Llama 3: <|eot_id|>, <|eom_id|>)
    stops = tuple(i for key in ("eot", "eom") if (i := metadata(reader, f"tokenizer.ggml.{key}_token_id")) is not None)
    return _build(backend, ids, bool(add_bos), metadata(reader, "tokenizer.chat_template"), chat_template, path,
                  specials, stops)
