"""In-LLM pruning (``DecoderBackbone.forward_in_llm``, FastV): exact against an independent layer-by-layer run."""

from __future__ import annotations

import torch

from tests.conftest import make_batch
from tokensieve.models.compressors import FastV


def test_keep_all_in_llm_equals_full_forward(backbone, encoded):
    batch, visual = encoded
    logits, sel = backbone.forward_in_llm(batch, visual, FastV(layer=2), 1.0)
    assert sel.index.shape[1] == visual.num_tokens
    torch.testing.assert_close(logits, backbone(batch, visual), atol=1e-5, rtol=1e-5)


def test_signal_is_the_last_tokens_head_mean_attention_at_layer_k_minus_1(backbone, eager_backbone, encoded):
    batch, visual = encoded
    seen = {}

    class Spy(FastV):
        def forward(self, visual, query=None, budget=0.5, attention=None):
            seen["attention"] = attention
            return super().forward(visual, query, budget, attention)

    backbone.forward_in_llm(batch, visual, Spy(layer=2), 0.25)
    embeds, mask, positions, spans = eager_backbone.lm_inputs(batch, visual)
    weights = eager_backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True).attentions[1]
    for b, (_, vs, kept, _) in enumerate(spans):
        torch.testing.assert_close(seen["attention"][b, :kept], weights[b, :, -1, vs : vs + kept].mean(0), atol=1e-6, rtol=1e-4)


def test_pruned_layers_see_full_sequence_states_and_original_positions(backbone):
    """Reference: hidden states entering layer K of the full run, gathered at the kept tokens,
    then layers K.. applied one by one (causal sdpa, RoPE of the gathered original positions)."""
    batch = make_batch(batch_size=1)
    visual = backbone.encode_video(batch)
    k = 2
    logits, sel = backbone.forward_in_llm(batch, visual, FastV(layer=k), 0.25)
    embeds, mask, positions, spans = backbone.lm_inputs(batch, visual)
    full = backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    _, vs, m, _ = spans[0]
    keep = torch.cat([torch.arange(vs), vs + sel.index[0], torch.arange(vs + m, embeds.shape[1])])
    hidden = full.hidden_states[k][:, keep]
    pos = positions[..., keep]
    lm = backbone.language_model
    rope = lm.rotary_emb(hidden, pos)
    with torch.no_grad():
        for layer in lm.layers[k:]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope)
        expected = backbone.model.lm_head(lm.norm(hidden))[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # and it differs from pruning the same tokens before the LLM: early layers saw every token
    assert not torch.allclose(logits, backbone(batch, visual, sel), atol=1e-6)
