// Host-side description of a list of tensors walked as one sequence in "global index" order: tensor order, then
// flat (row-major) index. Used by the CPU kernels directly and by the CUDA launchers to build device tables.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "salun_ext/checks.h"
#include "salun_ext/key.h"
#include "salun_ext/mask_layout.h"

namespace salun_ext {

struct TensorListInfo {
  std::vector<int64_t> numel;        // elements per tensor
  std::vector<int64_t> word_offset;  // first mask word of each tensor (segments padded to 128 bits)
  std::vector<KeyDtype> dtype;
  int64_t total_words = 0;
  int64_t total_elements = 0;
};

inline KeyDtype key_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return KeyDtype::kFloat32;
    case at::kBFloat16:
      return KeyDtype::kBFloat16;
    case at::kHalf:
      return KeyDtype::kFloat16;
    default:
      TORCH_CHECK(false, "salun_ext: unsupported dtype ", t.scalar_type());
  }
}

// Validates the list (non-empty, one device, supported dtypes, contiguous) and computes the mask layout.
inline TensorListInfo describe_tensor_list(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "salun_ext: argument 'grads' is an empty list; expected at least one tensor");
  const c10::Device device = tensors.front().device();
  TensorListInfo info;
  info.numel.reserve(tensors.size());
  info.word_offset.reserve(tensors.size());
  info.dtype.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_key_tensor(tensors[i], static_cast<int64_t>(i), device);
    const int64_t n = tensors[i].numel();
    info.numel.push_back(n);
    info.word_offset.push_back(info.total_words);
    info.dtype.push_back(key_dtype_of(tensors[i]));
    info.total_words += mask_segment_words(n);
    info.total_elements += n;
  }
  return info;
}

// Digit extraction parameters of key_histogram, validated once.
struct DigitSpec {
  int64_t low_bit;
  int64_t num_bits;
  int64_t prefix_shift;  // low_bit + num_bits; >= 32 means "no prefix condition"
  uint32_t digit_mask;
};

inline DigitSpec make_digit_spec(int64_t low_bit, int64_t num_bits, int64_t max_bits) {
  SALUN_CHECK_ARG(num_bits >= 1 && num_bits <= max_bits, "num_bits", "expected 1..", max_bits, ", got ", num_bits);
  SALUN_CHECK_ARG(low_bit >= 0 && low_bit + num_bits <= static_cast<int64_t>(kKeyBits), "low_bit",
                  "expected 0 <= low_bit and low_bit + num_bits <= 31, got low_bit=", low_bit,
                  " num_bits=", num_bits);
  return DigitSpec{low_bit, num_bits, low_bit + num_bits, static_cast<uint32_t>((1u << num_bits) - 1u)};
}

inline void check_prefixes(const std::vector<int64_t>& prefixes, const DigitSpec& spec) {
  SALUN_CHECK_ARG(!prefixes.empty(), "prefixes", "expected at least one prefix (use [0] for the top digit)");
  const int64_t limit = int64_t{1} << (kKeyBits - spec.prefix_shift);
  for (size_t r = 0; r < prefixes.size(); ++r) {
    SALUN_CHECK_ARG(prefixes[r] >= 0 && prefixes[r] < limit, "prefixes", "prefixes[", r, "] = ", prefixes[r],
                    " is outside [0, ", limit, ") for low_bit + num_bits = ", spec.prefix_shift);
    SALUN_CHECK_ARG(r == 0 || prefixes[r] > prefixes[r - 1], "prefixes", "must be strictly increasing, got ",
                    prefixes[r - 1], " before ", prefixes[r]);
  }
}

}  // namespace salun_ext
