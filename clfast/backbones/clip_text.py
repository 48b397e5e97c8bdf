"""Class keys from a frozen CLIP text encoder with one learnable context token per class (CoOp-style).

For class c the text ``template.format(name_c)`` (default ``"X {}."``) is tokenised once. In
:meth:`ClassTextEncoder.forward` the token embedding of the placeholder ``"X"`` (position 1, after
``<sot>``) is replaced by a context vector v_c, and the model's own ``encode_text`` runs the rest
(positional embedding, causal transformer, ``ln_final``, EOT pooling, projection); the key is
``k_c = normalize(encode_text(...))``. The swap is a forward hook on the token-embedding module that
exists only during one call and rewrites only the lookup of that call's token tensor, so any other
``encode_text`` on the model (nested, other tokens) is untouched.

    enc = ClassTextEncoder(clip_model, tokenizer, class_names)      # C classes
    ctx = nn.Parameter(0.02 * torch.randn(enc.num_classes, 1, enc.width))   # (C, 1, D_w)
    keys = enc(ctx)                                                  # (C, D_c), unit rows
    new = enc(ctx[5:10], slice(5, 10))                               # only these 5 texts are encoded
    logits = enc.logit_scale * F.normalize(image_features, dim=-1) @ keys.T

The caller's model is changed in two ways only: ``requires_grad=False`` on all its parameters, and eval
mode kept (a parent's ``.train()`` does not reach it). It is a submodule (``.to()`` moves it; the state
dict holds it under ``clip.``): use ``enc.clip`` for the image tower rather than registering it twice.
Precision: the weights stay as given (fp32 from open_clip) unless the caller casts them; under
``torch.autocast`` the keys come out in the autocast dtype. Supports open_clip ``CLIP`` and
``CustomTextCLIP`` with a ``TextTransformer``; Hugging Face text towers are refused. No key cache here.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassTextEncoder", "text_tower"]

_PAD = 0   # open_clip's tokenizers and clfast's WordTokenizer pad with id 0


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding ``token_embedding``, ``context_length`` and ``text_projection``: the model
    itself for open_clip's ``CLIP``, ``model.text`` for ``CustomTextCLIP``."""
    for owner in (model, getattr(model, "text", None)):
        if isinstance(getattr(owner, "token_embedding", None), nn.Embedding) and hasattr(owner, "context_length"):
            return owner
    raise TypeError(f"ClassTextEncoder: clip_model must be an open_clip CLIP or CustomTextCLIP whose text tower "
                    f"has a token_embedding (nn.Embedding), got {type(model).__name__}")


class ClassTextEncoder(nn.Module):
    """Per-class CLIP text keys with one context token per class replacing the template's placeholder.

    Args:
        clip_model: an open_clip ``CLIP`` or ``CustomTextCLIP`` (frozen and put in eval mode here).
        tokenizer: its tokenizer, ``tok(texts, context_length=L) -> (N, L) int64`` rows ``<sot> … <eot> 0…``
            (open_clip's BPE, or clfast's :class:`~clfast.backbones.WordTokenizer`).
        class_names: the C class names, in label order.
        template: the text per class, with ``{}`` for the name; the placeholder must come before ``{}``.
        placeholder: the word whose embedding the context replaces; it must be one token. It may be
            unknown to the tokenizer (``<unk>``): its embedding is replaced anyway.
        name_map: {class name: text to use instead}, for names the tokenizer does not know.

    Attributes:
        tokens: buffer (C, L) int64; placeholder_position: int (1 for ``"X {}."``); class_names; texts (the
        tokenised texts); num_classes (C); width (D_w); embed_dim (D_c); context_length (L).

    Raises:
        TypeError: unsupported model or argument types. ValueError, naming the classes and words at fault:
        no placeholder before ``{}``, a placeholder of several tokens, a text over L tokens, a word that
        becomes ``<unk>`` (tokenizers with ``unk_id``: clip_tiny_synth's), ``name_map`` keys not class names.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, class_names: Sequence[str], *, template: str = "X {}.",
                 placeholder: str = "X", name_map: Optional[Mapping[str, str]] = None):
        super().__init__()
        tower = text_tower(clip_model)
        L = int(tower.context_length)
        if isinstance(class_names, str) or not class_names or not all(isinstance(n, str) for n in class_names):
            raise TypeError(f"ClassTextEncoder: class_names must be a non-empty sequence of str, got {class_names!r}")
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"ClassTextEncoder: template must contain '{{}}' once, got {template!r}")
        head = template.split("{}")[0]
        if not placeholder or placeholder not in head:
            raise ValueError(f"ClassTextEncoder: placeholder {placeholder!r} must occur in template {template!r} "
                             f"before '{{}}' (so its position is the same for every class)")
        name_map = dict(name_map or {})
        if extra := sorted(set(name_map) - set(class_names)):
            raise ValueError(f"ClassTextEncoder: name_map keys {extra} are not class names")
        self.class_names = list(class_names)
        self.texts = [template.format(name_map.get(n, n)) for n in self.class_names]

        def tok(texts, length=L):
            return torch.as_tensor(tokenizer(list(texts), context_length=length), dtype=torch.long)

        too_long = (tok(self.texts, L + 1)[:, L] != _PAD).nonzero().flatten().tolist()
        if too_long:
            raise ValueError(f"ClassTextEncoder: these texts are longer than the context length {L}: "
                             + "; ".join(f"class {self.class_names[i]!r}: {self.texts[i]!r}" for i in too_long)
                             + ". Shorten them with name_map={class name: shorter text}.")
        ph = tok([placeholder])[0]
        if (n_ph := int((ph != _PAD).sum()) - 2) != 1:   # minus <sot> and <eot>
            raise ValueError(f"ClassTextEncoder: placeholder {placeholder!r} must be one token, got {n_ph}")
        prefix = head[: head.index(placeholder) + len(placeholder)]
        pos = int((tok([prefix])[0] != _PAD).sum()) - 2
        tokens = tok(self.texts)
        if not bool((tokens[:, pos] == ph[1]).all()):
            raise ValueError(f"ClassTextEncoder: placeholder {placeholder!r} does not tokenise to position {pos} "
                             f"in every text of template {template!r}; separate it from '{{}}' by a space")
        self._check_unknown(tokenizer, tokens, pos, placeholder, tok)
        self.register_buffer("tokens", tokens.to(tower.token_embedding.weight.device), persistent=False)
        self.placeholder_position = pos
        self.clip = clip_model.requires_grad_(False).eval()
        self.num_classes, self.context_length = len(self.class_names), L
        proj, self.width = tower.text_projection, tower.token_embedding.embedding_dim
        self.embed_dim = (self.width if proj is None else proj.out_features if isinstance(proj, nn.Linear)
                          else proj.shape[-1])

    @property
    def _embedding(self) -> nn.Embedding:
        # looked up, not stored: a second reference would put the embedding twice in the state dict
        return text_tower(self.clip).token_embedding

    def _check_unknown(self, tokenizer, tokens: Tensor, pos: int, placeholder: str, tok) -> None:
        unk = getattr(tokenizer, "unk_id", None)
        rest = torch.cat([tokens[:, :pos], tokens[:, pos + 1:]], 1)
        bad = [] if unk is None else (rest == unk).any(1).nonzero().flatten().tolist()   # BPE: no unk
        if not bad:
            return
        lines = []
        for i in bad:
            words = [w for w in re.findall(r"\w+|[^\w\s]", self.texts[i])
                     if w != placeholder and bool((tok([w])[0] == unk).any())]
            lines.append(f"class {self.class_names[i]!r}: {', '.join(map(repr, words))}")
        raise ValueError("ClassTextEncoder: the tokenizer does not know these words (they would become <unk>): "
                         + "; ".join(lines) + ". Pass name_map={class name: text in the tokenizer's vocabulary "
                         "(a WordTokenizer's is tokenizer.vocab)}, "
                         f"e.g. name_map={{{self.class_names[bad[0]]!r}: '...'}}.")

    def train(self, mode: bool = True) -> "ClassTextEncoder":
        super().train(mode)
        self.clip.eval()   # frozen: no dropout whatever the parent's mode
        return self

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned logit scale ``exp(logit_scale)`` (≈ 100 for OpenAI's weights), a detached tensor."""
        return self.clip.logit_scale.detach().exp()

    def placeholder_embedding(self) -> Tensor:
        """(D_w,) a copy of the token embedding of the placeholder (what the plain text would use there)."""
        return self._embedding.weight[self.tokens[0, self.placeholder_position]].detach().clone()

    def forward(self, context: Tensor, classes: Union[Tensor, slice, None] = None, *,
                normalize: bool = True) -> Tensor:
        """Keys of the classes ``classes`` with their context vectors.

        Args:
            context: (n, D_w) or (n, 1, D_w) float, row i the context token of class ``classes[i]``;
                gradients flow into it (cast to the embedding's dtype, so fp32 parameters work with
                a cast model).
            classes: which classes, as a slice or a 1-D integer tensor of n indices; None for all C.
                Only these n texts run through the encoder.
            normalize: L2-normalise the keys (the class keys k_c); False gives the raw projections.

        Returns:
            (n, D_c) keys, in the model's (or autocast's) dtype.
        """
        classes = slice(None) if classes is None else classes
        if not (isinstance(classes, slice) or isinstance(classes, Tensor) and classes.dim() == 1
                and classes.dtype in (torch.int64, torch.int32)):
            got = f"{classes.dtype} tensor of shape {tuple(classes.shape)}" if isinstance(classes, Tensor) else \
                type(classes).__name__
            raise TypeError(f"ClassTextEncoder: classes must be a 1-D integer tensor, a slice or None, got {got}")
        tokens = self.tokens[classes]
        n = tokens.shape[0]
        if not isinstance(context, Tensor) or not context.is_floating_point():
            raise TypeError(f"ClassTextEncoder: context must be a float tensor, got {type(context).__name__}"
                            + (f" of {context.dtype}" if isinstance(context, Tensor) else ""))
        if context.dim() == 3 and context.shape[1] == 1:
            context = context[:, 0]
        if context.dim() != 2 or tuple(context.shape) != (n, self.width):
            raise ValueError(f"ClassTextEncoder: context must have shape (n, D_w) = ({n}, {self.width}) or "
                             f"(n, 1, D_w) for the {n} classes asked for, got {tuple(context.shape)}")
        pos = self.placeholder_position

        def swap(module, args, out):
            if args[0] is not tokens:   # another call on the same model: leave it alone
                return None
            return torch.cat([out[:, :pos], context.to(out.dtype)[:, None], out[:, pos + 1:]], 1)

        handle = self._embedding.register_forward_hook(swap)
        try:
            keys = self.clip.encode_text(tokens)
        finally:
            handle.remove()
        return F.normalize(keys, dim=-1) if normalize else keys

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, width={self.width}, embed_dim={self.embed_dim}, "
                f"context_length={self.context_length}, placeholder_position={self.placeholder_position}")
