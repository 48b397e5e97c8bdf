"""A word-level tokenizer with open_clip's call interface, for the tiny CLIP's closed vocabulary.

``tokenizer(texts) -> LongTensor (N, context_length)``, like ``open_clip.tokenize``: each row is
``<sot> w1 … wk <eot> <pad>…`` (truncated rows keep ``<eot>`` last). ``<eot>`` has the largest id,
so open_clip's default ``pool_type='argmax'`` pools the text at the end-of-text token, as it does
for OpenAI's BPE tokenizer. Unknown words map to ``<unk>``.
"""

from __future__ import annotations

import json
from typing import Sequence, Union

import torch

PAD, SOT, UNK, EOT = "<pad>", "<sot>", "<unk>", "<eot>"


def split_words(text: str) -> list[str]:
    """Lower-case; runs of letters/digits are words, any other non-space character a token."""
    out, word = [], []
    for ch in text.lower():
        if ch.isalnum():
            word.append(ch)
            continue
        if word:
            out.append("".join(word))
            word = []
        if not ch.isspace():
            out.append(ch)
    if word:
        out.append("".join(word))
    return out


class WordTokenizer:
    """Closed-vocabulary word tokenizer. Ids: 0 ``<pad>``, 1 ``<sot>``, 2 ``<unk>``, words, ``<eot>`` last."""

    def __init__(self, words: Sequence[str], context_length: int = 32):
        words = [w for w in words if w not in (PAD, SOT, UNK, EOT)]
        if len(set(words)) != len(words):
            raise ValueError("words must be unique")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.vocab = [PAD, SOT, UNK] + list(words) + [EOT]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)
        self.pad_id, self.sot_id, self.unk_id = 0, 1, 2
        self.eot_id = len(self.vocab) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in split_words(text)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out = []
        for i in ids:
            if i == self.eot_id:
                break
            if i not in (self.pad_id, self.sot_id):
                out.append(self.vocab[i])
        return " ".join(out)

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = None) -> torch.Tensor:
        """Tokenize to ``(N, context_length)`` int64."""
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        for r, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)[: n - 2] + [self.eot_id]
            out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"context_length": self.context_length, "vocab": self.vocab}, f, indent=0)
            f.write("\n")

    @classmethod
    def from_file(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["vocab"]
        if vocab[:3] != [PAD, SOT, UNK] or vocab[-1] != EOT:
            raise ValueError(f"{path}: vocabulary must start with {PAD}, {SOT}, {UNK} and end with {EOT}")
        return cls(vocab[3:-1], data["context_length"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
