"""Bit-packed mask layout, mirrored from csrc/include/salun_ext/mask_layout.h (keep the two in step).

One flat int32 word buffer holds the masks of a list of tensors in list order. Element j of tensor i is bit
j % 32 of word `word_offsets[i] + j // 32`, least significant bit first. Each tensor's segment is padded to a
multiple of 128 bits (4 words); padding bits are zero.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from itertools import accumulate

BITS_PER_WORD = 32
SEGMENT_ALIGN_BITS = 128
WORDS_PER_SEGMENT_ALIGN = SEGMENT_ALIGN_BITS // BITS_PER_WORD


def segment_words(numel: int) -> int:
    return (numel + SEGMENT_ALIGN_BITS - 1) // SEGMENT_ALIGN_BITS * WORDS_PER_SEGMENT_ALIGN


def word_offsets(numels: Sequence[int]) -> tuple[list[int], int]:
    """First word of each tensor's segment, and the total number of words."""
    offsets = list(accumulate([(n + SEGMENT_ALIGN_BITS - 1) // SEGMENT_ALIGN_BITS for n in numels], initial=0))
    total = offsets.pop() * WORDS_PER_SEGMENT_ALIGN
    return [o * WORDS_PER_SEGMENT_ALIGN for o in offsets], total


# Bit j of a word is bit j % 8 of byte j // 8 of that word on little-endian machines (x86, ARM, every GPU), so
# packing and unpacking work on bytes: one byte per bit of temporary memory, never 8.
assert sys.byteorder == "little", "salun_ext's mask layout assumes a little-endian machine"


def pack_bits(bits):
    """Pack a flat bool tensor into int32 words of one padded segment (plain torch; used by the reference)."""
    import torch

    n = bits.numel()
    padded = torch.zeros(segment_words(n) * BITS_PER_WORD, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.reshape(-1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    packed = (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return packed.view(torch.int32)


def unpack_bits(words, numel: int):
    """Inverse of pack_bits: int32 words of one segment -> flat bool tensor of numel elements."""
    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    as_bytes = words.contiguous().view(torch.uint8)
    bits = ((as_bytes.unsqueeze(1) >> shifts) & 1).to(torch.bool).reshape(-1)
    return bits[:numel]


def popcount(words) -> int:
    """Number of set bits in an int32 word tensor (SWAR popcount, chunked to bound temporaries)."""
    import torch

    total = 0
    flat = words.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.numel(), step):
        x = flat[start : start + step].to(torch.int64) & 0xFFFFFFFF
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        x = ((x * 0x01010101) & 0xFFFFFFFF) >> 24
        total += int(x.sum().item())
    return total
