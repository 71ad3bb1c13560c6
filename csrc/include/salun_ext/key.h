// |g| -> monotone 31-bit key, shared by the CPU and CUDA kernels.
//
// For IEEE-754 binary32 with the sign bit cleared, the unsigned bit pattern orders exactly like the magnitude:
// +0 and -0 both map to 0, denormals come next, +Inf is 0x7F800000 and every NaN lies above it. bf16 is the top
// half of an fp32 (key = bits << 16) and fp16 converts to fp32 exactly, so lists of mixed dtypes share one key
// space and one ranking. NaN has no rank: kernels canonicalise it to kNanKey (so a histogram can report it, and
// the Python layer names the tensor) or to 0 when the caller asked to treat NaN as zero.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SALUN_HD __host__ __device__ __forceinline__
#else
#define SALUN_HD inline
#endif

namespace salun_ext {

constexpr uint32_t kKeyBits = 31;
constexpr uint32_t kInfKey = 0x7F800000u;
constexpr uint32_t kNanKey = 0x7FFFFFFFu;  // above every finite value and +Inf

SALUN_HD uint32_t canonical_key(uint32_t magnitude_bits, bool nan_as_zero) {
  // magnitude_bits already has the sign cleared
  if (magnitude_bits > kInfKey) return nan_as_zero ? 0u : kNanKey;
  return magnitude_bits;
}

SALUN_HD uint32_t key_from_fp32_bits(uint32_t bits, bool nan_as_zero) {
  return canonical_key(bits & 0x7FFFFFFFu, nan_as_zero);
}

SALUN_HD uint32_t key_from_bf16_bits(uint16_t bits, bool nan_as_zero) {
  return canonical_key((static_cast<uint32_t>(bits) << 16) & 0x7FFFFFFFu, nan_as_zero);
}

// Exact fp16 -> fp32 bit conversion of the magnitude (sign dropped), denormals included.
SALUN_HD uint32_t fp16_magnitude_to_fp32_bits(uint16_t bits) {
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0x1Fu) return 0x7F800000u | (mantissa << 13);  // Inf / NaN
  if (exponent != 0) return ((exponent + 112u) << 23) | (mantissa << 13);
  if (mantissa == 0) return 0u;  // +-0
  // denormal: value = mantissa * 2^-24; normalise it
  uint32_t e = 113u;  // exponent of 2^-14 in fp32 (127 - 14)
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --e;
  }
  return (e << 23) | ((mantissa & 0x3FFu) << 13);
}

SALUN_HD uint32_t key_from_fp16_bits(uint16_t bits, bool nan_as_zero) {
  return canonical_key(fp16_magnitude_to_fp32_bits(bits), nan_as_zero);
}

// Dtype codes of the multi-tensor tables (host and device agree on these).
enum class KeyDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace salun_ext
