"""The frozen-backbone interface every VLM adapter implements."""

from __future__ import annotations

import torch
from torch import nn

from tokensieve.data.types import VideoBatch
from tokensieve.models.types import Query, Selection, TeacherSignals, VisualTokens


class Backbone(nn.Module):
    """A frozen vision-language model seen through tokensieve's types.

    Adapters load with ``from_pretrained(path_or_id, dtype=..., attn_implementation=...)``,
    freeze themselves (``requires_grad_(False)``, ``eval()``) and implement the methods
    below. ``name_or_path`` and ``revision`` identify the weights so that training
    checkpoints reference the backbone instead of saving it.

    A backbone never leaves eval mode (dropout stays off, also in LoRA adapters added by
    :func:`tokensieve.models.backbones.lora.add_lora`); the only parameters that may
    require grad are such adapters, listed by :meth:`trainable_parameters`.
    """

    name_or_path: str
    revision: str | None = None

    def freeze(self) -> Backbone:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # a frozen backbone never leaves eval mode (dropout off), whatever a trainer asks
        return super().train(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad: empty for a frozen backbone, the LoRA weights after ``add_lora``."""
        return [p for p in self.parameters() if p.requires_grad]

    def encode_video(self, batch: VideoBatch, saliency: bool = False) -> VisualTokens:
        """Frames → visual tokens in the LLM's input space, with original position ids."""
        raise NotImplementedError

    def embed_query(self, batch: VideoBatch, visual: VisualTokens) -> Query:
        """The question's token embeddings from the frozen embedding table."""
        raise NotImplementedError

    def teacher_signals(self, batch: VideoBatch, visual: VisualTokens, **kwargs) -> TeacherSignals:
        """Text→video attention at the reference layer (and answer logits) on the full sequence."""
        raise NotImplementedError

    def forward(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None):
        """Next-token logits ``[B, V]`` at the answer position, keeping only ``selection``."""
        raise NotImplementedError

    def generate(self, batch: VideoBatch, visual: VisualTokens, selection: Selection | None = None, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Answer tokens ``long [B, N]`` after a (pruned) prefill; greedy unless told otherwise."""
        raise NotImplementedError
