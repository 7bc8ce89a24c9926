"""Tiny, random-init, real-architecture backbones for CPU runs and tests.

``make_tiny_qwen2_5_vl(out)`` builds a ``Qwen2_5_VLForConditionalGeneration`` from a
``Qwen2_5_VLConfig`` (a few hundred thousand parameters, fixed seed) plus an offline
byte-level ``Qwen2Tokenizer`` carrying Qwen2.5-VL's chat template, and saves both with
``save_pretrained``. Every later step loads the folder with ``from_pretrained`` — the same
call that loads ``Qwen/Qwen2.5-VL-7B-Instruct`` — so nothing downstream special-cases it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2.5-VL's chat template (the video/text subset of the released one): a default system
# turn, vision placeholders <|vision_start|><|video_pad|><|vision_end|>, then the text.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


def make_byte_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` (256 byte tokens, no merges) plus Qwen's special tokens.

    Works offline; every string round-trips. Special tokens get ids 256..262.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS]})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


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

    out = Path(out)
    tok = make_byte_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden_size // heads
    quarter = head_dim // 8
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
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2],
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "min_pixels": 3136,
                "max_pixels": 12845056,
            },
            indent=2,
        )
    )
    return out
