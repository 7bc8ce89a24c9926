"""Shared tensor containers passed between backbones, compressors, training and evaluation.

Shapes are the contract (see DESIGN.md): B batch, M visual tokens per sample after the
backbone's own merging, D hidden size of the LLM, Q query tokens, K kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class VisualTokens:
    """Visual tokens in the LLM's input space, produced by ``Backbone.encode_video``.

    Attributes:
        tokens: ``float [B, M, D]`` — embeddings after the projector / merger.
        valid: ``bool [B, M]`` — False marks padding (samples with fewer tokens).
        positions: the backbone's own position ids of each token in the **full**
            (unpruned) sequence: ``long [3, B, M]`` for M-RoPE (t, h, w), ``long [B, M]``
            for 1-D RoPE.
        frame_index: ``long [B, M]`` — index of the (temporal-patch) frame group a
            token belongs to, 0-based.
        grid: ``(t, h, w)`` — the token grid after temporal patching and spatial
            merging; ``t * h * w == M`` for unpadded samples.
        saliency: optional ``float [B, M]`` — attention each token receives inside the
            vision tower (mean over heads and query patches of the last full-attention
            block, averaged over the patches merged into the token); the signal that
            VisionZip / FastVID / HoliTom call "[CLS] attention" on towers without a [CLS].
        cache: backbone-private tensors needed to rebuild the full sequence
            (e.g. ``input_ids`` templates); compressors must not read it.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    frame_index: torch.Tensor
    grid: tuple[int, int, int]
    saliency: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> VisualTokens:
        return replace(
            self,
            tokens=self.tokens.to(device),
            valid=self.valid.to(device),
            positions=self.positions.to(device),
            frame_index=self.frame_index.to(device),
            saliency=None if self.saliency is None else self.saliency.to(device),
        )


@dataclass
class Query:
    """The question's token embeddings, taken from the frozen backbone's embedding table.

    Attributes:
        embeds: ``float [B, Q, D]`` (right-padded).
        mask: ``bool [B, Q]`` — True for real question tokens.
        positions: optional position ids of the question tokens in the full sequence,
            ``long [3, B, Q]`` (M-RoPE) or ``long [B, Q]``; lets query-aware scorers apply
            the same relative geometry the LLM sees.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None = None


@dataclass
class Selection:
    """Which visual tokens reach the LLM, and in what form.

    Attributes:
        index: ``long [B, K]`` — ascending indices into the M visual tokens. Where
            ``valid`` is given, padded slots hold a repeated valid index.
        tokens: optional ``float [B, K, D]`` when a method merges tokens (else the kept
            tokens are gathered from the input).
        weights: optional ``float [B, K]`` straight-through keep weights for training
            (1.0 in the forward pass, carrying gradient to a scorer).
        valid: optional ``bool [B, K]`` when samples keep different counts.
    """

    index: torch.Tensor
    tokens: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def num_kept(self) -> torch.Tensor:
        """``long [B]`` — number of kept tokens per sample."""
        if self.valid is None:
            return torch.full((self.index.shape[0],), self.index.shape[1], dtype=torch.long, device=self.index.device)
        return self.valid.sum(dim=1)

    def gather(self, visual: VisualTokens) -> torch.Tensor:
        """Kept token embeddings ``float [B, K, D]`` (merged tokens if the method merged),
        multiplied by ``weights`` when present so gradients reach a scorer."""
        if self.tokens is not None:
            out = self.tokens
        else:
            idx = self.index.unsqueeze(-1).expand(-1, -1, visual.tokens.shape[-1])
            out = torch.gather(visual.tokens, 1, idx)
        if self.weights is not None:
            out = out * self.weights.unsqueeze(-1).to(out.dtype)
        return out

    def gather_positions(self, visual: VisualTokens) -> torch.Tensor:
        """Original position ids of the kept tokens: ``[3, B, K]`` or ``[B, K]``; never renumbered."""
        if visual.positions.dim() == 3:
            idx = self.index.unsqueeze(0).expand(visual.positions.shape[0], -1, -1)
            return torch.gather(visual.positions, 2, idx)
        return torch.gather(visual.positions, 1, self.index)


@dataclass
class TeacherSignals:
    """What a frozen teacher says about the visual tokens.

    Attributes:
        attention: ``float [B, M]`` — text→video attention at the reference layer,
            reduced over heads and text tokens (0 at padded tokens).
        logits: optional ``float [B, V]`` — next-token logits at the answer position.
        hidden_states: optional ``float [B, M, D]`` — visual hidden states at the
            reference layer.
    """

    attention: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
