// CPU kernels of the masked optimizer steps (schemas and reference: salun_ext/_ops.py, _reference.py; element math:
// optim_math.h). One pass over each tensor: per 32-element mask word, words without a salient bit are skipped
// entirely (no loads, no stores); otherwise all 32 updates are computed and every lane stores a select between its
// update and the value it loaded (as T, no float round trip), so a non-salient parameter entry and its state keep
// their exact bits. The optional terms of an update (momentum, weight decay, ...) are template flags and the store
// is a bitwise blend rather than a branch on the (random) mask bit: the loops are branch-free, which made them 2-3x
// faster on the 2-core CPU (benchmarks/RESULTS.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <optional>
#include <type_traits>
#include <vector>

#include "masked_optim_loops.h"
#include "salun_ext/cpu_isa.h"
#include "salun_ext/mask_layout.h"
#include "salun_ext/optim_checks.h"
#include "salun_ext/optim_math.h"

namespace salun_ext {
namespace {

using cpu_step::StepLoops;
using cpu_step::Work;

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per work item, a multiple of 32
constexpr int64_t kGrainElements = int64_t{1} << 15;  // elements per parallel task, at least (ATen's GRAIN_SIZE)

std::vector<Work> make_work(at::TensorList params) {
  std::vector<Work> work;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      work.push_back(Work{static_cast<int64_t>(i), b, std::min(n, b + kChunk), 0, 0});
    }
  }
  return work;
}

// The salient count of each tensor (its compact state's length) and, per work item, the prefix count of mask bits
// before it (w.packed), so every item updates its own packed range independently. One popcount per mask word.
std::vector<int64_t> count_packed(at::TensorList params, at::TensorList mask_words, std::vector<Work>& work) {
  std::vector<int64_t> counts(params.size(), 0);
  for (Work& w : work) {
    const int64_t i = w.tensor;
    w.packed = counts[i];
    if (mask_words[i].numel() == 0) {
      counts[i] += w.end - w.begin;
      w.packed_end = counts[i];
      continue;
    }
    const int32_t* words = mask_words[i].const_data_ptr<int32_t>();
    int64_t c = 0;
    for (int64_t base = w.begin; base < w.end; base += kBitsPerWord) {
      uint32_t bits = static_cast<uint32_t>(words[base / kBitsPerWord]);
      const int64_t n = std::min<int64_t>(kBitsPerWord, w.end - base);
      if (n < kBitsPerWord) bits &= (1u << n) - 1u;  // padding bits past numel never count
      c += std::popcount(bits);
    }
    counts[i] += c;
    w.packed_end = counts[i];
  }
  return counts;
}

float read_scalar(const std::optional<at::Tensor>& t) { return t->to(at::kCPU).to(at::kFloat).item<float>(); }

// A step count (one element): read in place when it is a CPU tensor of a common dtype (no dispatcher calls: at
// ~700 tensors, three ops per count cost more than the update itself), converted otherwise.
double read_step(const at::Tensor& t) {
  if (t.device().is_cpu()) {
    switch (t.scalar_type()) {
      case at::kFloat:
        return static_cast<double>(*t.const_data_ptr<float>());
      case at::kDouble:
        return *t.const_data_ptr<double>();
      case at::kLong:
        return static_cast<double>(*t.const_data_ptr<int64_t>());
      case at::kInt:
        return static_cast<double>(*t.const_data_ptr<int32_t>());
      default:
        break;
    }
  }
  return t.to(at::kCPU).to(at::kDouble).item<double>();
}

// Work items per parallel task: about kGrainElements elements each, so a list of many small tensors runs
// on one thread instead of waking the pool for a few microseconds of work (the split never changes a result).
int64_t work_grain(const std::vector<Work>& work) {
  int64_t elements = 0;
  for (const Work& w : work) elements += w.end - w.begin;
  const int64_t items = static_cast<int64_t>(work.size());
  if (elements <= 0) return std::max<int64_t>(items, 1);
  return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(items) * kGrainElements / elements));
}


bool step_skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && read_scalar(found_inf) != 0.0f;
}

// The loops, compiled for the baseline instruction set and, on x86-64 with GCC, again for AVX2 and AVX-512, each in
// its own translation unit (masked_optim_loops_*.cpp); picked at run time by what the CPU supports
// (SALUN_EXT_CPU_ISA=default|avx2|avx512 forces one, for tests).
StepLoops pick_loops() {
  const std::string want = forced_cpu_isa();
#ifdef SALUN_EXT_X86_VARIANTS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2");
  if ((want.empty() || want == "avx512") && avx512) return cpu_step::loops_avx512();
  if ((want.empty() || want == "avx2" || want == "avx512") && avx2) return cpu_step::loops_avx2();
#endif
  return cpu_step::loops_default();
}

const StepLoops& step_loops() {
  static const StepLoops loops = pick_loops();  // (the environment is read once, at the first step)
  return loops;
}

SgdScalars sgd_scalars(double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                       double weight_decay, bool nesterov, bool maximize, bool first_step,
                       const std::optional<at::Tensor>& grad_scale) {
  SgdScalars s{};
  s.lr = static_cast<float>(lr_tensor.has_value() ? static_cast<double>(read_scalar(lr_tensor)) : lr);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.weight_decay = static_cast<float>(weight_decay);
  s.has_grad_scale = grad_scale.has_value();
  s.grad_scale = s.has_grad_scale ? read_scalar(grad_scale) : 1.0f;
  s.has_momentum = momentum != 0.0;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.first_step = first_step;
  return s;
}

// masked_sgd_ (dense state) or masked_sgd_compact_ (packed momentum buffers): the same scalars and work split.
void masked_sgd_impl(bool compact, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = compact ? "masked_sgd_compact_" : "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  std::vector<Work> work;
  if (compact) {
    check_step_params(op, params, mask_words);
    work = make_work(params);
    const std::vector<int64_t> counts = count_packed(params, mask_words, work);
    check_sgd_compact_lists(op, params, grads, momentum_buffers, has_momentum, counts.data());
  } else {
    check_sgd_lists(op, params, grads, momentum_buffers, mask_words, has_momentum);
    work = make_work(params);
  }
  if (params.empty() || step_skipped(found_inf)) return;
  const SgdScalars s =
      sgd_scalars(lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, first_step, grad_scale);
  const StepLoops& loops = step_loops();
  const auto loop = compact ? loops.sgd_compact : loops.sgd;
  at::parallel_for(0, static_cast<int64_t>(work.size()), work_grain(work), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Work& w = work[k];
      const at::Tensor& p = params[w.tensor];
      const int32_t* words = mask_words[w.tensor].numel() ? mask_words[w.tensor].data_ptr<int32_t>() : nullptr;
      loop(p.scalar_type(), w, p.data_ptr(), grads[w.tensor].data_ptr(),
           has_momentum ? momentum_buffers[w.tensor].data_ptr() : nullptr, words, s);
    }
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  masked_sgd_impl(false, params, grads, momentum_buffers, mask_words, lr, lr_tensor, momentum, dampening,
                  weight_decay, nesterov, maximize, first_step, grad_scale, found_inf);
}

void masked_sgd_compact_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor,
                            double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                            bool first_step, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  masked_sgd_impl(true, params, grads, momentum_buffers, mask_words, lr, lr_tensor, momentum, dampening,
                  weight_decay, nesterov, maximize, first_step, grad_scale, found_inf);
}

// Per-tensor scalars (the step count may differ between tensors), derived in double as the reference does.
std::vector<AdamScalars> adam_scalars(at::TensorList state_steps, double lr,
                                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
                                      double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                                      bool maximize, const std::optional<at::Tensor>& grad_scale) {
  const double lr_value = lr_tensor.has_value() ? static_cast<double>(read_scalar(lr_tensor)) : lr;
  const bool has_grad_scale = grad_scale.has_value();
  const float grad_scale_value = has_grad_scale ? read_scalar(grad_scale) : 1.0f;
  std::vector<AdamScalars> scalars(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const double step = read_step(state_steps[i]);
    AdamScalars& s = scalars[i];
    s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    s.beta2 = static_cast<float>(beta2);
    s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    s.eps = static_cast<float>(eps);
    s.weight_decay = static_cast<float>(weight_decay);
    s.decay_factor = static_cast<float>(1.0 - lr_value * weight_decay);
    s.step_size = static_cast<float>(lr_value / (1.0 - std::pow(beta1, step)));
    s.bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
    s.has_grad_scale = has_grad_scale;
    s.grad_scale = grad_scale_value;
    s.decoupled_weight_decay = decoupled_weight_decay;
    s.amsgrad = amsgrad;
    s.maximize = maximize;
  }
  return scalars;
}

// masked_adam_ (dense state) or masked_adam_compact_ (packed moments): the same scalars and work split.
void masked_adam_impl(bool compact, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                      at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                      double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                      bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const char* op = compact ? "masked_adam_compact_" : "masked_adam_";
  std::vector<Work> work;
  if (compact) {
    check_step_params(op, params, mask_words);
    work = make_work(params);
    const std::vector<int64_t> counts = count_packed(params, mask_words, work);
    check_adam_compact_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                             counts.data());
  } else {
    check_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad);
    work = make_work(params);
  }
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].numel() == 1, "salun_ext: ", op, ": state_steps[", i, "] must hold one value");
  }
  if (params.empty() || step_skipped(found_inf)) return;
  const std::vector<AdamScalars> scalars = adam_scalars(state_steps, lr, lr_tensor, beta1, beta2, eps, weight_decay,
                                                        decoupled_weight_decay, amsgrad, maximize, grad_scale);
  const StepLoops& loops = step_loops();
  const auto loop = compact ? loops.adam_compact : loops.adam;
  at::parallel_for(0, static_cast<int64_t>(work.size()), work_grain(work), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Work& w = work[k];
      const int64_t i = w.tensor;
      const at::Tensor& p = params[i];
      const int32_t* words = mask_words[i].numel() ? mask_words[i].data_ptr<int32_t>() : nullptr;
      loop(p.scalar_type(), w, p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
           amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, words, scalars[i]);
    }
  });
}

void masked_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::TensorList mask_words, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  masked_adam_impl(false, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale,
                   found_inf);
}

void masked_adam_compact_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor,
                             double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                             bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  masked_adam_impl(true, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale,
                   found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(salun_ext, CPU, m) {
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("masked_adam_", &masked_adam_cpu);
  m.impl("masked_sgd_compact_", &masked_sgd_compact_cpu);
  m.impl("masked_adam_compact_", &masked_adam_compact_cpu);
}

}  // namespace salun_ext
