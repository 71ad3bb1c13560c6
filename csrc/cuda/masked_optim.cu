// CUDA kernels of the masked optimizer steps (schemas and reference: salun_ext/_ops.py, _reference.py; element math
// shared with the CPU kernels: optim_math.h; CPU twin: csrc/cpu/masked_optim.cpp).
//
// Multi-tensor apply (after apex's multi_tensor_apply): every tensor list of one call is one table of per-tensor
// pointers (param, grad, up to three state tensors, mask words, step count) walked in 64Ki-element chunks by a
// persistent grid. Each thread updates 4 consecutive elements with one 4-bit nibble of a mask word: a nibble of
// zeros costs no load and no store, so non-salient entries and their state are never touched, and all-zero
// stretches of a mask cost only the mask read. fp32 math for fp32/bf16/fp16 parameters. lr, grad_scale and
// found_inf may live on the device (read in the kernel: no host sync, capturable) or on the CPU (read on the host,
// never copied; refused inside a capture); the table of a given tensor list is uploaded once and cached by content
// (stream-safe, see the cache below), so a CUDA graph captured after a warm-up step replays without uploads.
// All work runs on the current stream; every launch is checked.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
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
  int64_t state_numel;  // compact steps: the length of the packed state (entries past it are never touched)
  int64_t chunk_begin;
  int32_t dtype;      // 0 fp32, 1 bf16, 2 fp16 (KeyDtype codes)
  int32_t vector_ok;  // every pointer aligned for 4-element vector access
};

// ----------------------------------------------------------------------------------------- table upload + cache
//
// A cached table is read by kernels on whatever stream is current at each step, and by every replay of a CUDA graph
// that captured a step. So each entry keeps the event recorded after its upload and the stream it was uploaded on
// (allocated on): a step on another stream waits for that event and records the table's use on its stream (the
// caching allocator then keeps the memory until that stream's work is done, should the entry be evicted); a step
// inside a capture waits for it as an external event of the graph and marks the entry as held by a graph, which
// is never evicted (the graph keeps reading its address; a table is a few bytes per tensor). A miss inside a
// capture is refused: the upload would be captured as a copy from a temporary host buffer.

struct TableEntry {
  std::string key;
  at::Tensor table;
  cudaEvent_t uploaded = nullptr;  // recorded on `stream` right after the upload
  cudaStream_t stream = nullptr;
  bool held_by_graph = false;
};

struct TableCache {
  std::mutex mutex;
  std::list<TableEntry> entries;  // most recent first
  static constexpr size_t kCapacity = 32;  // entries no graph holds
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

// The entry's table, ready for use on `stream` (see above).
at::Tensor use_cached_table(TableEntry& entry, const c10::cuda::CUDAStream& stream, bool capturing) {
  if (capturing) {
    entry.held_by_graph = true;
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), entry.uploaded, cudaEventWaitExternal));
  } else if (entry.stream != stream.stream()) {
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), entry.uploaded, 0));
    entry.table.record_stream(stream.unwrap());
  }
  return entry.table;
}

// Drops the least recently used entries no graph holds while more than kCapacity of them are cached.
void evict(TableCache& cache) {
  size_t free_entries = 0;
  for (const TableEntry& e : cache.entries) free_entries += e.held_by_graph ? 0 : 1;
  for (auto it = cache.entries.end(); free_entries > TableCache::kCapacity && it != cache.entries.begin();) {
    --it;
    if (it->held_by_graph) continue;
    // (the event may still be pending: cudaEventDestroy then releases it once it completes)
    C10_CUDA_CHECK(cudaEventDestroy(it->uploaded));
    it = cache.entries.erase(it);
    --free_entries;
  }
}

// The device copy of a table, uploaded once per distinct content (pointers, sizes, dtypes) and device.
at::Tensor device_table(const char* op, const std::vector<OptimTensor>& table, const c10::Device& device) {
  std::string key(reinterpret_cast<const char*>(table.data()), table.size() * sizeof(OptimTensor));
  key += std::to_string(device.index());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  const bool capturing = stream_is_capturing(stream.stream());
  TableCache& cache = table_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
    if (it->key == key) {
      cache.entries.splice(cache.entries.begin(), cache.entries, it);
      return use_cached_table(cache.entries.front(), stream, capturing);
    }
  }
  TORCH_CHECK(!capturing, "salun_ext: ", op, ": these tensors were never stepped outside the CUDA graph being "
              "captured, so their kernel table would be uploaded inside the capture (a copy from a temporary host "
              "buffer that every replay would repeat); run one step with the same parameters, gradients and state "
              "tensors before capturing (the warm-up torch.cuda.graph asks for), and keep the gradients in place "
              "(zero_grad(set_to_none=False))");
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(OptimTensor));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  TableEntry entry;
  entry.key = std::move(key);
  entry.table = host.to(device, /*non_blocking=*/true);
  entry.stream = stream.stream();
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&entry.uploaded, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(entry.uploaded, stream.stream()));
  cache.entries.push_front(std::move(entry));
  at::Tensor dev = cache.entries.front().table;
  evict(cache);
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
    t.state_numel = s0.empty() ? n : s0[i].numel();
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

// The tensor of a chunk of the flat element space, and the chunk's element range [begin, end) inside it (a struct,
// not a tuple: the kernels' lambdas capture its fields, and C++17 lambdas cannot capture structured bindings).
struct ChunkSpan {
  OptimTensor t;
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ ChunkSpan chunk_span(const OptimTensor* tensors, int n, int64_t chunk) {
  const OptimTensor t = tensors[find_optim_tensor(tensors, n, chunk)];
  const int64_t begin = (chunk - t.chunk_begin) * kChunk;
  return ChunkSpan{t, begin, begin + kChunk < t.numel ? begin + kChunk : t.numel};
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

// Whether a GradScaler found an Inf or NaN in this step's gradients: the step is skipped on the device.
__device__ __forceinline__ bool step_skipped(const DeviceScalars& dev) {
  return dev.found_inf != nullptr && *dev.found_inf != 0.0f;
}

// The device-resident lr and grad_scale, where given, over the host's.
__device__ __forceinline__ void sgd_step_scalars(SgdScalars& s, const DeviceScalars& dev) {
  if (dev.lr != nullptr) s.lr = *dev.lr;
  if (dev.grad_scale != nullptr) s.grad_scale = *dev.grad_scale;
}

__global__ void __launch_bounds__(kThreads) masked_sgd_kernel(const OptimTensor* __restrict__ tensors, int n_tensors,
                                                               int64_t total_chunks, SgdScalars s, DeviceScalars dev) {
  if (step_skipped(dev)) return;
  sgd_step_scalars(s, dev);
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(tensors, n_tensors, chunk);
    const OptimTensor& t = span.t;
    const int64_t begin = span.begin, end = span.end;
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

// The scalars of one Adam step that do not depend on the tensor, derived in double precision from the
// device-resident values (lr_tensor, grad_scale) exactly as the host (reference and CPU kernel) derives them;
// returns the step's lr. Shared by the dense and compact kernels.
__device__ __forceinline__ double adam_step_scalars(AdamScalars& base, const AdamHost& h, const DeviceScalars& dev) {
  const double lr = dev.lr != nullptr ? static_cast<double>(*dev.lr) : h.lr;
  if (dev.grad_scale != nullptr) base.grad_scale = *dev.grad_scale;
  base.decay_factor = static_cast<float>(1.0 - lr * h.weight_decay);
  return lr;
}

// `base` with the bias corrections of a tensor at step `step_count` (as the host derives them).
__device__ __forceinline__ AdamScalars adam_tensor_scalars(AdamScalars base, const AdamHost& h, double lr,
                                                           float step_count) {
  const double step = static_cast<double>(step_count);
  base.step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, step)));
  base.bias2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
  return base;
}

__global__ void __launch_bounds__(kThreads) masked_adam_kernel(const OptimTensor* __restrict__ tensors, int n_tensors,
                                                                int64_t total_chunks, AdamScalars base, AdamHost h,
                                                                DeviceScalars dev) {
  if (step_skipped(dev)) return;
  const double lr = adam_step_scalars(base, h, dev);
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(tensors, n_tensors, chunk);
    const OptimTensor& t = span.t;
    const int64_t begin = span.begin, end = span.end;
    const AdamScalars s = adam_tensor_scalars(base, h, lr, *t.step);
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

// ----------------------------------------------------------------------------------------- compact state
// The state of a compact step holds only the salient entries, packed in flat element order. A first kernel counts
// the mask bits of every chunk; a cumulative sum gives each chunk its packed start (the count of its tensor's
// earlier chunks), so blocks stay independent. Inside a chunk a block walks passes of blockDim * 4 elements; a
// block-wide exclusive scan of the threads' nibble popcounts gives each salient lane its packed index. The element
// math is the dense kernel's; non-salient entries (and packed entries past the state's length) are never written.

// Exclusive prefix sum of x over the block; *total: the block's sum. Every thread of the block must call it.
__device__ __forceinline__ int block_exclusive_scan(int x, int* warp_sums, int* total) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>(blockDim.x >> 5);
  int incl = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + incl - x;
}

__global__ void __launch_bounds__(kThreads) chunk_popcount_kernel(const OptimTensor* __restrict__ tensors,
                                                                   int n_tensors, int64_t total_chunks,
                                                                   int64_t* __restrict__ counts) {
  __shared__ int warp_sums[32];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(tensors, n_tensors, chunk);
    const OptimTensor& t = span.t;
    const int64_t begin = span.begin, end = span.end;
    int c = 0;
    if (t.words == nullptr) {
      c = threadIdx.x == 0 ? static_cast<int>(end - begin) : 0;
    } else {
      for (int64_t w = begin / 32 + threadIdx.x; w * 32 < end; w += blockDim.x) {
        uint32_t bits = t.words[w];
        const int64_t left = end - w * 32;
        if (left < 32) bits &= (1u << left) - 1u;
        c += __popc(bits);
      }
    }
    int total = 0;
    block_exclusive_scan(c, warp_sums, &total);
    if (threadIdx.x == 0) counts[chunk] = total;
  }
}

// The packed index of a chunk's first salient entry within its tensor (counts: per chunk; incl: their running sum).
__device__ __forceinline__ int64_t chunk_packed_start(const int64_t* counts, const int64_t* incl, int64_t chunk,
                                                      int64_t first_chunk) {
  return (incl[chunk] - counts[chunk]) - (incl[first_chunk] - counts[first_chunk]);
}

// The packed indices of the salient lanes of a nibble (lanes past the state's length are dropped from `bits`).
__device__ __forceinline__ uint32_t packed_lanes(uint32_t bits, int64_t first, int64_t state_numel,
                                                 int64_t (&idx)[4]) {
  int k = 0;
#pragma unroll
  for (int j = 0; j < kElemsPerThread; ++j) {
    idx[j] = first + k;
    if ((bits >> j) & 1u) {
      if (idx[j] >= state_numel) bits &= ~(1u << j);
      ++k;
    }
  }
  return bits;
}

template <typename T>
__device__ __forceinline__ void load_packed(const void* base, uint32_t bits, const int64_t (&idx)[4], float (&out)[4]) {
  const T* ptr = static_cast<const T*>(base);
#pragma unroll
  for (int j = 0; j < kElemsPerThread; ++j) out[j] = ((bits >> j) & 1u) ? static_cast<float>(ptr[idx[j]]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void store_packed(void* base, uint32_t bits, const int64_t (&idx)[4], const float (&in)[4]) {
  T* ptr = static_cast<T*>(base);
#pragma unroll
  for (int j = 0; j < kElemsPerThread; ++j) {
    if ((bits >> j) & 1u) ptr[idx[j]] = static_cast<T>(in[j]);
  }
}

// Calls fn(i, bits, idx) for each thread's 4 elements [i, i + 4) of the chunk [begin, end) that hold a salient lane
// (bits: the salient lanes; idx: their packed indices, from `at`, the chunk's packed start). Every thread of the
// block must call it (the passes scan across the block).
template <typename Fn>
__device__ __forceinline__ void for_each_packed_nibble(const OptimTensor& t, int64_t begin, int64_t end, int64_t at,
                                                       int* warp_sums, Fn&& fn) {
  for (int64_t pass = begin; pass < end; pass += static_cast<int64_t>(blockDim.x) * kElemsPerThread) {
    const int64_t i = pass + static_cast<int64_t>(threadIdx.x) * kElemsPerThread;
    uint32_t bits = i < end ? salient_nibble(t, i) : 0u;
    int total = 0;
    const int offset = block_exclusive_scan(__popc(bits), warp_sums, &total);
    int64_t idx[4];
    bits = packed_lanes(bits, at + offset, t.state_numel, idx);
    if (bits != 0) fn(i, bits, idx);
    at += total;
  }
}

struct ChunkCounts {
  const int64_t* counts;
  const int64_t* incl;
};

__global__ void __launch_bounds__(kThreads)
    masked_sgd_compact_kernel(const OptimTensor* __restrict__ tensors, int n_tensors, int64_t total_chunks,
                              SgdScalars s, DeviceScalars dev, ChunkCounts cc) {
  __shared__ int warp_sums[32];
  if (step_skipped(dev)) return;
  sgd_step_scalars(s, dev);
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(tensors, n_tensors, chunk);
    const OptimTensor& t = span.t;
    const int64_t begin = span.begin, end = span.end;
    const int64_t at = chunk_packed_start(cc.counts, cc.incl, chunk, t.chunk_begin);
    dispatch_param_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      for_each_packed_nibble(t, begin, end, at, warp_sums, [&](int64_t i, uint32_t bits, const int64_t(&idx)[4]) {
        float p[4], g[4], b[4] = {0.f, 0.f, 0.f, 0.f};
        load4<T>(t.p, i, t.numel, t.vector_ok, p);
        load4<T>(t.g, i, t.numel, t.vector_ok, g);
        if (s.has_momentum && !s.first_step) load_packed<T>(t.s0, bits, idx, b);
#pragma unroll
        for (int j = 0; j < kElemsPerThread; ++j) sgd_element(p[j], g[j], b[j], s);
        store4<T>(t.p, i, bits, t.vector_ok, p);
        if (s.has_momentum) store_packed<T>(t.s0, bits, idx, b);
      });
    });
  }
}

__global__ void __launch_bounds__(kThreads)
    masked_adam_compact_kernel(const OptimTensor* __restrict__ tensors, int n_tensors, int64_t total_chunks,
                               AdamScalars base, AdamHost h, DeviceScalars dev, ChunkCounts cc) {
  __shared__ int warp_sums[32];
  if (step_skipped(dev)) return;
  const double lr = adam_step_scalars(base, h, dev);
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const ChunkSpan span = chunk_span(tensors, n_tensors, chunk);
    const OptimTensor& t = span.t;
    const int64_t begin = span.begin, end = span.end;
    const int64_t at = chunk_packed_start(cc.counts, cc.incl, chunk, t.chunk_begin);
    const AdamScalars s = adam_tensor_scalars(base, h, lr, *t.step);
    dispatch_param_type(t.dtype, [&](auto tag) {
      using T = decltype(tag);
      for_each_packed_nibble(t, begin, end, at, warp_sums, [&](int64_t i, uint32_t bits, const int64_t(&idx)[4]) {
        float p[4], g[4], m[4], v[4], x[4] = {0.f, 0.f, 0.f, 0.f};
        load4<T>(t.p, i, t.numel, t.vector_ok, p);
        load4<T>(t.g, i, t.numel, t.vector_ok, g);
        load_packed<T>(t.s0, bits, idx, m);
        load_packed<T>(t.s1, bits, idx, v);
        if (s.amsgrad) load_packed<T>(t.s2, bits, idx, x);
#pragma unroll
        for (int j = 0; j < kElemsPerThread; ++j) adam_element(p[j], g[j], m[j], v[j], x[j], s);
        store4<T>(t.p, i, bits, t.vector_ok, p);
        store_packed<T>(t.s0, bits, idx, m);
        store_packed<T>(t.s1, bits, idx, v);
        if (s.amsgrad) store_packed<T>(t.s2, bits, idx, x);
      });
    });
  }
}

// ----------------------------------------------------------------------------------------- launchers

// One scalar tensor argument (lr_tensor, grad_scale, found_inf) as the kernels take it (checked first). On the
// parameters' device the kernel reads it (converted to float32 there when it has another dtype): no host sync,
// capturable. On the CPU its value is read here, on the host, exactly as the CPU kernel reads it: copying it to the
// device would be a pageable host-to-device copy, which synchronises the stream first, on every step. Inside a
// graph capture a host value would be frozen into the graph, so a CPU tensor is refused there.
struct StepScalar {
  std::optional<at::Tensor> device_value;  // float32 on the device, kept alive until the launch
  std::optional<float> host_value;

  StepScalar(const char* op, const char* name, const std::optional<at::Tensor>& t, const c10::Device& device) {
    check_scalar_tensor(op, name, t, device);
    if (!t.has_value()) return;
    if (!t->device().is_cpu()) {
      device_value = t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
      return;
    }
    TORCH_CHECK(!stream_is_capturing(c10::cuda::getCurrentCUDAStream().stream()), "salun_ext: ", op, ": argument '",
                name, "' is a CPU tensor inside a CUDA graph capture: the graph would keep the value it has now; "
                "expected a tensor on ", device);
    host_value = t->to(at::kFloat).item<float>();
  }

  const float* pointer() const { return device_value.has_value() ? device_value->data_ptr<float>() : nullptr; }
};

// lr / grad_scale / found_inf of one step. Call under the device's CUDAGuard.
struct DeviceScalarTensors {
  StepScalar lr, grad_scale, found_inf;

  DeviceScalarTensors(const char* op, const c10::Device& device, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& grad_scale_tensor,
                      const std::optional<at::Tensor>& found_inf_tensor)
      : lr(op, "lr_tensor", lr_tensor, device),
        grad_scale(op, "grad_scale", grad_scale_tensor, device),
        found_inf(op, "found_inf", found_inf_tensor, device) {}

  // A found_inf read on the host skips the whole step (as on the CPU); on the device the kernel returns at once.
  bool skipped_on_host() const { return found_inf.host_value.has_value() && *found_inf.host_value != 0.0f; }

  DeviceScalars pointers() const { return DeviceScalars{lr.pointer(), grad_scale.pointer(), found_inf.pointer()}; }
};

int optim_grid(const void* kernel, const c10::Device& device, int64_t total_chunks) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessor_count(device.index());
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, total_chunks)));
}

// The per-chunk mask-bit counts of a compact step and their running sum (kept alive until the launch).
struct ChunkCountTensors {
  at::Tensor counts, incl;

  ChunkCountTensors(const at::Tensor& dev_table, int n_tensors, int64_t total_chunks, const c10::Device& device) {
    counts = at::empty({total_chunks}, at::TensorOptions().dtype(at::kLong).device(device));
    const int grid = optim_grid(reinterpret_cast<const void*>(&chunk_popcount_kernel), device, total_chunks);
    chunk_popcount_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const OptimTensor*>(dev_table.data_ptr()), n_tensors, total_chunks,
        counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    incl = at::cumsum(counts, 0);
  }

  ChunkCounts pointers() const { return ChunkCounts{counts.data_ptr<int64_t>(), incl.data_ptr<int64_t>()}; }
};

// masked_sgd_ (dense state) or masked_sgd_compact_ (packed momentum buffers).
void masked_sgd_impl(bool compact, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = compact ? "masked_sgd_compact_" : "masked_sgd_";
  const bool has_momentum = momentum != 0.0;
  if (compact) {
    check_step_params(op, params, mask_words);
    check_sgd_compact_lists(op, params, grads, momentum_buffers, has_momentum, /*counts=*/nullptr);
  } else {
    check_sgd_lists(op, params, grads, momentum_buffers, mask_words, has_momentum);
  }
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalarTensors scalars_dev(op, device, lr_tensor, grad_scale, found_inf);
  if (scalars_dev.skipped_on_host()) return;

  SgdScalars s{};
  s.lr = scalars_dev.lr.host_value.value_or(static_cast<float>(lr));
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.weight_decay = static_cast<float>(weight_decay);
  s.grad_scale = scalars_dev.grad_scale.host_value.value_or(1.0f);
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
  const at::Tensor dev_table = device_table(op, table, device);
  const auto* tensors = reinterpret_cast<const OptimTensor*>(dev_table.data_ptr());
  const int n = static_cast<int>(table.size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (compact) {
    const ChunkCountTensors cc(dev_table, n, total_chunks, device);
    const int grid = optim_grid(reinterpret_cast<const void*>(&masked_sgd_compact_kernel), device, total_chunks);
    masked_sgd_compact_kernel<<<grid, kThreads, 0, stream>>>(tensors, n, total_chunks, s, scalars_dev.pointers(),
                                                             cc.pointers());
  } else {
    const int grid = optim_grid(reinterpret_cast<const void*>(&masked_sgd_kernel), device, total_chunks);
    masked_sgd_kernel<<<grid, kThreads, 0, stream>>>(tensors, n, total_chunks, s, scalars_dev.pointers());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  masked_sgd_impl(false, params, grads, momentum_buffers, mask_words, lr, lr_tensor, momentum, dampening,
                  weight_decay, nesterov, maximize, first_step, grad_scale, found_inf);
}

void masked_sgd_compact_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                             at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor,
                             double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                             bool first_step, const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  masked_sgd_impl(true, params, grads, momentum_buffers, mask_words, lr, lr_tensor, momentum, dampening,
                  weight_decay, nesterov, maximize, first_step, grad_scale, found_inf);
}

// masked_adam_ (dense state) or masked_adam_compact_ (packed moments).
void masked_adam_impl(bool compact, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                      at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                      double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                      bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const char* op = compact ? "masked_adam_compact_" : "masked_adam_";
  if (compact) {
    check_step_params(op, params, mask_words);
    check_adam_compact_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                             /*counts=*/nullptr);
  } else {
    check_adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, amsgrad);
  }
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK(state_steps[i].numel() == 1 && state_steps[i].scalar_type() == at::kFloat, "salun_ext: ", op,
                ": state_steps[", i, "] must be one float32 value on ", params[i].device());
  }
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const DeviceScalarTensors scalars_dev(op, device, lr_tensor, grad_scale, found_inf);
  if (scalars_dev.skipped_on_host()) return;

  AdamScalars s{};
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.grad_scale = scalars_dev.grad_scale.host_value.value_or(1.0f);
  s.has_grad_scale = grad_scale.has_value();
  s.decoupled_weight_decay = decoupled_weight_decay;
  s.amsgrad = amsgrad;
  s.maximize = maximize;
  // (a host lr_tensor is used as the CPU kernel uses it: its float32 value, in double)
  const double lr_value = scalars_dev.lr.host_value.has_value() ? static_cast<double>(*scalars_dev.lr.host_value) : lr;
  const AdamHost h{lr_value, beta1, beta2, weight_decay};

  int64_t total_chunks = 0;
  const at::TensorList none;
  const std::vector<OptimTensor> table = build_table(params, grads, exp_avgs, exp_avg_sqs,
                                                     amsgrad ? max_exp_avg_sqs : none, mask_words, state_steps,
                                                     &total_chunks);
  if (total_chunks == 0) return;
  const at::Tensor dev_table = device_table(op, table, device);
  const auto* tensors = reinterpret_cast<const OptimTensor*>(dev_table.data_ptr());
  const int n = static_cast<int>(table.size());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (compact) {
    const ChunkCountTensors cc(dev_table, n, total_chunks, device);
    const int grid = optim_grid(reinterpret_cast<const void*>(&masked_adam_compact_kernel), device, total_chunks);
    masked_adam_compact_kernel<<<grid, kThreads, 0, stream>>>(tensors, n, total_chunks, s, h, scalars_dev.pointers(),
                                                              cc.pointers());
  } else {
    const int grid = optim_grid(reinterpret_cast<const void*>(&masked_adam_kernel), device, total_chunks);
    masked_adam_kernel<<<grid, kThreads, 0, stream>>>(tensors, n, total_chunks, s, h, scalars_dev.pointers());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList state_steps, at::TensorList mask_words, double lr,
                      const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  masked_adam_impl(false, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale,
                   found_inf);
}

void masked_adam_compact_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                              at::TensorList mask_words, double lr, const std::optional<at::Tensor>& lr_tensor,
                              double beta1, double beta2, double eps, double weight_decay,
                              bool decoupled_weight_decay, bool amsgrad, bool maximize,
                              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  masked_adam_impl(true, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, mask_words, lr,
                   lr_tensor, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, grad_scale,
                   found_inf);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(salun_ext, CUDA, m) {
  m.impl("masked_sgd_", &cuda::masked_sgd_cuda);
  m.impl("masked_adam_", &cuda::masked_adam_cuda);
  m.impl("masked_sgd_compact_", &cuda::masked_sgd_compact_cuda);
  m.impl("masked_adam_compact_", &cuda::masked_adam_compact_cuda);
}

}  // namespace salun_ext
