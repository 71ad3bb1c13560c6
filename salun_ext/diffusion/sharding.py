"""FSDP2 for diffusion UNets: shard one for training / saliency, and gather it back into a plain one for saving.

unet_class = type(unet)            # fully_shard swaps the class for an FSDP subclass: keep the plain one
shard_unet(unet)                   # every rank, before building the Engine (distributed="fsdp")
...
unshard_for_saving(unet, unet_class, owner)   # collective; rank 0's `owner.unet` is then a plain UNet
"""

from __future__ import annotations

from typing import Any

import torch


def shard_unet(unet: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` each down / mid / up block, then the root (stem, embeddings, output conv).

    Per-block units keep one block's full parameters gathered at a time (the memory FSDP2 is for); the root unit
    holds the small rest. Call on every rank before building the Engine (distributed="fsdp"). `mesh`: a 1-D
    DeviceMesh (default: all ranks, on the UNet's device type, so CPU/gloo runs do not pick a CUDA mesh).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(next(unet.parameters()).device.type, (dist.get_world_size(),))
    blocks = [*getattr(unet, "down_blocks", []), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", [])]
    for block in blocks:
        if block is not None:
            fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def unshard_for_saving(unet: torch.nn.Module, unet_class: type, owner: Any) -> None:
    """Collective: gather the FSDP2 UNet's full weights to rank 0, which swaps a plain `unet_class` holding them
    into `owner` (the DDPM / the SD pipeline) so that save_pretrained writes an ordinary, loadable model."""
    from salun_ext.distributed.checkpoint import full_state_dict

    state = full_state_dict(unet)  # every rank takes part; only rank 0 gets the tensors (on CPU)
    if state:
        plain = unet_class.from_config(unet.config)
        plain.load_state_dict(state)
        owner.unet = plain
