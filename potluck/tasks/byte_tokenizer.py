"""The byte "tokenizer" as a Hugging Face tokenizer, so an exported byte-level model loads with AutoTokenizer.

A run without a tokenizer trains on bytes: token id = byte value. Exported with this `tokenizer.json`
(a byte-level BPE with no merges, whose 256 tokens are GPT-2's printable stand-ins for the bytes, each
mapped to its byte's value), `AutoTokenizer.from_pretrained` encodes text to exactly the ids the run
trained on and decodes them back.
"""

from __future__ import annotations

import json


def _byte_symbols() -> list[str]:
    """GPT-2's map from the 256 byte values to printable characters (byte-level BPE's alphabet), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer_json() -> str:
    """`tokenizer.json` text for the byte vocabulary: ids 0-255 are the bytes, no special tokens."""
    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    spec: dict[str, object] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    return json.dumps(spec, ensure_ascii=False)
