"""Language-model tasks: next-token prediction on the run's text corpus.

The built-in GPT family and Hugging Face causal language models share everything but the model:
the corpus (`data.source`, held out by document, or beside a separate `data.held_out_source`), each
peer's own random windows, the held-out windows every node scores on, a cross-entropy loss over next
tokens, and work counted in tokens.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterator
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potluck.protocol.config import RunConfig
from potluck.tasks.base import Batch, Task, TaskError
from potluck.tasks.tokens import stored_tokenizer, tokenized, tokenized_text
from potluck.training.data import BatchSampler, Corpus, load_corpus, load_source, val_batches
from potluck.training.tokenizer import ByteTokenizer, Tokenizer

BYTE_VOCAB = 256  # without a tokenizer a token is a byte


class LanguageModelTask(Task):
    """Next-token prediction on windows of `block_size` tokens of the run's corpus."""

    def __init__(self, cfg: RunConfig, *, data_source: str | None = None) -> None:
        self.cfg = cfg
        self.data_source = data_source or cfg.data.source  # a peer may read its own copy (--data)

    @property
    @abstractmethod
    def block_size(self) -> int:
        """Tokens in one training window."""

    @abstractmethod
    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The model's next-token logits for `inputs` ([batch, time] token ids): [batch, time, vocab]."""

    @cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer (data.tokenizer, from this machine's store); None: a token is a byte."""
        if self.cfg.data.tokenizer is None:
            return None
        tokenizer = stored_tokenizer(self.cfg.data.tokenizer)
        if tokenizer.vocab_size > self.model_vocab_size:
            raise TaskError(
                f"the run's tokenizer has {tokenizer.vocab_size} tokens, more than the model's {self.model_vocab_size}"
            )
        return tokenizer

    @property
    def model_vocab_size(self) -> int:
        """Token ids the model can take."""
        return BYTE_VOCAB

    @cached_property
    def corpus(self) -> Corpus:
        """The training source split into training and held-out tokens (read, and tokenized once, on first use)."""
        data = self.cfg.data
        text = load_corpus(
            self.data_source, val_fraction=data.val_fraction, max_bytes=data.max_bytes, field=data.text_field
        )
        if self.tokenizer is None:
            return text
        key = json.dumps([self.data_source, data.val_fraction, data.max_bytes, data.text_field])
        return tokenized(text, self.tokenizer, key=key)

    @cached_property
    def train_tokens(self) -> np.ndarray:
        """Training tokens: the training source less its held-out documents, or all of it given a held-out source."""
        if self.cfg.data.held_out_source is None:
            return self.corpus.train
        return self._whole_source(self.data_source, held_out=False)

    @cached_property
    def held_out_tokens(self) -> np.ndarray:
        """Held-out tokens: documents held out of the training source, or all of data.held_out_source."""
        if self.cfg.data.held_out_source is None:
            return self.corpus.val
        return self._whole_source(self.cfg.data.held_out_source, held_out=True)

    def _whole_source(self, source: str, *, held_out: bool) -> np.ndarray:
        """All of `source` as tokens (each side of a run with a separate held-out source), tokenized once."""
        data = self.cfg.data

        def read() -> np.ndarray:
            return load_source(source, field=data.text_field, max_bytes=data.max_bytes, held_out=held_out)

        if self.tokenizer is None:
            return read()
        role = "held-out" if held_out else "train"
        key = json.dumps(["whole", role, source, data.text_field, data.max_bytes])
        return tokenized_text(read, self.tokenizer, key=key, what=f"{role} source {source}")

    def train_batches(self, *, seed: int, batch_size: int) -> Iterator[Batch]:
        """Random windows of this peer's draw of the corpus: (inputs, next-token targets)."""
        sampler = BatchSampler(
            self.train_tokens, batch_size=batch_size, block_size=self.block_size, shard=0, num_shards=1, seed=seed
        )
        while True:
            yield sampler.next_batch()

    def held_out_batches(self, *, batch_size: int, count: int) -> list[Batch]:
        """Windows evenly spaced over the held-out text: every node scores the same ones."""
        return list(
            val_batches(self.held_out_tokens, batch_size=batch_size, block_size=self.block_size, num_batches=count)
        )

    def example_batch(self, *, batch_size: int, seed: int) -> Batch:
        """Random tokens of the full window: a step's cost without reading the corpus."""
        generator = torch.Generator().manual_seed(seed)
        shape = (batch_size, self.block_size)
        return tuple(torch.randint(0, self.vocab_size, shape, generator=generator) for _ in range(2))

    @property
    def vocab_size(self) -> int:
        """Distinct token ids the corpus holds (bytes without a tokenizer)."""
        return BYTE_VOCAB if self.tokenizer is None else self.tokenizer.vocab_size

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of the next-token predictions."""
        inputs, targets = batch
        logits = self.logits(model, inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes without a tokenizer)."""
        return [int(i) for i in (self.tokenizer or ByteTokenizer()).encode(text)]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (a byte-level model larger than the bytes may sample ids that are none: skipped)."""
        if self.tokenizer is None:
            return ByteTokenizer().decode([i for i in ids if 0 <= i < BYTE_VOCAB])
        return self.tokenizer.decode(ids)

    @torch.no_grad()
    def generate(
        self, model: nn.Module, prompt: str, *, tokens: int, temperature: float = 0.8, top_k: int = 40, seed: int = 0
    ) -> str:
        """`prompt` continued by `tokens` sampled tokens (temperature and top-k sampling; 0 temperature: greedy)."""
        generator = torch.Generator().manual_seed(seed)
        ids = torch.tensor([self.encode(prompt) or [ord("\n")]], dtype=torch.long)
        was_training = model.training
        model.eval()
        try:
            for _ in range(tokens):
                logits = self.logits(model, ids[:, -self.block_size :])[0, -1].float()
                if temperature <= 0:
                    chosen = logits.argmax().view(1, 1)
                else:
                    top = torch.topk(logits / temperature, min(top_k, logits.numel()))
                    pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
                    chosen = top.indices[pick].view(1, 1)
                ids = torch.cat([ids, chosen], dim=1)
        finally:
            model.train(was_training)
        return self.decode(ids[0].tolist())

    def work(self, batch: Batch) -> int:
        """Tokens predicted."""
        return int(batch[1].numel())

    def most_work(self, *, batch_size: int) -> int:
        """A full batch of windows."""
        return batch_size * self.block_size
