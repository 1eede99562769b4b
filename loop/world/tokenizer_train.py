"""Train the world's sentencepiece tokenizer (small BPE vocabulary, byte fallback, deterministic).

Llama's special ids (unk 0, bos 1, eos 2) are kept and a pad id 3 is added. Chat-template markers
("[INST]", "[/INST]", ...), the judge template's "<response>" tags and the newline are single pieces, so the
prompts the loop builds stay short. Training runs single-threaded on a fixed, unshuffled sentence
list, which makes the model file byte-identical for the same text.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

from common.atomic import atomic_write_bytes

SPECIAL_PIECES = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<response>", "</response>", "\n")
# Training text is cut at every digit / non-digit boundary so no piece glues a number to punctuation
# ("93." or "76:"): each number is then the same piece wherever it appears.
_DELIMITER = "\t"
_NUMBER_EDGE = re.compile(r"(?<=\d)(?=[^\d\s])|(?<=[^\d\s])(?=\d)")


def train_tokenizer(texts: list[str], out_path: Path, vocab_size: int) -> Path:
    """Train on `texts` (one sentence a line after splitting) and write tokenizer.model atomically."""
    import sentencepiece as spm

    # Whole documents, not lines: words right after a newline carry no "▁" prefix, and those forms
    # ("\nTask") must be learned as pieces too.
    sentences = [_NUMBER_EDGE.sub(_DELIMITER, text) for text in texts if text.strip()]
    if not sentences:
        raise ValueError("loop/world/tokenizer_train.py: no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_by_number=True,
        pretokenization_delimiter=_DELIMITER,
        split_digits=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=list(SPECIAL_PIECES),
        # Keep newlines: the default NFKC rule turns "\n" into a space, which erases the line structure
        # that self-instruct lists ("Task 9:" ... stop at "\n") and the judge template rely on.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=4096,
        minloglevel=2,
    )
    return atomic_write_bytes(out_path, model.getvalue())
