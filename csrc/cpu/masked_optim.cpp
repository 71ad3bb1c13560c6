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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "salun_ext/mask_layout.h"
#include "salun_ext/optim_checks.h"
#include "salun_ext/optim_math.h"

namespace salun_ext {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per work item, a multiple of 32
constexpr int64_t kGrainElements = int64_t{1} << 15;  // elements per parallel task, at least (ATen's GRAIN_SIZE)

struct Work {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Work> make_work(at::TensorList params) {
  std::vector<Work> work;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) work.push_back(Work{static_cast<int64_t>(i), b, std::min(n, b + kChunk)});
  }
  return work;
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

// Calls fn(T{}) with the element type of a parameter dtype (float32, bfloat16 or float16; checked before).
template <typename Fn>
void dispatch_param_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "salun_ext: unsupported parameter dtype ", dtype);
  }
}

bool step_skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && read_scalar(found_inf) != 0.0f;
}

// Calls fn(bits, base, n) for every mask word of [begin, end) that has a salient bit (bits = all ones when the
// tensor has no mask words, i.e. every entry is salient).
template <typename Fn>
void for_each_salient_word(const int32_t* words, int64_t begin, int64_t end, Fn&& fn) {
  for (int64_t base = begin; base < end; base += kBitsPerWord) {
    const int64_t n = std::min<int64_t>(kBitsPerWord, end - base);
    uint32_t bits = words ? static_cast<uint32_t>(words[base / kBitsPerWord]) : 0xFFFFFFFFu;
    if (n < kBitsPerWord) bits &= (1u << n) - 1u;
    if (bits != 0) fn(bits, base, n);
  }
}

// fn(std::true_type{}) or fn(std::false_type{}): turns a runtime flag into a compile-time one.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// salient ? updated : old, as a bitwise blend: a branch on a random mask bit mispredicts on half the lanes at density
// 0.5, and the blend keeps old's exact bits (no float round trip).
template <typename T>
inline T select_lane(bool salient, T updated, T old) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(T) == sizeof(Bits), "fp32, bf16 or fp16 lanes");
  Bits u, o;
  std::memcpy(&u, &updated, sizeof(T));
  std::memcpy(&o, &old, sizeof(T));
  const Bits keep_new = static_cast<Bits>(Bits{0} - static_cast<Bits>(salient));
  const Bits r = static_cast<Bits>((u & keep_new) | (o & static_cast<Bits>(~keep_new)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

template <typename T, typename Flags>
void sgd_tensor(const Work& w, T* p, const T* g, T* buf, const int32_t* words, const SgdScalars& s) {
  constexpr bool kMomentum = Flags::momentum(SgdScalars{});
  for_each_salient_word(words, w.begin, w.end, [&](uint32_t bits, int64_t base, int64_t n) {
    float np[kBitsPerWord], nb[kBitsPerWord];
    for (int64_t j = 0; j < n; ++j) {
      np[j] = static_cast<float>(p[base + j]);
      nb[j] = kMomentum ? static_cast<float>(buf[base + j]) : 0.0f;
      sgd_element<Flags>(np[j], static_cast<float>(g[base + j]), nb[j], s);
    }
    for (int64_t j = 0; j < n; ++j) {
      const bool salient = (bits >> j) & 1u;
      const T old_p = p[base + j];
      p[base + j] = select_lane(salient, static_cast<T>(np[j]), old_p);
      if constexpr (kMomentum) buf[base + j] = select_lane(salient, static_cast<T>(nb[j]), buf[base + j]);
    }
  });
}

// fn(SgdStaticFlags<...>{}) for the update's flags.
template <typename Fn>
void with_sgd_flags(const SgdScalars& s, Fn&& fn) {
  with_flag(s.has_grad_scale, [&](auto scale) {
    with_flag(s.maximize, [&](auto maximize) {
      with_flag(s.weight_decay != 0.0f, [&](auto decay) {
        with_flag(s.has_momentum, [&](auto momentum) {
          with_flag(s.has_momentum && s.nesterov, [&](auto nesterov) {
            with_flag(s.has_momentum && s.first_step, [&](auto first) {
              fn(SgdStaticFlags<scale.value, maximize.value, decay.value, momentum.value, nesterov.value,
                                first.value>{});
            });
          });
        });
      });
    });
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  check_sgd_lists(op, params, grads, momentum_buffers, mask_words, has_momentum);
  if (params.empty() || step_skipped(found_inf)) return;
  SgdScalars s{};
  s.lr = static_cast<float>(lr_tensor.has_value() ? static_cast<double>(read_scalar(lr_tensor)) : lr);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.weight_decay = static_cast<float>(weight_decay);
  s.has_grad_scale = grad_scale.has_value();
  s.grad_scale = s.has_grad_scale ? read_scalar(grad_scale) : 1.0f;
  s.has_momentum = has_momentum;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.first_step = first_step;

  const std::vector<Work> work = make_work(params);
  at::parallel_for(0, static_cast<int64_t>(work.size()), work_grain(work), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Work& w = work[k];
      const at::Tensor& p = params[w.tensor];
      const int32_t* words = mask_words[w.tensor].numel() ? mask_words[w.tensor].data_ptr<int32_t>() : nullptr;
      dispatch_param_dtype(p.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        with_sgd_flags(s, [&](auto flags) {
          sgd_tensor<scalar_t, decltype(flags)>(
              w, p.data_ptr<scalar_t>(), grads[w.tensor].data_ptr<scalar_t>(),
              has_momentum ? momentum_buffers[w.tensor].data_ptr<scalar_t>() : nullptr, words, s);
        });
      });
    }
  });
}

template <typename T, typename Flags>
void adam_tensor(const Work& w, T* p, const T* g, T* m, T* v, T* vmax, const int32_t* words, const AdamScalars& s) {
  constexpr bool kAmsgrad = Flags::amsgrad(AdamScalars{});
  for_each_salient_word(words, w.begin, w.end, [&](uint32_t bits, int64_t base, int64_t n) {
    float np[kBitsPerWord], nm[kBitsPerWord], nv[kBitsPerWord], nx[kBitsPerWord];
    for (int64_t j = 0; j < n; ++j) {
      np[j] = static_cast<float>(p[base + j]);
      nm[j] = static_cast<float>(m[base + j]);
      nv[j] = static_cast<float>(v[base + j]);
      nx[j] = kAmsgrad ? static_cast<float>(vmax[base + j]) : 0.0f;
      adam_element<Flags>(np[j], static_cast<float>(g[base + j]), nm[j], nv[j], nx[j], s);
    }
    for (int64_t j = 0; j < n; ++j) {
      const bool salient = (bits >> j) & 1u;
      const T old_p = p[base + j], old_m = m[base + j], old_v = v[base + j];
      p[base + j] = select_lane(salient, static_cast<T>(np[j]), old_p);
      m[base + j] = select_lane(salient, static_cast<T>(nm[j]), old_m);
      v[base + j] = select_lane(salient, static_cast<T>(nv[j]), old_v);
      if constexpr (kAmsgrad) vmax[base + j] = select_lane(salient, static_cast<T>(nx[j]), vmax[base + j]);
    }
  });
}

// fn(AdamStaticFlags<...>{}) for the update's flags.
template <typename Fn>
void with_adam_flags(const AdamScalars& s, Fn&& fn) {
  with_flag(s.has_grad_scale, [&](auto scale) {
    with_flag(s.maximize, [&](auto maximize) {
      with_flag(s.weight_decay != 0.0f, [&](auto decay) {
        with_flag(s.decoupled_weight_decay, [&](auto decoupled) {
          with_flag(s.amsgrad, [&](auto amsgrad) {
            fn(AdamStaticFlags<scale.value, maximize.value, decay.value, decoupled.value, amsgrad.value>{});
          });
        });
      });
    });
  });
}

void masked_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::TensorList mask_words, double lr,
                     const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_adam_";
  check_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad);
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].numel() == 1, "salun_ext: ", op, ": state_steps[", i, "] must hold one value");
  }
  if (params.empty() || step_skipped(found_inf)) return;
  const double lr_value = lr_tensor.has_value() ? static_cast<double>(read_scalar(lr_tensor)) : lr;
  const bool has_grad_scale = grad_scale.has_value();
  const float grad_scale_value = has_grad_scale ? read_scalar(grad_scale) : 1.0f;

  // Per-tensor scalars (the step count may differ between tensors), derived in double as the reference does.
  std::vector<AdamScalars> scalars(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
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

  const std::vector<Work> work = make_work(params);
  at::parallel_for(0, static_cast<int64_t>(work.size()), work_grain(work), [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Work& w = work[k];
      const int64_t i = w.tensor;
      const at::Tensor& p = params[i];
      const int32_t* words = mask_words[i].numel() ? mask_words[i].data_ptr<int32_t>() : nullptr;
      dispatch_param_dtype(p.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        with_adam_flags(scalars[i], [&](auto flags) {
          adam_tensor<scalar_t, decltype(flags)>(
              w, p.data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(), exp_avgs[i].data_ptr<scalar_t>(),
              exp_avg_sqs[i].data_ptr<scalar_t>(), amsgrad ? max_exp_avg_sqs[i].data_ptr<scalar_t>() : nullptr,
              words, scalars[i]);
        });
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(salun_ext, CPU, m) {
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("masked_adam_", &masked_adam_cpu);
}

}  // namespace salun_ext
