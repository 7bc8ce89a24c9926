"""Tiny, random-init, real-architecture backbones for CPU runs and tests.

``make_tiny_qwen2_5_vl(out)``, ``make_tiny_qwen2_vl(out)`` and
``make_tiny_llava_onevision(out)`` build the real HF model class from a shrunken config (a
few hundred thousand parameters, fixed seed) plus an offline byte-level ``Qwen2Tokenizer``
carrying the model's chat template and special tokens, and save both with
``save_pretrained``. Every later step loads the folder with ``from_pretrained`` — the same
call that loads ``Qwen/Qwen2.5-VL-7B-Instruct`` or ``llava-hf/llava-onevision-qwen2-7b-ov-hf``
— so nothing downstream special-cases it. ``make_tiny(family, out)`` dispatches by
``model_type``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokensieve.models.backbones.chat_templates import LLAVA_OV_CHAT_TEMPLATE, QWEN_VL_CHAT_TEMPLATE

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def word_merges(words) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE merges that make each of ``words`` one token: for a word's bytes
    ``b1 b2 … bn`` (in the byte-to-unicode alphabet, so ``" red"`` is ``Ġred``) the merges
    ``(b1, b2)``, ``(b1b2, b3)``, … in order. Returns ``(new vocabulary entries, merges)``;
    prefixes shared by several words are merged once."""
    table = _bytes_to_unicode()
    entries: list[str] = []
    merges: list[tuple[str, str]] = []
    seen: set[str] = set()
    for word in words:
        symbols = [table[b] for b in word.encode("utf-8")]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                seen.add(merged)
                entries.append(merged)
                merges.append((left, right))
            left = merged
    return entries, merges


def make_byte_tokenizer(extra_special_tokens: tuple[str, ...] = (), chat_template: str = QWEN_VL_CHAT_TEMPLATE, words: tuple[str, ...] = ()):
    """A byte-level ``Qwen2Tokenizer`` (256 byte tokens) plus Qwen's special tokens.

    Works offline; every string round-trips. Without ``words`` there are no merges and the
    special tokens get ids 256..262, then ``extra_special_tokens`` (e.g. LLaVA's ``<image>``,
    ``<video>``) in order. ``words`` (e.g. ``" circle"``, with its leading space) become
    single tokens through BPE merges (:func:`word_merges`), as in a trained vocabulary; their
    ids follow the bytes, before the special tokens.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    entries, merges = word_merges(words)
    vocab.update({e: len(vocab) + i for i, e in enumerate(entries)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    specials = [*QWEN_SPECIAL_TOKENS, *extra_special_tokens]
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in specials]})
    tok.chat_template = chat_template
    return tok


def _qwen_text_config(tok, hidden_size: int, text_layers: int, mrope: bool) -> dict:
    """A 4-query / 2-kv-head Qwen2 text config; M-RoPE sections [4, 6, 6] at head_dim 32."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden_size // heads
    quarter = head_dim // 8
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if mrope:
        rest = head_dim // 2 - quarter
        rope["mrope_section"] = [quarter, rest // 2, rest - rest // 2]
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _qwen_vision_tokens(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def save_backbone(model, tok, out: str | Path, preprocessor: dict) -> Path:
    """``save_pretrained`` a model and its tokenizer into ``out`` (created) with
    ``preprocessor_config.json``, so ``tokensieve.models.backbones.load(out)`` opens it.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


QWEN_PREPROCESSOR = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}


def make_tiny_qwen2_5_vl(out: str | Path, seed: int = 0, text_layers: int = 4, hidden_size: int = 128) -> Path:
    """Create and save a tiny random-init Qwen2.5-VL in ``out``.

    Architecture: vision tower depth 2 (hidden 64, patch 14, temporal patch 2, 2×2 merge,
    window attention with block 1 full), LLM ``text_layers`` layers of width
    ``hidden_size`` with 4 query / 2 key-value heads and M-RoPE sections [4, 6, 6].

    Returns:
        The output folder, holding ``config.json``, ``model.safetensors``, the tokenizer
        files and ``preprocessor_config.json`` (Qwen2.5-VL's image mean/std, patch sizes).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = make_byte_tokenizer()
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=56,
            fullatt_block_indexes=[1],
            out_hidden_size=hidden_size,
        ),
        text_config=_qwen_text_config(tok, hidden_size, text_layers, mrope=True),
        **_qwen_vision_tokens(tok),
    )
    torch.manual_seed(seed)
    return save_backbone(Qwen2_5_VLForConditionalGeneration(config).eval(), tok, Path(out), QWEN_PREPROCESSOR)


def make_tiny_qwen2_vl(out: str | Path, seed: int = 0, text_layers: int = 4, hidden_size: int = 128) -> Path:
    """Create and save a tiny random-init Qwen2-VL in ``out``.

    Architecture: vision tower depth 2 (embed 64, MLP ratio 2, 4 heads, patch 14, temporal
    patch 2, 2×2 merge, full attention per frame group), LLM as in
    :func:`make_tiny_qwen2_5_vl`.

    Returns:
        The output folder (config, weights, tokenizer, ``preprocessor_config.json``).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = make_byte_tokenizer()
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text_config(tok, hidden_size, text_layers, mrope=True),
        **_qwen_vision_tokens(tok),
    )
    torch.manual_seed(seed)
    return save_backbone(Qwen2VLForConditionalGeneration(config).eval(), tok, Path(out), QWEN_PREPROCESSOR)


LLAVA_SPECIAL_TOKENS = ("<image>", "<video>")


def make_tiny_llava_onevision(out: str | Path, seed: int = 0, text_layers: int = 4, hidden_size: int = 128, image_size: int = 70) -> Path:
    """Create and save a tiny random-init LLaVA-OneVision in ``out``.

    Architecture: SigLIP tower of 2 layers (hidden 64, 4 heads, patch 14, ``image_size``
    70 → a 5×5 patch grid, pooled to 3×3 tokens per frame — the odd side exercises the
    ``ceil`` in the pooling), GELU projector, a Qwen2 LLM as in :func:`make_tiny_qwen2_5_vl`
    with 1-D RoPE; the tokenizer adds ``<image>`` / ``<video>`` and LLaVA-OneVision's chat
    template. ``preprocessor_config.json`` and ``video_preprocessor_config.json`` carry
    SigLIP's 0.5 / 0.5 mean / std and the square size.

    Returns:
        The output folder.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    tok = make_byte_tokenizer(LLAVA_SPECIAL_TOKENS, chat_template=LLAVA_OV_CHAT_TEMPLATE)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(**_qwen_text_config(tok, hidden_size, text_layers, mrope=False)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    preprocessor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": image_size, "width": image_size}, "resample": 3, "rescale_factor": 1 / 255}
    out = save_backbone(LlavaOnevisionForConditionalGeneration(config).eval(), tok, Path(out), preprocessor)
    (out / "video_preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


TINY_FACTORIES = {
    "qwen2_5_vl": make_tiny_qwen2_5_vl,
    "qwen2_vl": make_tiny_qwen2_vl,
    "llava_onevision": make_tiny_llava_onevision,
}


def make_tiny(family: str, out: str | Path, seed: int = 0) -> Path:
    """Build the tiny backbone of ``family`` (a ``model_type``) in ``out``.

    Raises:
        ValueError: unknown family (the message lists the known ones).
    """
    if family not in TINY_FACTORIES:
        raise ValueError(f"no tiny factory for model_type {family!r}; known: {', '.join(sorted(TINY_FACTORIES))}")
    return TINY_FACTORIES[family](out, seed=seed)
