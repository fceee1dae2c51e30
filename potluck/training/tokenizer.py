"""Tokenizers: text to token ids and back, either one token per byte (the default) or a ``tokenizer.json``.

A run's tokenizer is one of two kinds behind one small interface, ``Tokenizer``:

- ``ByteTokenizer``: token = byte, vocabulary 256, no end-of-document token. What potluck has
  always trained on; its ``sha256`` is the fixed name ``"bytes"``.
- ``HFTokenizer``: a Hugging Face ``tokenizers`` file (``tokenizer.json``), checked on load
  (size first, since the bytes may come from the network, then parsed). Its ``sha256`` is the
  hash of the exact file bytes, the value a run config pins.

Token ids come back as numpy arrays of the smallest unsigned type that holds the vocabulary
(``token_dtype``): uint8 for bytes (the exact arrays potluck used before tokenizers), uint16 up to
65,536 tokens, uint32 above. ``train_tokenizer`` makes a byte-level BPE like GPT-2's from any
text, and ``save_for_transformers`` writes it where ``transformers.AutoTokenizer`` finds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from potluck.errors import PotluckError

__all__ = [
    "BYTES_SHA256",
    "EOS_TOKEN",
    "MAX_TOKENIZER_BYTES",
    "MAX_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerError",
    "encode_documents",
    "load_tokenizer",
    "save_for_transformers",
    "save_tokenizer",
    "token_dtype",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

BYTES_SHA256 = "bytes"  # the byte tokenizer's name where a tokenizer file's sha256 would go
# Refused before parsing: the largest tokenizer.json files in use (multilingual 250k-token
# vocabularies) are about 20 MiB, and a peer may receive the file from an aggregator.
MAX_TOKENIZER_BYTES = 64 * 2**20
MIN_VOCAB_SIZE = 260  # 256 byte tokens, the two special tokens and at least a couple of merges
MAX_VOCAB_SIZE = 1_000_000  # 4x the largest vocabularies in use (about 256k tokens)
EOS_TOKEN = "<|endoftext|>"  # what train_tokenizer puts between documents (GPT-2's name)
PAD_TOKEN = "<|pad|>"  # train_tokenizer's padding token, for transformers' batched generation
# Names other tokenizers give their end-of-document / start-of-document tokens, tried in order.
_EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class TokenizerError(PotluckError):
    """A tokenizer file is missing, too large, corrupt or unusable, or a tokenizer cannot be trained as asked."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a ``vocab_size`` vocabulary.

    uint8 for the 256 byte tokens, uint16 up to 65,536 tokens, uint32 above: a token stream
    in memory or in a cache takes 1, 2 or 4 bytes per token.
    """
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class Tokenizer(ABC):
    """Text to token ids and back; ``vocab_size`` is the number of embedding rows a model needs."""

    vocab_size: int  # one more than the largest token id
    sha256: str  # what a run config pins: the tokenizer file's sha256 (hex), or BYTES_SHA256
    eos_id: int | None  # the token put between documents, or None where documents simply follow each other

    @property
    def dtype(self) -> np.dtype:
        """The numpy type of the arrays ``encode`` returns (see ``token_dtype``)."""
        return token_dtype(self.vocab_size)

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text``, a 1-D array of ``self.dtype``; no special token is added."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text; implementations may use several threads."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; special tokens are written out unless ``skip_special_tokens``."""


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: vocabulary 256, no special tokens. potluck's default."""

    def __init__(self) -> None:
        self.vocab_size = 256
        self.sha256 = BYTES_SHA256
        self.eos_id = None

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as uint8 tokens."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """The bytes decoded as UTF-8; an invalid sequence (a model's sample may hold one) becomes U+FFFD."""
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` file, loaded from checked bytes (the constructor, or ``from_file``).

    The size is bounded before parsing, but the parser's cost also grows with the largest token
    id a file names (a 4-billion id takes the library most of a minute): compare bytes received
    from another node with the run's pinned sha256 before handing them over.
    """

    def __init__(self, data: bytes, *, name: str = "tokenizer.json", eos_token: str | None = None) -> None:
        """Parse and check ``data`` (the bytes of a tokenizer.json); ``name`` says where it came from in errors.

        The end-of-document token is ``eos_token`` when given, else the first special token
        with a usual name (``<|endoftext|>``, ``</s>``, ...), else None. Raises TokenizerError.
        """
        if len(data) > MAX_TOKENIZER_BYTES:
            raise TokenizerError(
                f"tokenizer {name} is {len(data):,} bytes, over the {MAX_TOKENIZER_BYTES:,}-byte limit; "
                "it is not a tokenizer.json potluck can use"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"tokenizer {name} is not UTF-8 text; pass a tokenizer.json file") from None
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # the Rust parser raises plain Exception with serde's message
            raise TokenizerError(f"tokenizer {name} is not a valid tokenizer.json: {exc}") from None
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"tokenizer {name} has an empty vocabulary")
        top_id = max(vocab.values())
        if top_id >= MAX_VOCAB_SIZE:  # a model would need an embedding row for every id up to it
            raise TokenizerError(
                f"tokenizer {name} has token id {top_id:,}; potluck takes at most {MAX_VOCAB_SIZE:,} tokens"
            )
        # A file made for a fixed-length model may truncate or pad; potluck cuts its own windows.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # Text that happens to contain "<|endoftext|>" is text: only encode_documents puts an eos in.
        tokenizer.encode_special_tokens = True
        self.data = data  # the file's exact bytes, hashed and served to joiners as they are
        self.vocab_size = top_id + 1
        self.sha256 = hashlib.sha256(data).hexdigest()
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        if eos_token is not None and eos_token not in vocab:
            raise TokenizerError(f"tokenizer {name} has no token {eos_token!r} to end documents with")
        eos = eos_token or _first_of(_EOS_NAMES, specials)
        self.eos_id = None if eos is None else vocab[eos]
        self.eos_token = eos
        self.bos_token = _first_of(_BOS_NAMES, specials)
        self.pad_token = _first_of(_PAD_NAMES, specials)
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path, *, eos_token: str | None = None) -> HFTokenizer:
        """Read and check a tokenizer.json; its size is checked before it is read. Raises TokenizerError."""
        path = Path(path).expanduser()
        try:
            size = path.stat().st_size
            if size > MAX_TOKENIZER_BYTES:
                raise TokenizerError(
                    f"tokenizer {path} is {size:,} bytes, over the {MAX_TOKENIZER_BYTES:,}-byte limit; "
                    "it is not a tokenizer.json potluck can use"
                )
            with path.open("rb") as f:
                data = f.read(MAX_TOKENIZER_BYTES + 1)  # a file growing under us still meets the limit
        except IsADirectoryError:
            raise TokenizerError(f"tokenizer {path} is a directory; pass the tokenizer.json file in it") from None
        except FileNotFoundError:
            raise TokenizerError(
                f"tokenizer file {path} does not exist; make one with `potluck tokenizer train`"
            ) from None
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer {path}: {exc.strerror or exc}") from None
        return cls(data, name=str(path), eos_token=eos_token)

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text``, without the special tokens a template might add (a BOS, say)."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text, on the tokenizers library's own threads."""
        # encode_batch_fast (tokenizers 0.21+) skips the offsets potluck never reads
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _first_of(names: Sequence[str], present: set[str]) -> str | None:
    return next((name for name in names if name in present), None)


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A run's tokenizer: the byte tokenizer for None or ``"bytes"``, else the tokenizer.json at ``path``."""
    if path is None or str(path) == BYTES_SHA256:
        return ByteTokenizer()
    return HFTokenizer.from_file(path)


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], *, batch_size: int = 1024) -> np.ndarray:
    """One token stream of many documents, each followed by the tokenizer's eos (if it has one).

    Texts are encoded ``batch_size`` at a time with ``encode_batch``. With the byte tokenizer
    the result is the documents' UTF-8 bytes one after another.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype=tokenizer.dtype)
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
            parts.append(ids)
            if eos is not None:
                parts.append(eos)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.dtype)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> bytes:
    """Train a byte-level BPE (GPT-2's scheme) on ``texts`` and return its tokenizer.json bytes.

    Every byte has a token, so any text encodes and decodes back exactly. Ids 0 and 1 are
    ``EOS_TOKEN`` (between documents) and ``PAD_TOKEN``; the 256 byte tokens follow, then the
    merges, most frequent first, until ``vocab_size`` tokens or no pair occurs ``min_frequency``
    times (a small text may give fewer tokens than asked). The same texts give the same bytes,
    hence the same sha256, in any process and whether or not the library uses several threads
    (TOKENIZERS_PARALLELISM changes speed only): the trainer's pair counts do not depend on the
    order it sees words in, and it breaks ties between equally frequent pairs by the pair itself.
    Raises TokenizerError for a vocabulary size out of range or no text at all.
    """
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab size {vocab_size:,} is out of range; pick one from {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE:,}"
        )
    if min_frequency < 1:
        raise TokenizerError(f"min frequency must be at least 1, got {min_frequency}")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) == text, byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # the library's bar writes to the terminal itself; the CLI draws its own
    )
    seen = _Counting(texts)
    tokenizer.train_from_iterator(seen, trainer=trainer)
    if seen.count == 0:
        raise TokenizerError("there is no text to train a tokenizer on; check the data source")
    logger.info("trained a %d-token BPE on %d texts", tokenizer.get_vocab_size(), seen.count)
    return tokenizer.to_str().encode("utf-8")


class _Counting:
    """Iterates over texts, counting the non-empty ones."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if text:
                self.count += 1
                yield text


def save_tokenizer(tokenizer_json: bytes, path: str | Path) -> HFTokenizer:
    """Check ``tokenizer_json`` and write it to ``path`` atomically (replacing any file there); returns it loaded."""
    tokenizer = HFTokenizer(tokenizer_json)
    _write_atomically(Path(path).expanduser(), tokenizer_json)
    return tokenizer


def save_for_transformers(tokenizer_json: bytes, out_dir: str | Path, *, model_max_length: int | None = None) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` so ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    The config names ``PreTrainedTokenizerFast`` and the file's end-of-document, start and
    padding tokens (a tokenizer from ``train_tokenizer`` uses ``EOS_TOKEN`` for both ends, as
    GPT-2 does); nothing needs a model hub. ``model_max_length`` is the model's context length,
    when known. ``out_dir`` is created if missing; existing files of those two names are replaced.
    Raises TokenizerError if the bytes are not a usable tokenizer.json.
    """
    tokenizer = HFTokenizer(tokenizer_json)
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers would otherwise drop spaces before punctuation when decoding
        "clean_up_tokenization_spaces": False,
    }
    eos, bos, pad = tokenizer.eos_token, tokenizer.bos_token or tokenizer.eos_token, tokenizer.pad_token
    for key, token in (("eos_token", eos), ("bos_token", bos), ("pad_token", pad)):
        if token is not None:
            config[key] = token
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "tokenizer.json", tokenizer_json)
    _write_atomically(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
