// CUDA kernels of the masked optimizer steps (schemas and reference: salun_ext/_ops.py, _reference.py; element math
// shared with the CPU kernels: optim_math.h; CPU twin: csrc/cpu/masked_optim.cpp).
//
// Multi-tensor apply (after apex's multi_tensor_apply): every tensor list of one call is one table of per-tensor
// pointers (param, grad, up to three state tensors, mask words, step count) walked in 64Ki-element chunks by a
// persistent grid. Each thread updates 4 consecutive elements with one 4-bit nibble of a mask word: a nibble of
// zeros costs no load and no store, so non-salient entries and their state are never touched, and all-zero
// stretches of a mask cost only the mask read. fp32 math for fp32/bf16/fp16 parameters. lr, grad_scale and
// found_inf may live on the device (read in the kernel: no host sync, capturable); the table of a given tensor list
// is uploaded once and cached by content, so a CUDA graph captured after a warm-up step replays without uploads.
// All work runs on the current stream; every launch is checked.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "multi_tensor.cuh"
#include "salun_ext/mask_layout.h"
#include "salun_ext/optim_checks.h"
#include "salun_ext/optim_math.h"

namespace salun_ext {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int kElemsPerThread = 4;

struct OptimTensor {
  void* p;
  const void* g;
  void* s0;  // SGD: momentum buffer; Adam: exp_avg
  void* s1;  // Adam: exp_avg_sq
  void* s2;  // Adam: max_exp_avg_sq (amsgrad)
  const uint32_t* words;  // nullptr: every entry salient
  const float* step;      // Adam: the step count (already incremented), on the device
  int64_t numel;
  int64_t chunk_begin;
  int32_t dtype;      // 0 fp32, 1 bf16, 2 fp16 (KeyDtype codes)
  int32_t vector_ok;  // every pointer aligned for 4-element vector access
};

// ----------------------------------------------------------------------------------------- table upload + cache

struct TableCache {
  std::mutex mutex;
  std::list<std::pair<std::string, at::Tensor>> entries;  // most recent first
  static constexpr size_t kCapacity = 32;
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

// The device copy of a table, uploaded once per distinct content (pointers, sizes, dtypes) and device.
at::Tensor device_table(const std::vector<OptimTensor>& table, const c10::Device& device) {
  std::string key(reinterpret_cast<const char*>(table.data()), table.size() * sizeof(OptimTensor));
  key += std::to_string(device.index());
  TableCache& cache = table_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
    if (it->first == key) {
      cache.entries.splice(cache.entries.begin(), cache.entries, it);
      return it->second;
    }
  }
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(OptimTensor));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  cache.entries.emplace_front(std::move(key), dev);
  if (cache.entries.size() > TableCache::kCapacity) cache.entries.pop_back();
  return dev;
}

int32_t dtype_code(const at::Tensor& t) { return static_cast<int32_t>(key_dtype_of(t)); }

bool aligned(const void* ptr, size_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

std::vector<OptimTensor> build_table(at::TensorList params, at::TensorList grads, at::TensorList s0,
                                     at::TensorList s1, at::TensorList s2, at::TensorList words,
                                     at::TensorList steps, int64_t* total_chunks) {
  std::vector<OptimTensor> table;
  int64_t chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    OptimTensor t{};
    t.p = params[i].data_ptr();
    t.g = grads[i].data_ptr();
    t.s0 = s0.empty() ? nullptr : s0[i].data_ptr();
    t.s1 = s1.empty() ? nullptr : s1[i].data_ptr();
    t.s2 = s2.empty() ? nullptr : s2[i].data_ptr();
    t.words = words[i].numel() ? reinterpret_cast<const uint32_t*>(words[i].data_ptr<int32_t>()) : nullptr;
    t.step = steps.empty() ? nullptr : steps[i].data_ptr<float>();
    t.numel = n;
    t.chunk_begin = chunks;
    t.dtype = dtype_code(params[i]);
    const size_t vec_bytes = kElemsPerThread * params[i].element_size();
    t.vector_ok = aligned(t.p, vec_bytes) && aligned(t.g, vec_bytes) && aligned(t.s0, vec_bytes) &&
                  aligned(t.s1, vec_bytes) && aligned(t.s2, vec_bytes);
    table.push_back(t);
    chunks += (n + kChunk - 1) / kChunk;
  }
  *total_chunks = chunks;
  return table;
}

__device__ __forceinline__ int find_optim_tensor(const OptimTensor* tensors, int n, int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tensors[mid].chunk_begin <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ----------------------------------------------------------------------------------------- 4-element access

template <typename T>
struct alignas(kElemsPerThread * sizeof(T)) Vec4 {
  T v[kElemsPerThread];
};

template <typename T>
__device__ __forceinline__ void load4(const void* base, int64_t i, int64_t n, bool vec, float (&out)[4]) {
  const T* ptr = static_cast<const T*>(base);
  if (vec && i + kElemsPerThread <= n) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(ptr + i);
#pragma unroll
    for (int j = 0; j < kElemsPerThread; ++j) out[j] = static_cast<float>(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kElemsPerThread; ++j) out[j] = i + j < n ? static_cast<float>(ptr[i + j]) : 0.0f;
  }
}

// Stores lane j only where bit j of `bits` is set: non-salient entries are never written.
template <typename T>
__device__ __forceinline__ void store4(void* base, int64_t i, uint32_t bits, bool vec, const float (&in)[4]) {
  T* ptr = static_cast<T*>(base);
  if (vec && bits == 0xFu) {
    Vec4<T> x;
#pragma unroll
    for (int j = 0; j < kElemsPerThread; ++j) x.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Vec4<T>*>(ptr + i) = x;
  } else {
#pragma unroll
    for (int j = 0; j < kElemsPerThread; ++j) {
      if ((bits >> j) & 1u) ptr[i + j] = static_cast<T>(in[j]);
    }
  }
}

template <typename Fn>
__device__ __forceinline__ void dispatch_param_type(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case 0:
      fn(float{});
      break;
    case 1:
      fn(c10::BFloat16{});
      break;
    default:
      fn(c10::Half{});
      break;
  }
}

// Salient bits of elements [i, i + 4) (i is a multiple of 4 and chunks start on word boundaries).
__device__ __forceinline__ uint32_t salient_nibble(const OptimTensor& t, int64_t i) {
  uint32_t bits = t.words ? (t.words[i >> 5] >> static_cast<uint32_t>(i & 31)) & 0xFu : 0xFu;
  const int64_t left = t.numel - i;
  if (left < kElemsPerThread) bits &= (1u << left) - 1u;
  return bits;
}

struct DeviceScalars {
  const float* lr;  // overrides the host lr when not null
  const float* grad_scale;
  const float* found_inf;
};

__global__ void __launch_bounds__(kThreads) masked_sgd_kernel(const OptimTensor* __restrict__ tensors, int n_tensors,
                                                               int64_t total_chunks, SgdScalars s, DeviceScalars dev) {
  if (dev.found_inf != nullptr && *dev.found_inf != 0.0f) return;
  if (dev.lr != nullptr) s.lr = *dev.lr;
  if (dev.grad_scale != nullptr) s.grad_scale = *dev.grad_scale;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const OptimTensor t = tensors[find_optim_tensor(tensors, n_tensors, chunk)];
    const int64_t begin = (chunk - t.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
    dispatch_param_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kElemsPerThread; i < end;
           i += static_cast<int64_t>(blockDim.x) * kElemsPerThread) {
        const uint32_t bits = salient_nibble(t, i);
        if (bits == 0) continue;
        float p[4], g[4], b[4] = {0.f, 0.f, 0.f, 0.f};
        load4<T>(t.p, i, t.numel, t.vector_ok, p);
        load4<T>(t.g, i, t.numel, t.vector_ok, g);
        if (s.has_momentum && !s.first_step) load4<T>(t.s0, i, t.numel, t.vector_ok, b);
#pragma unroll
        for (int j = 0; j < kElemsPerThread; ++j) sgd_element(p[j], g[j], b[j], s);
        store4<T>(t.p, i, bits, t.vector_ok, p);
        if (s.has_momentum) store4<T>(t.s0, i, bits, t.vector_ok, b);
      }
    });
  }
}

struct AdamHost {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
};

__global__ void __launch_bounds__(kThreads) masked_adam_kernel(const OptimTensor* __restrict__ tensors, int n_tensors,
                                                                int64_t total_chunks, AdamScalars base, AdamHost h,
                                                                DeviceScalars dev) {
  if (dev.found_inf != nullptr && *dev.found_inf != 0.0f) return;
  // the same double-precision derivations as the host (reference and CPU kernel), from device-resident values
  const double lr = dev.lr != nullptr ? static_cast<double>(*dev.lr) : h.lr;
  if (dev.grad_scale != nullptr) base.grad_scale = *dev.grad_scale;
  base.decay_factor = static_cast<float>(1.0 - lr * h.weight_decay);
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const OptimTensor t = tensors[find_optim_tensor(tensors, n_tensors, chunk)];
    const int64_t begin = (chunk - t.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
    AdamScalars s = base;
    const double step = static_cast<double>(*t.step);
    s.step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, step)));
    s.bias2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
    dispatch_param_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kElemsPerThread; i < end;
           i += static_cast<int64_t>(blockDim.x) * kElemsPerThread) {
        const uint32_t bits = salient_nibble(t, i);
        if (bits == 0) continue;
        float p[4], g[4], m[4], v[4], x[4] = {0.f, 0.f, 0.f, 0.f};
        load4<T>(t.p, i, t.numel, t.vector_ok, p);
        load4<T>(t.g, i, t.numel, t.vector_ok, g);
        load4<T>(t.s0, i, t.numel, t.vector_ok, m);
        load4<T>(t.s1, i, t.numel, t.vector_ok, v);
        if (s.amsgrad) load4<T>(t.s2, i, t.numel, t.vector_ok, x);
#pragma unroll
        for (int j = 0; j < kElemsPerThread; ++j) adam_element(p[j], g[j], m[j], v[j], x[j], s);
        store4<T>(t.p, i, bits, t.vector_ok, p);
        store4<T>(t.s0, i, bits, t.vector_ok, m);
        store4<T>(t.s1, i, bits, t.vector_ok, v);
        if (s.amsgrad) store4<T>(t.s2, i, bits, t.vector_ok, x);
      }
    });
  }
}

// ----------------------------------------------------------------------------------------- launchers

std::optional<at::Tensor> as_device_float(const std::optional<at::Tensor>& t, const c10::Device& device) {
  if (!t.has_value()) return std::nullopt;
  if (t->device() == device && t->scalar_type() == at::kFloat) return t;
  return t->to(device, at::kFloat, /*non_blocking=*/true);
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// lr / grad_scale / found_inf as float32 tensors on the parameters' device (checked first; kept alive here until
// the launch) and the pointers the kernels read. Call under the device's CUDAGuard.
struct DeviceScalarTensors {
  std::optional<at::Tensor> lr, grad_scale, found_inf;

  DeviceScalarTensors(const char* op, const c10::Device& device, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& grad_scale_tensor,
                      const std::optional<at::Tensor>& found_inf_tensor) {
    check_scalar_tensor(op, "lr_tensor", lr_tensor, device);
    check_scalar_tensor(op, "grad_scale", grad_scale_tensor, device);
    check_scalar_tensor(op, "found_inf", found_inf_tensor, device);
    lr = as_device_float(lr_tensor, device);
    grad_scale = as_device_float(grad_scale_tensor, device);
    found_inf = as_device_float(found_inf_tensor, device);
  }

  DeviceScalars pointers() const {
    return DeviceScalars{ptr_or_null(lr), ptr_or_null(grad_scale), ptr_or_null(found_inf)};
  }
};

int optim_grid(const void* kernel, const c10::Device& device, int64_t total_chunks) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessor_count(device.index());
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, total_chunks)));
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  check_sgd_lists(op, params, grads, momentum_buffers, mask_words, has_momentum);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalarTensors scalars_dev(op, device, lr_tensor, grad_scale, found_inf);

  SgdScalars s{};
  s.lr = static_cast<float>(lr);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.weight_decay = static_cast<float>(weight_decay);
  s.grad_scale = 1.0f;
  s.has_grad_scale = grad_scale.has_value();
  s.has_momentum = has_momentum;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.first_step = first_step;

  int64_t total_chunks = 0;
  const at::TensorList none;
  const std::vector<OptimTensor> table = build_table(params, grads, has_momentum ? momentum_buffers : none, none, none,
                                                     mask_words, none, &total_chunks);
  if (total_chunks == 0) return;
  const at::Tensor dev_table = device_table(table, device);
  const int grid = optim_grid(reinterpret_cast<const void*>(&masked_sgd_kernel), device, total_chunks);
  masked_sgd_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const OptimTensor*>(dev_table.data_ptr()), static_cast<int>(table.size()), total_chunks, s,
      scalars_dev.pointers());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::TensorList mask_words, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "masked_adam_";
  check_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad);
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].scalar_type() == at::kFloat, "salun_ext: ", op,
                ": state_steps[", i, "] must be one float32 value on ", params[i].device());
  }
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalarTensors scalars_dev(op, device, lr_tensor, grad_scale, found_inf);

  AdamScalars s{};
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.grad_scale = 1.0f;
  s.has_grad_scale = grad_scale.has_value();
  s.decoupled_weight_decay = decoupled_weight_decay;
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  const AdamHost h{lr, beta1, beta2, weight_decay};

  int64_t total_chunks = 0;
  const at::TensorList none;
  const std::vector<OptimTensor> table = build_table(params, grads, exp_avgs, exp_avg_sqs,
                                                     amsgrad ? max_exp_avg_sqs : none, mask_words, state_steps,
                                                     &total_chunks);
  if (total_chunks == 0) return;
  const at::Tensor dev_table = device_table(table, device);
  const int grid = optim_grid(reinterpret_cast<const void*>(&masked_adam_kernel), device, total_chunks);
  masked_adam_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const OptimTensor*>(dev_table.data_ptr()), static_cast<int>(table.size()), total_chunks, s, h,
      scalars_dev.pointers());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(salun_ext, CUDA, m) {
  m.impl("masked_sgd_", &cuda::masked_sgd_cuda);
  m.impl("masked_adam_", &cuda::masked_adam_cuda);
}

}  // namespace salun_ext
