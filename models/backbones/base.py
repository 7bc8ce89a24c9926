"""The frozen-backbone interface every VLM adapter implements."""

from __future__ import annotations

from torch import nn

from tokensieve.data.types import VideoBatch
from tokensieve.models.types import Query, Selection, TeacherSignals, VisualTokens


class Backbone(nn.Module):
    """A frozen vision-language model seen through tokensieve's types.

    Adapters load with ``from_pretrained(path_or_id, dtype=..., attn_implementation=...)``,
    freeze themselves (``requires_grad_(False)``, ``eval()``) and implement the methods
    below. ``name_or_path`` and ``revision`` identify the weights so that training
    checkpoints reference the backbone instead of saving it.
    """

    name_or_path: str
    revision: str | None = None

    def freeze(self) -> Backbone:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # a frozen backbone never leaves eval mode (dropout off), whatever a trainer asks
        return super().train(False)

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
