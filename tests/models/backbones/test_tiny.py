"""The offline byte-level tokenizer of the tiny backbones, with and without word merges."""

from __future__ import annotations

from tokensieve.models.backbones.tiny import make_byte_tokenizer, word_merges

PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What colour is the circle? (A) red (B) green<|im_end|>\n<|im_start|>assistant\n"


def test_word_merges_chain_each_word_and_share_prefixes():
    entries, merges = word_merges([" red", " rest"])
    assert entries == ["Ġr", "Ġre", "Ġred", "Ġres", "Ġrest"]
    assert merges == [("Ġ", "r"), ("Ġr", "e"), ("Ġre", "d"), ("Ġre", "s"), ("Ġres", "t")]


def test_words_become_single_tokens_and_text_round_trips(tmp_path):
    from transformers import AutoTokenizer

    plain = make_byte_tokenizer()
    words = make_byte_tokenizer(words=("user", "assistant", "What", " colour", " circle", " red"))
    ids = words.encode(PROMPT)
    tokens = words.convert_ids_to_tokens(ids)
    assert {"user", "assistant", "What", "Ġcolour", "Ġcircle", "Ġred"} <= set(tokens)
    assert "Ġgreen" not in tokens and len(ids) < len(plain.encode(PROMPT)) - 20
    assert words.decode(ids) == PROMPT == plain.decode(plain.encode(PROMPT))
    assert words.encode("A") == plain.encode("A")  # answer letters stay one byte token
    words.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).encode(PROMPT) == ids  # what a saved teacher loads
