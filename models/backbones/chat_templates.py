"""Fallback chat templates (used when a tokenizer ships none) and for the tiny tokenizers.

- ``QWEN_VL_CHAT_TEMPLATE``: the video/text subset of Qwen2-VL / Qwen2.5-VL's released
  template — a default system turn, then ``<|vision_start|><|video_pad|><|vision_end|>``
  before the text.
- ``LLAVA_OV_CHAT_TEMPLATE``: LLaVA-OneVision's released template, as written by
  transformers' ``convert_llava_onevision_weights_to_hf.py``: no system turn, ``<video>\\n``
  before the text, ``<|im_end|>\\n`` after each turn.
"""

from __future__ import annotations

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

QWEN_VL_SYSTEM_TURN = "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
QWEN_VL_CHAT_TEMPLATE_NO_SYSTEM = QWEN_VL_CHAT_TEMPLATE.replace(QWEN_VL_SYSTEM_TURN, "")
"""Qwen-VL's format without the default system turn (the refbench teacher's: 36 fewer prompt
tokens per sample with the byte-level tokenizer)."""
assert QWEN_VL_CHAT_TEMPLATE_NO_SYSTEM != QWEN_VL_CHAT_TEMPLATE

LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
