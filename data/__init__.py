"""tokensieve.data: shard writer, streaming reader, video decoding, frame sampling, collation,
and the feature-cache shard format.

Nothing here imports models, training code, Lightning or transformers.
"""

from tokensieve.data.features import FEATURE_FORMAT, collate_features, decode_features, encode_features
from tokensieve.data.reader import (
    SKIP_REASONS,
    ShardSplitError,
    SkipCounter,
    Source,
    VideoShardDataset,
    collate_videos,
    make_loader,
    parse_sources,
    shard_sizes,
)
from tokensieve.data.samples import sample_videos
from tokensieve.data.shards import CAPTION_PROMPT, default_question, fill_question, read_manifest, write_shards
from tokensieve.data.types import VideoBatch
from tokensieve.data.video import (
    FixedSize,
    QwenResize,
    VideoInfo,
    cut_stream_copy,
    decode_frames,
    decode_range,
    frames_for_fps,
    probe,
    sample_indices,
    smart_resize,
    torchcodec_available,
    write_clip,
)

__all__ = [
    "CAPTION_PROMPT",
    "FEATURE_FORMAT",
    "SKIP_REASONS",
    "FixedSize",
    "QwenResize",
    "ShardSplitError",
    "SkipCounter",
    "Source",
    "VideoBatch",
    "VideoInfo",
    "VideoShardDataset",
    "collate_features",
    "collate_videos",
    "cut_stream_copy",
    "decode_features",
    "decode_frames",
    "decode_range",
    "default_question",
    "encode_features",
    "fill_question",
    "frames_for_fps",
    "make_loader",
    "parse_sources",
    "probe",
    "read_manifest",
    "sample_indices",
    "sample_videos",
    "shard_sizes",
    "smart_resize",
    "torchcodec_available",
    "write_clip",
    "write_shards",
]
