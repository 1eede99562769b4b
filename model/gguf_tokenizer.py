"""The tokenizer a GGUF file embeds, rebuilt for the libraries we already use.

tokenizer.ggml.model "llama" (SentencePiece BPE with scores) becomes a real SentencePiece model: we
write its ModelProto bytes by hand (the protobuf package is not a dependency; the wire format is
tiny). "gpt2" (byte-level BPE with merges) becomes a `tokenizers.Tokenizer`, pre-tokenized the way
llama.cpp does for the file's tokenizer.ggml.pre."""
from __future__ import annotations

import struct

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF token types use SentencePiece's numbering: 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's regex lists per tokenizer.ggml.pre (llama-vocab.cpp); each is applied in order.
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


# --- "llama": SentencePiece ModelProto ----------------------------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are 10-byte two's complement varints
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def spm_model_proto(tokens: list[str], scores: list[float], types: list[int], *, add_dummy_prefix: bool,
                    unk_id: int, bos_id: int | None, eos_id: int | None, pad_id: int | None) -> bytes:
    """Serialized sentencepiece.ModelProto for a BPE model, as Llama's tokenizer.model is written."""
    pieces = b"".join(
        _bytes_field(1, _bytes_field(1, tok.encode("utf-8")) + _float_field(2, score)
                     + _int_field(3, kind if 1 <= kind <= 6 else NORMAL))
        for tok, score, kind in zip(tokens, scores, types)
    )
    special = {41: bos_id, 42: eos_id, 43: pad_id}
    trainer = (_int_field(3, 2)  # model_type = BPE
               + _int_field(4, len(tokens)) + _int_field(25, 1) + _int_field(26, 1)  # split_digits, ws pieces
               + _int_field(35, int(BYTE in types)) + _int_field(40, unk_id)
               + b"".join(_int_field(k, -1 if v is None else v) for k, v in special.items())
               + _bytes_field(45, tokens[unk_id].encode("utf-8"))
               + b"".join(_bytes_field(k + 5, tokens[v].encode("utf-8")) for k, v in special.items() if v is not None))
    normalizer = (_bytes_field(1, b"identity") + _int_field(3, int(add_dummy_prefix))
                  + _int_field(4, 0) + _int_field(5, 1))  # keep repeated spaces, escape them as U+2581
    return pieces + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


# --- "gpt2": byte-level BPE -------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, codes)))


def byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str | None) -> Tokenizer:
    splits = PRE_TOKENIZER_SPLITS.get(pre or "default")
    if splits is None:
        raise ValueError(f"unsupported tokenizer.ggml.pre={pre!r} (supported: {', '.join(PRE_TOKENIZER_SPLITS)})")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp keeps some normal tokens in raw UTF-8; the BPE model needs them in byte spelling.
    vocab = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                  for tok, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(tok, special=False, normalized=False)
                          for tok, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tokenizer
