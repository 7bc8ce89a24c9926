"""Efficiency accounting: analytic prefill FLOPs and measured prefill time.

FLOPs convention: one multiply-add = 2 FLOPs; only matrix products are counted (linear
layers, convolutions, attention's QKᵀ and AV) — norms, activations, softmax, RoPE,
residual adds and the per-frame bilinear pooling are left out, as in
``torch.utils.flop_counter.FlopCounterMode``, which the test suite checks this against.

For a decoder LLM with hidden D, H query / G key-value heads of size d, MLP width I (gated,
three matrices), vocabulary V and a prefill of L tokens (L = kept visual + text tokens):

    per layer  = 2·L·D·(H·d)        q projection
               + 2·2·L·D·(G·d)      k, v projections
               + 2·L·(H·d)·D        o projection
               + 2·2·H·d·L·L'       QKᵀ and AV, L' = L (dense, default) or (L+1)/2 (causal)
               + 3·2·L·D·I          gate, up, down
    LLM        = layers · per layer + 2·D·V·logits_rows   (LM head on the answer position only)

``causal=False`` counts the full L×L score matrix, which is what sdpa's math path and
FlopCounterMode report; ``causal=True`` counts only the unmasked half (what a causal flash
kernel computes). FastV (arXiv 2403.06764) writes the same per-layer count in MACs for MHA
with a 2-matrix MLP; this is its GQA / gated-MLP form.

Vision towers (the full video is always encoded; pruning acts after the projector):

- Qwen2-VL / Qwen2.5-VL: N = ceil(T/tp)·(H/p)·(W/p) patches of width C: Conv3d patch embed
  2·N·C·(3·tp·p²); per block 2·N·C·3C (qkv) + 2·N·C² (proj) + 4·C·Σ chunk² (attention within
  each frame group, or within each window for Qwen2.5-VL's windowed blocks) + MLP (Qwen2.5-VL
  gated 3·2·N·C·I_v, Qwen2-VL 2·2·N·C·(r·C)); merger ("projector") on N/m² tokens:
  2·(N/m²)·(m²C)² + 2·(N/m²)·(m²C)·D.
- LLaVA-OneVision (SigLIP): N = T·(S/p)² patches: Conv2d 2·N·C·3p²; per layer 8·N·C² + 4·C·T·(S/p)⁴
  + 2·2·N·C·I_v over every encoder layer; projector on all N patches before pooling:
  2·N·C·D + 2·N·D².

Sources: transformers ``modeling_qwen2_vl.py``, ``modeling_qwen2_5_vl.py``,
``modeling_llava_onevision.py``, ``modeling_siglip.py`` (5.23).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SUPPORTED = ("qwen2_5_vl", "qwen2_vl", "llava_onevision")


@dataclass
class PrefillFlops:
    """Analytic FLOPs of one prefill, split by stage (floats, FLOPs; multiply-add = 2)."""

    vision: float
    projector: float
    llm: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


# ---------------------------------------------------------------------------- LLM
def llm_prefill_flops(text_config, num_tokens: int, batch_size: int = 1, causal: bool = False, logits_rows: int = 1) -> float:
    """Decoder prefill FLOPs for ``num_tokens`` tokens per sample (formula in the module doc).

    Args:
        text_config: a Qwen2-style text config (``hidden_size``, ``intermediate_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
            optional ``head_dim``, ``vocab_size``).
        num_tokens: L, the prefill length (kept visual + text tokens).
        causal: count only the unmasked half of the score matrix.
        logits_rows: positions the LM head is applied to (1: the answer position).
    """
    d_model, inter = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d_model // heads
    length = num_tokens
    keys = (length + 1) / 2 if causal else length
    per_layer = (
        2 * length * d_model * heads * head_dim
        + 2 * 2 * length * d_model * kv * head_dim
        + 2 * length * heads * head_dim * d_model
        + 2 * 2 * heads * head_dim * length * keys
        + 3 * 2 * length * d_model * inter
    )
    return float(batch_size * (text_config.num_hidden_layers * per_layer + 2 * d_model * text_config.vocab_size * logits_rows))


# ---------------------------------------------------------------------------- vision
def _qwen_windows(gh: int, gw: int, merge: int, window_merged: int) -> list[int]:
    """Patch counts of Qwen2.5-VL's attention windows in one frame group (tiles from the origin)."""
    mh, mw = gh // merge, gw // merge
    rows = [min(window_merged, mh - i) for i in range(0, mh, window_merged)]
    cols = [min(window_merged, mw - j) for j in range(0, mw, window_merged)]
    return [r * c * merge * merge for r in rows for c in cols]


def _qwen_vision(config, num_frames: int, height: int, width: int) -> tuple[float, float]:
    vc = config.vision_config
    p, tp, m = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"height/width {height}x{width} must be multiples of patch_size*spatial_merge_size = {p * m}")
    gt, gh, gw = math.ceil(num_frames / tp), height // p, width // p
    n = gt * gh * gw
    qwen25 = config.model_type == "qwen2_5_vl"
    c = vc.hidden_size if qwen25 else vc.embed_dim
    out_dim = vc.out_hidden_size if qwen25 else vc.hidden_size
    full_chunks = gt * (gh * gw) ** 2
    window_chunks = gt * sum(w * w for w in _qwen_windows(gh, gw, m, vc.window_size // m // p)) if qwen25 else full_chunks
    mlp = 3 * 2 * n * c * vc.intermediate_size if qwen25 else 2 * 2 * n * c * int(c * vc.mlp_ratio)
    flops = 2 * n * c * 3 * tp * p * p  # Conv3d patch embedding
    full_blocks = set(vc.fullatt_block_indexes) if qwen25 else set(range(vc.depth))
    for i in range(vc.depth):
        chunks = full_chunks if i in full_blocks else window_chunks
        flops += 2 * n * c * 3 * c + 2 * n * c * c + 2 * 2 * c * chunks + mlp
    merged, wide = n // (m * m), c * m * m
    projector = 2 * merged * wide * wide + 2 * merged * wide * out_dim
    return float(flops), float(projector)


def _siglip_vision(config, num_frames: int) -> tuple[float, float]:
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    per_frame = side * side
    n = num_frames * per_frame
    c = vc.hidden_size
    flops = 2 * n * c * vc.num_channels * vc.patch_size**2
    flops += vc.num_hidden_layers * (8 * n * c * c + 2 * 2 * c * num_frames * per_frame**2 + 2 * 2 * n * c * vc.intermediate_size)
    layers = config.vision_feature_layer
    c_in = c * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    d = config.text_config.hidden_size
    projector = 2 * n * c_in * d + 2 * n * d * d
    return float(flops), float(projector)


def num_video_tokens(config, num_frames: int, height: int | None = None, width: int | None = None) -> int:
    """M, the visual tokens a video yields before pruning (LLaVA's newline excluded).

    Raises:
        ValueError: unsupported ``model_type``.
    """
    kind = _kind(config)
    if kind == "llava_onevision":
        side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
        return num_frames * side * side
    vc = config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    return math.ceil(num_frames / vc.temporal_patch_size) * (height // unit) * (width // unit)


def _kind(config) -> str:
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"config.model_type {kind!r} is not supported for FLOPs accounting; supported: {', '.join(SUPPORTED)}")
    return kind


def prefill_flops(config, num_visual_tokens: int, num_text_tokens: int, num_frames: int = 0, height: int | None = None, width: int | None = None, batch_size: int = 1, causal: bool = False, logits_rows: int = 1) -> PrefillFlops:
    """Analytic FLOPs of one prefill: vision tower, projector / merger, LLM.

    Args:
        config: a transformers config of a supported model (``model_type`` qwen2_5_vl,
            qwen2_vl or llava_onevision).
        num_visual_tokens: kept visual tokens reaching the LLM (per sample).
        num_text_tokens: every other prefill token (template, newline, question, prompt).
        num_frames: frames encoded (0: skip the vision side).
        height, width: frame size in pixels for Qwen (multiples of 28); ignored by LLaVA,
            which resizes to ``vision_config.image_size``.
        batch_size: samples (all of the same lengths).
        causal, logits_rows: see :func:`llm_prefill_flops`.

    Returns:
        PrefillFlops (``vision``, ``projector``, ``llm``, ``total``).

    Raises:
        ValueError: unsupported ``model_type``, or Qwen frame sizes that are missing or not
            multiples of 28.
    """
    kind = _kind(config)
    vision = projector = 0.0
    if num_frames:
        if kind == "llava_onevision":
            vision, projector = _siglip_vision(config, num_frames)
        else:
            if height is None or width is None:
                raise ValueError("height and width are required for Qwen vision FLOPs")
            vision, projector = _qwen_vision(config, num_frames, height, width)
    llm = llm_prefill_flops(config.text_config, num_visual_tokens + num_text_tokens, 1, causal, logits_rows)
    return PrefillFlops(vision * batch_size, projector * batch_size, llm * batch_size)


# ---------------------------------------------------------------------------- measurement
def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (works on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_prefill(backbone, batch, visual, selection=None, repeats: int = 5, warmup: int = 1) -> dict:
    """Wall time of the LLM prefill ``backbone(batch, visual, selection)`` (vision excluded).

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events per call,
    after ``torch.cuda.synchronize``.

    Args:
        repeats: timed calls (>= 1); warmup: untimed calls before them.

    Returns:
        ``{"device", "repeats", "prefill_tokens", "times_s", "mean_s", "median_s", "min_s", "std_s"}``;
        ``prefill_tokens`` is the padded prefill length L.

    Raises:
        ValueError: ``repeats < 1``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = backbone.device
    length = backbone.lm_inputs(batch, visual, selection)[1].shape[1]
    for _ in range(warmup):
        backbone(batch, visual, selection)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            backbone(batch, visual, selection)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            backbone(batch, visual, selection)
            times.append(time.perf_counter() - t0)
    return {
        "device": str(device),
        "repeats": repeats,
        "prefill_tokens": int(length),
        "times_s": times,
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "std_s": statistics.pstdev(times),
    }
