// Bit-packed saliency mask layout, shared by the CPU and CUDA kernels and mirrored by salun_ext/mask.py.
//
// One flat int32 word buffer holds the masks of every tensor of a list, in list order. Element j of tensor i is
// bit (j % 32) of word word_offset[i] + j / 32 (least significant bit first, the order of a warp ballot). Each
// tensor's segment is padded to a multiple of 128 bits (4 words) so that a warp's ballot word never straddles two
// tensors and 16-byte vector loads of mask words stay inside one tensor. Padding bits are always zero.
#pragma once

#include <cstdint>

namespace salun_ext {

constexpr int64_t kBitsPerWord = 32;
constexpr int64_t kSegmentAlignBits = 128;
constexpr int64_t kWordsPerSegmentAlign = kSegmentAlignBits / kBitsPerWord;

inline constexpr int64_t mask_segment_words(int64_t numel) {
  return (numel + kSegmentAlignBits - 1) / kSegmentAlignBits * kWordsPerSegmentAlign;
}

// Whether element i of a tensor is salient, given the tensor's own mask words.
inline bool is_salient(const int32_t* words, int64_t i) {
  return (static_cast<uint32_t>(words[i / kBitsPerWord]) >> (i % kBitsPerWord)) & 1u;
}

}  // namespace salun_ext
