"""Bit-packed mask layout, mirrored from csrc/include/salun_ext/mask_layout.h (keep the two in step).

One flat int32 word buffer holds the masks of a list of tensors in list order. Element j of tensor i is bit
j % 32 of word `word_offsets[i] + j // 32`, least significant bit first. Each tensor's segment is padded to a
multiple of 128 bits (4 words); padding bits are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

BITS_PER_WORD = 32
SEGMENT_ALIGN_BITS = 128
WORDS_PER_SEGMENT_ALIGN = SEGMENT_ALIGN_BITS // BITS_PER_WORD


def segment_words(numel: int) -> int:
    return (numel + SEGMENT_ALIGN_BITS - 1) // SEGMENT_ALIGN_BITS * WORDS_PER_SEGMENT_ALIGN


def word_offsets(numels: Sequence[int]) -> tuple[list[int], int]:
    """First word of each tensor's segment, and the total number of words."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += segment_words(n)
    return offsets, total


def pack_bits(bits):
    """Pack a flat bool tensor into int32 words of one padded segment (plain torch; used by the reference)."""
    import torch

    n = bits.numel()
    padded = torch.zeros(segment_words(n) * BITS_PER_WORD, dtype=torch.int64, device=bits.device)
    padded[:n] = bits.reshape(-1).to(torch.int64)
    shifts = torch.arange(BITS_PER_WORD, device=bits.device, dtype=torch.int64)
    words = (padded.view(-1, BITS_PER_WORD) << shifts).sum(dim=1)
    # two's-complement wrap into int32 without relying on an out-of-range cast
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words, numel: int):
    """Inverse of pack_bits: int32 words of one segment -> flat bool tensor of numel elements."""
    import torch

    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int64)
    as_unsigned = words.to(torch.int64) & 0xFFFFFFFF
    bits = ((as_unsigned.unsqueeze(1) >> shifts) & 1).to(torch.bool).reshape(-1)
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
