// Element math of the masked optimizer steps, shared by the CPU and CUDA kernels.
//
// The operation order mirrors the plain-PyTorch reference (salun_ext/_reference.py) exactly, one IEEE fp32
// rounding per operation: the build disables FMA contraction (-ffp-contract=off, nvcc --fmad=false) so the
// kernels equal the reference bit for bit. Scalars derived in double on the host (1 - dampening, lr / bias1, ...)
// arrive already rounded to float, as PyTorch rounds a Python float for an fp32 tensor op. All math is fp32 for
// fp32, bf16 and fp16 parameters; only the stored values are rounded to the parameter dtype.
#pragma once

#include <cmath>

#include "salun_ext/key.h"  // SALUN_HD

namespace salun_ext {

struct SgdScalars {
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  float grad_scale;  // divide gradients by it when has_grad_scale
  bool has_grad_scale;
  bool has_momentum;
  bool nesterov;
  bool maximize;
  bool first_step;  // momentum buffer = d (torch initialises the buffer with the first update direction)
};

// Which optional terms an update has. The Runtime flags read them from the scalars (one uniform branch per term);
// a CPU loop passes the Static flags instead, so the terms are compile-time constants, the loop has no branches
// and the compiler vectorizes it. The element math below is the same for both.
struct SgdRuntimeFlags {
  SALUN_HD static bool grad_scale(const SgdScalars& s) { return s.has_grad_scale; }
  SALUN_HD static bool maximize(const SgdScalars& s) { return s.maximize; }
  SALUN_HD static bool decay(const SgdScalars& s) { return s.weight_decay != 0.0f; }
  SALUN_HD static bool momentum(const SgdScalars& s) { return s.has_momentum; }
  SALUN_HD static bool nesterov(const SgdScalars& s) { return s.nesterov; }
  SALUN_HD static bool first_step(const SgdScalars& s) { return s.first_step; }
};

template <bool kGradScale, bool kMaximize, bool kDecay, bool kMomentum, bool kNesterov, bool kFirstStep>
struct SgdStaticFlags {
  SALUN_HD static constexpr bool grad_scale(const SgdScalars&) { return kGradScale; }
  SALUN_HD static constexpr bool maximize(const SgdScalars&) { return kMaximize; }
  SALUN_HD static constexpr bool decay(const SgdScalars&) { return kDecay; }
  SALUN_HD static constexpr bool momentum(const SgdScalars&) { return kMomentum; }
  SALUN_HD static constexpr bool nesterov(const SgdScalars&) { return kNesterov; }
  SALUN_HD static constexpr bool first_step(const SgdScalars&) { return kFirstStep; }
};

// p: parameter (fp32 value, updated in place); g: gradient; buf: momentum buffer (fp32 value, updated in place).
template <typename Flags = SgdRuntimeFlags>
SALUN_HD void sgd_element(float& p, float g, float& buf, const SgdScalars& s) {
  float d = g;
  if (Flags::grad_scale(s)) d = d / s.grad_scale;
  if (Flags::maximize(s)) d = -d;
  if (Flags::decay(s)) d = d + s.weight_decay * p;
  if (Flags::momentum(s)) {
    const float b = Flags::first_step(s) ? d : s.momentum * buf + s.one_minus_dampening * d;
    buf = b;
    d = Flags::nesterov(s) ? d + s.momentum * b : b;
  }
  p = p - s.lr * d;
}

struct AdamScalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float decay_factor;  // 1 - lr * weight_decay (decoupled weight decay)
  float step_size;     // lr / (1 - beta1^step)
  float bias2_sqrt;    // sqrt(1 - beta2^step)
  float grad_scale;
  bool has_grad_scale;
  bool decoupled_weight_decay;
  bool amsgrad;
  bool maximize;
};

SALUN_HD float nan_propagating_max(float a, float b) {
  // torch.maximum: NaN if either operand is NaN
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

struct AdamRuntimeFlags {
  SALUN_HD static bool grad_scale(const AdamScalars& s) { return s.has_grad_scale; }
  SALUN_HD static bool maximize(const AdamScalars& s) { return s.maximize; }
  SALUN_HD static bool decay(const AdamScalars& s) { return s.weight_decay != 0.0f; }
  SALUN_HD static bool decoupled(const AdamScalars& s) { return s.decoupled_weight_decay; }
  SALUN_HD static bool amsgrad(const AdamScalars& s) { return s.amsgrad; }
};

template <bool kGradScale, bool kMaximize, bool kDecay, bool kDecoupled, bool kAmsgrad>
struct AdamStaticFlags {
  SALUN_HD static constexpr bool grad_scale(const AdamScalars&) { return kGradScale; }
  SALUN_HD static constexpr bool maximize(const AdamScalars&) { return kMaximize; }
  SALUN_HD static constexpr bool decay(const AdamScalars&) { return kDecay; }
  SALUN_HD static constexpr bool decoupled(const AdamScalars&) { return kDecoupled; }
  SALUN_HD static constexpr bool amsgrad(const AdamScalars&) { return kAmsgrad; }
};

template <typename Flags = AdamRuntimeFlags>
SALUN_HD void adam_element(float& p, float g, float& m, float& v, float& vmax, const AdamScalars& s) {
  float d = g;
  if (Flags::grad_scale(s)) d = d / s.grad_scale;
  if (Flags::maximize(s)) d = -d;
  if (Flags::decay(s)) {
    if (Flags::decoupled(s)) {
      p = p * s.decay_factor;
    } else {
      d = d + s.weight_decay * p;
    }
  }
  m = m + s.one_minus_beta1 * (d - m);  // lerp(m, d, 1 - beta1) for a weight below 0.5
  v = s.beta2 * v + s.one_minus_beta2 * d * d;
  float denom;
  if (Flags::amsgrad(s)) {
    vmax = nan_propagating_max(vmax, v);
    denom = sqrtf(vmax) / s.bias2_sqrt + s.eps;
  } else {
    denom = sqrtf(v) / s.bias2_sqrt + s.eps;
  }
  p = p - s.step_size * m / denom;
}

}  // namespace salun_ext
