"""How QLoRA lays an NF4 weight out in blocks: plain arithmetic, importable without torch,
so that `graft plan` counts an NF4 base's bytes (`plan/memory.py`) as `qlora.py` stores it."""

NF4_BLOCK = 64


# FSDP2 shards an NF4 weight by splitting each of its flat inner tensors into equal
# parts, one per rank, so the number of scaler blocks must divide by the world size.
# Preferring a multiple of 8 lets the same quantization shard over 2, 4 or 8 ranks and
# keeps it independent of the world size (1 and N processes train the same weights).
SHARDABLE_SCALER_BLOCKS = 8


def _scaler_block(n_blocks: int) -> int:
    """The largest scaler block (<= 256, QLoRA's size) that divides the number of blocks,
    leaving a multiple of 8 scaler blocks when such a size exists."""
    divisors = [size for size in range(min(256, n_blocks), 0, -1) if n_blocks % size == 0]
    shardable = [size for size in divisors if (n_blocks // size) % SHARDABLE_SCALER_BLOCKS == 0]
    return (shardable or divisors)[0]
