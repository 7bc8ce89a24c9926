"""Contract tests run on every adapter (Qwen2.5-VL, Qwen2-VL, LLaVA-OneVision), fp32 tiny models.

Exactness: keep-all == the stock HF forward / generate; a pruned batch with different kept
counts == each sample alone; kept tokens keep their full-sequence position ids; teacher
attention == eager attention weights.
"""

from __future__ import annotations

import torch

from tokensieve.data.types import VideoBatch
from tokensieve.models.compressors import get_compressor
from tokensieve.models.types import Selection


def hf_inputs(backbone, batch, visual, b: int) -> dict:
    """The stock HF inputs for sample b: input_ids + pixel values, positions left to the model."""
    ids = backbone._layouts(batch, visual)[b].input_ids[None]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if backbone.family == "llava_onevision":
        kwargs["pixel_values_videos"] = backbone.preprocessor(batch.frames[b])[None]
        return kwargs
    pixels, grid = backbone.preprocessor(batch.frames[b])
    kwargs.update(pixel_values_videos=pixels, video_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == backbone.video_token_id).int() * 2)
    if backbone.family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = visual.cache["second_per_grid_ts"][b : b + 1]
    return kwargs


def uneven_selection(visual, budgets=(0.5, 0.2), seed=0) -> Selection:
    """Random kept sets of different sizes per sample (``valid`` marks the padding)."""
    from tokensieve.models.compressors.base import selection_from_indices

    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(visual.num_tokens, generator=gen)[: max(1, round(r * visual.num_tokens))] for r in budgets]
    return selection_from_indices(picks)


def row(visual, b: int):
    """Sample b's VisualTokens as a batch of one."""
    from dataclasses import replace

    cache = {k: (v[b : b + 1] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in visual.cache.items()}
    pos = visual.positions[:, b : b + 1] if visual.positions.dim() == 3 else visual.positions[b : b + 1]
    sal = None if visual.saliency is None else visual.saliency[b : b + 1]
    return replace(visual, tokens=visual.tokens[b : b + 1], valid=visual.valid[b : b + 1], positions=pos, frame_index=visual.frame_index[b : b + 1], saliency=sal, cache=cache)


def sub_batch(batch, b: int) -> VideoBatch:
    return VideoBatch(frames=batch.frames[b : b + 1], timestamps=batch.timestamps[b : b + 1], frame_mask=batch.frame_mask[b : b + 1], questions=[batch.questions[b]])


def sel_row(sel: Selection, b: int) -> Selection:
    k = int(sel.num_kept[b])
    return Selection(index=sel.index[b : b + 1, :k])


def test_keep_all_equals_unpruned_hf_forward(backbone, encoded):
    video_batch, visual = encoded
    keep_all = Selection(index=torch.arange(visual.num_tokens).expand(video_batch.size, -1))
    ours = backbone(video_batch, visual, keep_all)
    assert torch.equal(ours, backbone(video_batch, visual))
    for b in range(video_batch.size):  # batch rows are left-padded (questions differ in length)
        ref = backbone.model(**hf_inputs(backbone, video_batch, visual, b)).logits[0, -1]
        torch.testing.assert_close(ours[b], ref, atol=1e-5, rtol=1e-5)


def test_kept_positions_are_the_full_sequence_ids(backbone, encoded):
    video_batch, visual = encoded
    sel = uneven_selection(visual)
    _, mask, positions, spans = backbone.lm_inputs(video_batch, visual, sel)
    positions = positions if positions.dim() == 3 else positions[None]
    for b, (pad, vs, kept, ts) in enumerate(spans):
        lay = backbone._layouts(video_batch, visual)[b]
        full_visual = lay.positions[:, lay.video_start : lay.video_start + lay.num_visual]
        assert kept == int(sel.num_kept[b])
        assert torch.equal(positions[:, b, vs : vs + kept], full_visual[:, sel.index[b, :kept]])
        # the template token and the text after the video keep their original ids: nothing renumbered
        assert torch.equal(positions[:, b, ts - 1 :], lay.positions[:, lay.text_start - 1 :])
        assert torch.equal(positions[:, b, pad:vs], lay.positions[:, : lay.video_start])
        assert mask[b, :pad].sum() == 0 and mask[b, pad:].all()


def test_pruned_batch_equals_each_sample_alone(backbone, encoded):
    video_batch, visual = encoded
    sel = uneven_selection(visual)
    assert sel.valid is not None  # the two samples keep different counts
    together = backbone(video_batch, visual, sel)
    for b in range(video_batch.size):
        alone = backbone(sub_batch(video_batch, b), row(visual, b), sel_row(sel, b))
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_generate_after_pruning_batch_equals_each_sample_alone(backbone, encoded):
    video_batch, visual = encoded
    sel = uneven_selection(visual, budgets=(0.6, 0.25), seed=1)
    together = backbone.generate(video_batch, visual, sel, max_new_tokens=4)
    for b in range(video_batch.size):
        alone = backbone.generate(sub_batch(video_batch, b), row(visual, b), sel_row(sel, b), max_new_tokens=4)
        n = alone.shape[1]
        assert torch.equal(together[b, :n], alone[0])


def test_generate_after_pruning_continues_from_full_positions(backbone, encoded):
    """Cached decoding == recomputing the whole pruned sequence each step with explicit ids
    (answer token i at the full sequence's max position + 1 + i)."""
    video_batch, visual = encoded
    sel = uneven_selection(visual, budgets=(0.5, 0.3), seed=2)
    steps = 3
    ours = backbone.generate(video_batch, visual, sel, max_new_tokens=steps, eos_token_id=[])
    embeds, mask, positions, _ = backbone.lm_inputs(video_batch, visual, sel)
    start = torch.tensor([lay.next_position for lay in backbone._layouts(video_batch, visual)])
    embed = backbone.model.get_input_embeddings()
    for i in range(steps):
        with torch.no_grad():
            logits = backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        token = logits.argmax(-1)
        assert torch.equal(token, ours[:, i])
        pos = start + i
        embeds = torch.cat([embeds, embed(token)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = torch.cat([positions, pos[None, :, None].expand(3, -1, 1) if positions.dim() == 3 else pos[:, None]], -1)


def test_keep_all_generate_equals_hf_generate(backbone, encoded):
    video_batch, visual = encoded
    keep_all = Selection(index=torch.arange(visual.num_tokens).expand(video_batch.size, -1))
    ours = backbone.generate(video_batch, visual, keep_all, max_new_tokens=5)
    for b in range(video_batch.size):
        inputs = hf_inputs(backbone, video_batch, visual, b)
        ref = backbone.model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert torch.equal(ours[b, : len(ref)], ref), (ours[b], ref)


def test_teacher_attention_and_hidden_match_eager(backbone, eager_backbone, encoded):
    batch, visual = encoded
    layer = 2
    embeds, mask, positions, spans = eager_backbone.lm_inputs(batch, visual)
    with torch.no_grad():
        out = eager_backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True, output_hidden_states=True)
    weights = out.attentions[layer]  # [B, H, L, L], what the eager kernel actually used
    for reduction in ("max", "mean"):
        ours = backbone.teacher_signals(batch, visual, layer=layer, reduction=reduction, with_hidden=True)
        for b, (_, vs, kept, ts) in enumerate(spans):
            block = weights[b, :, ts:, vs : vs + kept]
            ref = block.amax(dim=(0, 1)) if reduction == "max" else block.mean(dim=(0, 1))
            torch.testing.assert_close(ours.attention[b, :kept], ref, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(ours.hidden_states[b, :kept], out.hidden_states[layer + 1][b, vs : vs + kept], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.logits, out.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_teacher_without_logits_stops_early_and_agrees(backbone, encoded):
    video_batch, visual = encoded
    full = backbone.teacher_signals(video_batch, visual, layer=1)
    short = backbone.teacher_signals(video_batch, visual, layer=1, with_logits=False)
    assert short.logits is None and short.hidden_states is None
    torch.testing.assert_close(short.attention, full.attention)


def test_query_is_the_text_after_the_template_token(backbone, encoded):
    video_batch, visual = encoded
    query = backbone.embed_query(video_batch, visual)
    lengths = query.mask.sum(1)
    assert lengths[1] > lengths[0]  # second question is longer
    emb = backbone.model.get_input_embeddings()
    for b, lay in enumerate(backbone._layouts(video_batch, visual)):
        torch.testing.assert_close(query.embeds[b, : lengths[b]], emb(lay.input_ids[lay.text_start :]))
        qpos = query.positions[:, b] if query.positions.dim() == 3 else query.positions[b][None]
        assert torch.equal(qpos[:, : lengths[b]], lay.positions[:, lay.text_start :])


def test_grid_and_frame_index_describe_every_token(backbone, encoded):
    video_batch, visual = encoded
    t, h, w = visual.grid
    assert t * h * w == visual.num_tokens
    assert torch.equal(visual.frame_index[0], torch.arange(visual.num_tokens) // (h * w))


def test_compressor_runs_unchanged(backbone, encoded):
    video_batch, visual = encoded
    sel = get_compressor("uniform")(visual, budget=0.1)
    assert sel.index.shape[1] == round(0.1 * visual.num_tokens)
    assert not torch.allclose(backbone(video_batch, visual, sel), backbone(video_batch, visual))
