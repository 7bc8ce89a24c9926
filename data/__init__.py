"""tokensieve.data: shard writer, streaming reader, video decoding, frame sampling, collation.

Nothing here imports models, training code, Lightning or transformers.
"""

from tokensieve.data.reader import SKIP_REASONS, SkipCounter, VideoShardDataset, collate_videos, make_loader
from tokensieve.data.samples import sample_videos
from tokensieve.data.shards import default_question, write_shards
from tokensieve.data.types import VideoBatch
from tokensieve.data.video import VideoInfo, decode_frames, probe, sample_indices, smart_resize, write_clip

__all__ = [
    "SKIP_REASONS",
    "SkipCounter",
    "VideoBatch",
    "VideoInfo",
    "VideoShardDataset",
    "collate_videos",
    "decode_frames",
    "default_question",
    "make_loader",
    "probe",
    "sample_indices",
    "sample_videos",
    "smart_resize",
    "write_clip",
    "write_shards",
]
