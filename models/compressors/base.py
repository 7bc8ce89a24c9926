"""The compressor interface and the helpers every method shares.

A compressor is an ``nn.Module`` with ``forward(visual, query=None, budget=...) -> Selection``.
Training-free methods subclass :class:`Compressor`; learned ones subclass
:class:`LearnedCompressor`, which adds the exported-folder format
(``config.json`` + ``model.safetensors``) through ``huggingface_hub.PyTorchModelHubMixin``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from tokensieve.models.budget import Budget, check_budget, num_keep
from tokensieve.models.types import Query, Selection, VisualTokens


class Compressor(nn.Module):
    """Base class: decides which of the M visual tokens reach the LLM.

    Subclasses set ``name`` (the registry key), ``needs_query`` (question embeddings),
    ``needs_saliency`` (``VisualTokens.saliency`` from the vision tower),
    ``needs_attention`` (LLM attention inside the forward pass; such methods have
    ``applies = "in_llm"`` and run through ``backbone.forward_in_llm``) and implement
    :meth:`forward`.
    """

    name: ClassVar[str] = ""
    needs_query: ClassVar[bool] = False
    needs_saliency: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    applies: ClassVar[str] = "pre_llm"

    def forward(self, visual: VisualTokens, query: Query | None = None, budget: Budget = 0.25) -> Selection:
        """Select tokens.

        Args:
            visual: tokens ``[B, M, D]`` with ``valid [B, M]``.
            query: question embeddings ``[B, Q, D]`` (required when ``needs_query``).
            budget: retention ratio in (0, 1] of each sample's valid tokens, or an int count.

        Returns:
            Selection with ascending ``index [B, K]``.
        """
        raise NotImplementedError

    def _require_query(self, query: Query | None) -> Query:
        if query is None:
            raise ValueError(f"compressor {self.name!r} is query-aware: pass query=backbone.embed_query(batch, visual)")
        return query


def select_topk(scores: torch.Tensor, valid: torch.Tensor, budget: Budget) -> Selection:
    """Keep each sample's highest-scoring valid tokens, indices sorted ascending.

    Args:
        scores: ``float [B, M]``; higher is kept first. Ties break toward the lower index.
        valid: ``bool [B, M]``.
        budget: see :func:`tokensieve.models.budget.num_keep`.

    Returns:
        Selection with ``index [B, K]``, K = max kept count in the batch; ``valid [B, K]``
        is set only when samples keep different counts.
    """
    check_budget(budget)
    masked = scores.detach().float().masked_fill(~valid, float("-inf"))
    counts = [num_keep(int(n), budget) for n in valid.sum(1).tolist()]
    k_max = max(counts) if counts else 0
    # stable descending sort: equal scores keep index order
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k_max]
    return _pack([order[b, : counts[b]] for b in range(scores.shape[0])], k_max, scores.device)


def selection_from_indices(indices: list[torch.Tensor], device: torch.device | None = None) -> Selection:
    """Pack per-sample index lists (any order) into a :class:`Selection` with sorted indices."""
    k_max = max((len(i) for i in indices), default=0)
    return _pack(indices, k_max, device or (indices[0].device if indices else None))


def pack_merged(indices: list[torch.Tensor], tokens: list[torch.Tensor], like: torch.Tensor) -> Selection:
    """Pack per-sample merged outputs into one :class:`Selection`.

    Args:
        indices: per sample, ``long [k_b]`` representative original indices (any order).
        tokens: per sample, ``float [k_b, D]`` merged tokens, row-aligned with ``indices``.
        like: the input ``visual.tokens [B, M, D]`` (gives D, dtype and device).

    Returns:
        Selection with ascending ``index [B, K]``, ``tokens [B, K, D]`` (K = max k_b) and
        ``valid [B, K]`` when samples keep different counts; padded slots repeat the
        sample's last kept index and token (index 0 and a zero token when a sample keeps nothing).
    """
    k_max = max((int(i.numel()) for i in indices), default=0)
    return _pack(indices, k_max, like.device, tokens=tokens, like=like)


def _pack(indices: list[torch.Tensor], k_max: int, device, tokens: list[torch.Tensor] | None = None, like: torch.Tensor | None = None) -> Selection:
    index = torch.zeros(len(indices), k_max, dtype=torch.long, device=device)
    valid = torch.zeros(len(indices), k_max, dtype=torch.bool, device=device)
    out = None if tokens is None else torch.zeros(len(indices), k_max, like.shape[-1], dtype=like.dtype, device=device)
    for b, idx in enumerate(indices):
        idx = idx.to(device=device, dtype=torch.long)
        order = torch.argsort(idx)
        n = idx.numel()
        index[b, :n] = idx[order]
        valid[b, :n] = True
        if out is not None:
            out[b, :n] = tokens[b].to(device)[order].to(out.dtype)
        if 0 < n < k_max:  # padded slots repeat a valid entry so gathers stay in range
            index[b, n:] = index[b, n - 1]
            if out is not None:
                out[b, n:] = out[b, n - 1]
    return Selection(index=index, tokens=out, valid=None if bool(valid.all()) else valid)


class LearnedCompressor(Compressor, PyTorchModelHubMixin):
    """A compressor with trainable parameters, exported as a folder.

    Folder format: ``config.json`` holds ``{"method": name, **init_kwargs}``;
    ``model.safetensors`` holds the state dict. :meth:`load` checks keys strictly.
    Subclasses must take only JSON-serialisable keyword arguments in ``__init__``.
    """

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:  # type: ignore[override]
        """Write ``config.json`` + ``model.safetensors`` into ``save_directory``."""
        config = {"method": self.name, **dict(self._hub_mixin_config or {})}
        super().save_pretrained(save_directory, config=config, **kwargs)

    @classmethod
    def load(cls, path_or_id: str | Path, map_location: str = "cpu") -> LearnedCompressor:
        """Load an exported folder (or hub repo id) with strict key checking.

        Raises:
            ValueError: if ``config.json`` names another method.
            RuntimeError: on missing or unexpected keys in ``model.safetensors``.
        """
        model = cls.from_pretrained(str(path_or_id), strict=True, map_location=map_location)
        return model.eval()


def read_method_name(folder: str | Path) -> str:
    """The ``method`` field of an exported folder's ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``folder``.
        ValueError: the file has no ``method`` field.
    """
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not an exported compressor folder (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if "method" not in cfg:
        raise ValueError(f"{cfg_path}: missing field 'method'")
    return cfg["method"]
