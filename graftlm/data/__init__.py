"""The data pipeline: files -> rows -> validated examples -> token ids + loss masks.

- `sources`: rows from txt / jsonl / json / parquet files, folders and globs (`file:line`).
- `formats`: per-objective validation and normalisation, the bad-row policy.
- `render`: chat template -> token ids + loss mask, the length policy.
- `packing`: several rows per sequence, attention kept within each row.
- `shards`: memory-mapped token shards for pre-training (`graft prepare`).
- `stats`: what a data set holds (`graft data stats`, `graft plan`).
- `loader`: the resumable, rank-aware sampler.
"""

from graftlm.data.formats import RowCounts, iter_examples, load_examples
from graftlm.data.packing import documents_from_eos, pack_rows
from graftlm.data.render import RenderConfig, RenderedPair, RenderedRow, Renderer
from graftlm.data.shards import ShardSet, check_tokenizer, open_shards
from graftlm.data.sources import Row, iter_rows, resolve_paths

__all__ = ["Row", "iter_rows", "resolve_paths", "RowCounts", "iter_examples", "load_examples",
           "RenderConfig", "RenderedRow", "RenderedPair", "Renderer", "pack_rows",
           "documents_from_eos", "ShardSet", "open_shards", "check_tokenizer"]
