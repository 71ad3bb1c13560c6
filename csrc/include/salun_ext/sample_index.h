// The strided sample of sample_keys, shared by the CPU and CUDA kernels (Python twin: sample_indices in
// salun_ext/ops/_reference.py).
#pragma once

#include <cstdint>

#include "salun_ext/key.h"  // SALUN_HD

namespace salun_ext {

// Global index floor(i * total / count) of sample i (0 <= i < count <= total). The product i * total is taken in
// 128 bits: in 64 bits it overflows once count * total > 9.2e18 (e.g. 1.4e9 samples of a 6.7e9-element list).
SALUN_HD int64_t sample_index(int64_t i, int64_t total, int64_t count) {
  const unsigned __int128 product = static_cast<unsigned __int128>(i) * static_cast<unsigned __int128>(total);
  return static_cast<int64_t>(product / static_cast<unsigned __int128>(count));
}

}  // namespace salun_ext
