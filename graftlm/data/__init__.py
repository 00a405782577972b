"""The data pipeline: files -> rows -> validated examples -> token ids + loss masks.

- `sources`: rows from txt / jsonl / json / parquet files, folders and globs (`file:line`).
- `formats`: per-objective validation and normalisation, the bad-row policy.
- `render`: chat template -> token ids + loss mask, the length policy.
- `packing`: several rows per sequence, attention kept within each row.
- `shards`: memory-mapped token shards for pre-training (`graft prepare`).
- `stats`: what a data set holds (`graft data stats`, `graft plan`).
- `loader`: the resumable, rank-aware sampler.
"""

from graftlm.lazy import lazy_exports

# name -> the module defining it, imported when the name is first used: reading rows
# (`formats`, `sources`: what `graft eval --help` reaches) needs no numpy, which the others import.
_DEFINED_IN = {
    **dict.fromkeys(["RowCounts", "iter_examples", "load_examples"], "formats"),
    **dict.fromkeys(["documents_from_eos", "pack_rows"], "packing"),
    **dict.fromkeys(["RenderConfig", "RenderedPair", "RenderedRow", "Renderer"], "render"),
    **dict.fromkeys(["ShardSet", "check_tokenizer", "open_shards"], "shards"),
    **dict.fromkeys(["Row", "iter_rows", "resolve_paths"], "sources"),
}

__all__ = ["Row", "iter_rows", "resolve_paths", "RowCounts", "iter_examples", "load_examples",
           "RenderConfig", "RenderedRow", "RenderedPair", "Renderer", "pack_rows",
           "documents_from_eos", "ShardSet", "open_shards", "check_tokenizer"]


__getattr__ = lazy_exports(__name__, _DEFINED_IN)
