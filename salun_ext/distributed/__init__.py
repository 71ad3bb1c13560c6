"""SalUn across processes: exact global masks over DDP replicas, FSDP2 / DTensor shards and per-rank lists, masked
steps on local shards, distributed masks on disk, and the torchrun runtime the CLIs share.

    ctx = init_distributed()                                   # torchrun environment -> process group
    mask = saliency_masks(grads, 0.5, process_group=ctx.group) # histograms all-reduced: KiB per mask
    save_mask(mask, "mask.safetensors")                        # consolidated on rank 0 (or sharded=True)

See docs/distributed.md.
"""

from salun_ext.distributed.masks import gather_mask, load_mask, save_mask, shard_path
from salun_ext.distributed.runtime import (
    DistContext,
    DistributedError,
    configure_logging,
    init_distributed,
    main_print,
)
from salun_ext.distributed.shards import is_dtensor, shard_mask, to_local

__all__ = [
    "DistContext",
    "DistributedError",
    "configure_logging",
    "gather_mask",
    "init_distributed",
    "is_dtensor",
    "load_mask",
    "main_print",
    "save_mask",
    "shard_mask",
    "shard_path",
    "to_local",
]
