"""Token-by-token decoding after a (pruned) prefill, with explicit position ids.

Why our own loop instead of ``model.generate``: HF's ``generate`` derives decode positions
from the KV-cache length (plus Qwen's cached ``rope_deltas``), i.e. from the number of
tokens that were *prefilled*. After pruning that number is smaller than the full
sequence's, so HF would renumber the answer. Here the caller passes the position of the
first answer token (the full sequence's max position + 1, per sample) and every step feeds
``position_ids`` explicitly, with a ``DynamicCache`` and a growing left-padded attention
mask. For a keep-all prefill this reproduces HF's ``generate`` token for token (tested).

Decoding: greedy by default; ``do_sample=True`` samples after transformers' temperature /
top-k / top-p warpers. Finished rows (EOS emitted) continue with ``pad_token_id`` and the
loop stops once every row is finished, as HF does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def decode(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    next_positions: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prefill ``inputs_embeds`` then decode up to ``max_new_tokens`` tokens.

    Args:
        model: an HF ``*ForConditionalGeneration`` accepting ``inputs_embeds``,
            ``position_ids``, ``past_key_values`` and ``logits_to_keep``.
        inputs_embeds: ``float [B, L, D]`` left-padded prefill.
        attention_mask: ``long [B, L]`` (0 on left padding).
        position_ids: ``long [3, B, L]`` (M-RoPE) or ``long [B, L]`` (1-D RoPE).
        next_positions: ``long [B]`` — position id of each sample's first new token.
        max_new_tokens: upper bound on generated tokens (>= 1).
        eos_token_id: id(s) that finish a row, or None.
        pad_token_id: written after a row has finished.
        do_sample, temperature, top_k, top_p, generator: sampling controls (ignored when greedy).

    Returns:
        ``long [B, N]`` new tokens, ``N <= max_new_tokens``.

    Raises:
        ValueError: ``max_new_tokens < 1`` or ``next_positions`` of the wrong length.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bsz = inputs_embeds.shape[0]
    if next_positions.shape != (bsz,):
        raise ValueError(f"next_positions must be [B]={bsz}, got {tuple(next_positions.shape)}")
    device = inputs_embeds.device
    eos = torch.tensor([] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)), device=device, dtype=torch.long)
    warpers = _warpers(temperature, top_k, top_p) if do_sample else None
    embed = model.get_input_embeddings()
    next_pos = next_positions.to(device=device, dtype=torch.long).clone()
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    cache, out_tokens = None, []
    embeds, mask, positions = inputs_embeds, attention_mask, position_ids
    for _ in range(max_new_tokens):
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        if warpers is None:
            token = logits.argmax(dim=-1)
        else:
            ids = torch.stack(out_tokens, 1) if out_tokens else torch.zeros(bsz, 0, dtype=torch.long, device=device)
            probs = warpers(ids, logits).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out_tokens.append(token)
        done = done | torch.isin(token, eos)
        if bool(done.all()):
            break
        embeds = embed(token)[:, None].to(inputs_embeds.dtype)
        mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
        positions = next_pos[None, :, None].expand(3, -1, 1) if position_ids.dim() == 3 else next_pos[:, None]
        next_pos = next_pos + 1
    return torch.stack(out_tokens, dim=1)
