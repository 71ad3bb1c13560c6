// CUDA kernels of the exact global saliency select (schemas and reference: salun_ext/_ops.py, _reference.py;
// the CPU twin is csrc/cpu/saliency.cpp, the host driver salun_ext/saliency.py).
//
// key_histogram: one read of the list. Each block keeps a private histogram in shared memory (global memory
//   when rows x bins does not fit), adds with warp aggregation when a whole warp hits one bin (massive ties such
//   as exact zeros would otherwise serialise 32 atomics on one address), and flushes its non-zero bins with one
//   64-bit atomic each at the end.
// mask_words: one read; every thread turns 16 bytes of gradient into 4 or 8 mask bits, lanes sharing a word
//   combine them with shuffles, and one lane stores the word (no atomics). Exact-k with a partial tie quota adds
//   a tie-count pass and a one-warp fix-up of the single chunk that straddles the quota.
// All work runs on the current stream; every launch is checked.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "multi_tensor.cuh"
#include "salun_ext/key.h"
#include "salun_ext/sample_index.h"
#include "salun_ext/tensor_list.h"

namespace salun_ext {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 16384;  // elements per chunk: a multiple of every tile (kThreads * 8) and of 32
constexpr int kMaxRows = 64;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
static_assert(kChunk % (kThreads * 8) == 0 && kChunk % 32 == 0, "chunk must hold whole tiles and words");

// Row of the (strictly increasing) prefix list equal to `high`, or -1.
__device__ __forceinline__ int find_row(const uint32_t* prefixes, int rows, uint32_t high) {
  int lo = 0, hi = rows - 1;
  while (lo <= hi) {
    const int mid = (lo + hi) >> 1;
    const uint32_t p = prefixes[mid];
    if (p == high) return mid;
    if (p < high) {
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return -1;
}

template <typename Counter>
__device__ __forceinline__ void add_one(Counter* slot_base, uint32_t slot, bool hit) {
  // All 32 lanes call this together. If every hitting lane targets the same slot, one lane adds the whole count.
  const unsigned hits = __ballot_sync(kFullMask, hit);
  if (!hit) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  atomicAdd(slot_base + slot, static_cast<Counter>(1));  // no warp reductions before sm_80
#else
  const uint32_t lo = __reduce_min_sync(hits, slot);
  const uint32_t hi = __reduce_max_sync(hits, slot);
  if (lo == hi) {
    if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(hits) - 1)) {
      atomicAdd(slot_base + slot, static_cast<Counter>(__popc(hits)));
    }
  } else {
    atomicAdd(slot_base + slot, static_cast<Counter>(1));
  }
#endif
}

struct DigitArgs {
  uint32_t low_bit;
  uint32_t digit_mask;
  uint32_t prefix_shift;  // <= 31
  int rows;
  int bins;
  bool nan_as_zero;
};

template <bool kShared>
__global__ void __launch_bounds__(kThreads) key_histogram_kernel(const TensorMeta* __restrict__ metas, int num_tensors,
                                                                  int64_t total_chunks, DigitArgs d,
                                                                  const uint32_t* __restrict__ prefixes_global,
                                                                  unsigned long long* __restrict__ out) {
  extern __shared__ uint32_t smem[];
  uint32_t* prefixes = smem;                 // rows entries
  uint32_t* local_hist = smem + kMaxRows;    // rows * bins counters (shared variant only)
  for (int j = threadIdx.x; j < d.rows; j += blockDim.x) prefixes[j] = prefixes_global[j];
  if constexpr (kShared) {
    for (int j = threadIdx.x; j < d.rows * d.bins; j += blockDim.x) local_hist[j] = 0;
  }
  __syncthreads();

  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const TensorMeta m = metas[find_tensor(metas, num_tensors, chunk)];
    const int64_t begin = (chunk - m.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
    dispatch_key_dtype(m.dtype, [&](auto dtype_tag) {
      constexpr KeyDtype D = decltype(dtype_tag)::value;
      constexpr int E = VecWidth<D>::value;
      for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * E) {
        uint32_t keys[E];
        bool valid[E];
        load_keys<D>(m, base + static_cast<int64_t>(threadIdx.x) * E, d.nan_as_zero, keys, valid);
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const bool in_range = valid[j] && (base + threadIdx.x * E + j) < end;
          const int row = in_range ? find_row(prefixes, d.rows, keys[j] >> d.prefix_shift) : -1;
          const uint32_t slot = row < 0 ? 0u : static_cast<uint32_t>(row) * d.bins + ((keys[j] >> d.low_bit) & d.digit_mask);
          if constexpr (kShared) {
            add_one<uint32_t>(local_hist, slot, row >= 0);
          } else {
            add_one<unsigned long long>(out, slot, row >= 0);
          }
        }
      }
    });
  }

  if constexpr (kShared) {
    __syncthreads();
    for (int j = threadIdx.x; j < d.rows * d.bins; j += blockDim.x) {
      const uint32_t v = local_hist[j];
      if (v != 0) atomicAdd(out + j, static_cast<unsigned long long>(v));
    }
  }
}

int grid_size(const void* kernel, int device, size_t smem_bytes, int64_t total_chunks) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes));
  const int64_t blocks = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessor_count(device);
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, total_chunks)));
}

at::Tensor key_histogram_cuda(const std::vector<at::Tensor>& grads, int64_t low_bit, int64_t num_bits,
                              const std::vector<int64_t>& prefixes, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  const DigitSpec spec = make_digit_spec(low_bit, num_bits, /*max_bits=*/16);
  check_prefixes(prefixes, spec);
  SALUN_CHECK_ARG(static_cast<int64_t>(prefixes.size()) <= kMaxRows, "prefixes", "at most ", kMaxRows,
                  " prefixes per pass, got ", prefixes.size());
  const c10::cuda::CUDAGuard guard(grads.front().device());
  const int rows = static_cast<int>(prefixes.size());
  const int bins = 1 << num_bits;
  at::Tensor out = at::zeros({rows, bins}, grads.front().options().dtype(at::kLong));
  const DeviceTable table = upload_table(grads, info, kChunk, "key_histogram");
  if (table.total_chunks == 0) return out;

  at::Tensor host_prefixes = at::empty({rows}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  for (int r = 0; r < rows; ++r) host_prefixes.data_ptr<int32_t>()[r] = static_cast<int32_t>(prefixes[r]);
  at::Tensor dev_prefixes = host_prefixes.to(grads.front().device(), /*non_blocking=*/true);

  const DigitArgs d{static_cast<uint32_t>(low_bit), spec.digit_mask, static_cast<uint32_t>(spec.prefix_shift), rows,
                    bins, nan_as_zero};
  const size_t shared_hist_bytes = (static_cast<size_t>(kMaxRows) + static_cast<size_t>(rows) * bins) * 4;
  const bool use_shared = shared_hist_bytes <= 48 * 1024;
  const int device = grads.front().device().index();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* out_ptr = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  const auto* prefix_ptr = reinterpret_cast<const uint32_t*>(dev_prefixes.data_ptr<int32_t>());
  if (use_shared) {
    const int grid = grid_size(reinterpret_cast<const void*>(&key_histogram_kernel<true>), device,
                               shared_hist_bytes, table.total_chunks);
    key_histogram_kernel<true><<<grid, kThreads, shared_hist_bytes, stream>>>(
        table.metas, table.num_tensors, table.total_chunks, d, prefix_ptr, out_ptr);
  } else {
    const size_t smem = kMaxRows * 4;
    const int grid = grid_size(reinterpret_cast<const void*>(&key_histogram_kernel<false>), device, smem,
                               table.total_chunks);
    key_histogram_kernel<false><<<grid, kThreads, smem, stream>>>(table.metas, table.num_tensors,
                                                                  table.total_chunks, d, prefix_ptr, out_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// mask_words

enum TieMode : int { kTiesNone = 0, kTiesAll = 1, kTiesPartial = 2 };

__global__ void __launch_bounds__(kThreads) count_ties_kernel(const TensorMeta* __restrict__ metas, int num_tensors,
                                                               int64_t total_chunks, uint32_t threshold,
                                                               bool nan_as_zero, int64_t* __restrict__ counts) {
  __shared__ int64_t warp_sums[kThreads / 32];
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const TensorMeta m = metas[find_tensor(metas, num_tensors, chunk)];
    const int64_t begin = (chunk - m.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
    int64_t count = 0;
    dispatch_key_dtype(m.dtype, [&](auto dtype_tag) {
      constexpr KeyDtype D = decltype(dtype_tag)::value;
      constexpr int E = VecWidth<D>::value;
      for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * E) {
        uint32_t keys[E];
        bool valid[E];
        load_keys<D>(m, base + static_cast<int64_t>(threadIdx.x) * E, nan_as_zero, keys, valid);
#pragma unroll
        for (int j = 0; j < E; ++j) count += (valid[j] && base + threadIdx.x * E + j < end && keys[j] == threshold);
      }
    });
    for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_down_sync(kFullMask, count, offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      counts[chunk] = total;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) mask_words_kernel(const TensorMeta* __restrict__ metas, int num_tensors,
                                                               int64_t total_chunks, uint32_t threshold, int tie_mode,
                                                               const int64_t* __restrict__ ties_through,
                                                               int64_t tie_limit, bool nan_as_zero,
                                                               uint32_t* __restrict__ words) {
  const unsigned lane = threadIdx.x & 31;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const TensorMeta m = metas[find_tensor(metas, num_tensors, chunk)];
    const int64_t begin = (chunk - m.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
    bool take_ties = tie_mode == kTiesAll;
    if (tie_mode == kTiesPartial) {
      // whole-chunk decision; the one chunk straddling the quota takes no tie here and is fixed up afterwards
      const int64_t through = ties_through[chunk];
      take_ties = through <= tie_limit;
    }
    const uint32_t bound = take_ties ? threshold : threshold + 1u;  // salient: key >= bound
    uint32_t* tensor_words = words + m.word_offset;
    dispatch_key_dtype(m.dtype, [&](auto dtype_tag) {
      constexpr KeyDtype D = decltype(dtype_tag)::value;
      constexpr int E = VecWidth<D>::value;
      constexpr int kLanesPerWord = 32 / E;
      for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * E) {
        const int64_t i = base + static_cast<int64_t>(threadIdx.x) * E;
        uint32_t keys[E];
        bool valid[E];
        load_keys<D>(m, i, nan_as_zero, keys, valid);
        uint32_t bits = 0;
#pragma unroll
        for (int j = 0; j < E; ++j) bits |= static_cast<uint32_t>(valid[j] && i + j < end && keys[j] >= bound) << j;
        uint32_t word = bits << static_cast<uint32_t>(i & 31);
#pragma unroll
        for (int offset = 1; offset < kLanesPerWord; offset <<= 1) word |= __shfl_xor_sync(kFullMask, word, offset);
        if (lane % kLanesPerWord == 0 && i < end) tensor_words[i >> 5] = word;
      }
    });
  }
}

// One warp: sets the tie bits of the single chunk whose ties straddle the quota (ranks in global order).
__global__ void fix_straddling_ties_kernel(const TensorMeta* __restrict__ metas, int num_tensors, int64_t total_chunks,
                                           uint32_t threshold, const int64_t* __restrict__ ties_through,
                                           const int64_t* __restrict__ tie_counts, int64_t tie_limit,
                                           bool nan_as_zero, uint32_t* __restrict__ words) {
  // first chunk whose inclusive tie count exceeds the quota
  int64_t lo = 0, hi = total_chunks;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (ties_through[mid] > tie_limit) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  if (lo >= total_chunks) return;
  const int64_t chunk = lo;
  int64_t remaining = tie_limit - (ties_through[chunk] - tie_counts[chunk]);
  if (remaining <= 0) return;  // the quota ended exactly at a chunk boundary
  const TensorMeta m = metas[find_tensor(metas, num_tensors, chunk)];
  const int64_t begin = (chunk - m.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
  const unsigned lane = threadIdx.x;
  const unsigned lanes_below = (1u << lane) - 1u;
  uint32_t* tensor_words = words + m.word_offset;
  for (int64_t base = begin; base < end && remaining > 0; base += 32) {
    const int64_t i = base + lane;
    const bool tie = i < end && key_at(m, i, nan_as_zero) == threshold;
    const unsigned ties = __ballot_sync(kFullMask, tie);
    const bool take = tie && __popc(ties & lanes_below) < remaining;
    const unsigned taken = __ballot_sync(kFullMask, take);
    if (lane == 0 && taken != 0) tensor_words[base >> 5] |= taken;
    remaining -= __popc(ties);
  }
}

at::Tensor mask_words_cuda(const std::vector<at::Tensor>& grads, int64_t threshold_key, int64_t tie_limit,
                           bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(threshold_key >= 0 && threshold_key <= static_cast<int64_t>(kNanKey), "threshold_key",
                  "expected a 31-bit key in [0, 0x7FFFFFFF], got ", threshold_key);
  const c10::cuda::CUDAGuard guard(grads.front().device());
  at::Tensor out = at::zeros({info.total_words}, grads.front().options().dtype(at::kInt));
  const DeviceTable table = upload_table(grads, info, kChunk, "mask_words");
  if (table.total_chunks == 0) return out;
  const int device = grads.front().device().index();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const uint32_t threshold = static_cast<uint32_t>(threshold_key);
  auto* words = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());

  const int tie_mode = tie_limit < 0 ? kTiesAll : (tie_limit == 0 ? kTiesNone : kTiesPartial);
  at::Tensor counts, through;
  if (tie_mode == kTiesPartial) {
    counts = at::empty({table.total_chunks}, grads.front().options().dtype(at::kLong));
    const int grid = grid_size(reinterpret_cast<const void*>(&count_ties_kernel), device, 0, table.total_chunks);
    count_ties_kernel<<<grid, kThreads, 0, stream>>>(table.metas, table.num_tensors, table.total_chunks, threshold,
                                                     nan_as_zero, counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    through = at::cumsum(counts, 0);
  }
  const int64_t* through_ptr = tie_mode == kTiesPartial ? through.data_ptr<int64_t>() : nullptr;
  const int64_t* counts_ptr = tie_mode == kTiesPartial ? counts.data_ptr<int64_t>() : nullptr;
  const int grid = grid_size(reinterpret_cast<const void*>(&mask_words_kernel), device, 0, table.total_chunks);
  mask_words_kernel<<<grid, kThreads, 0, stream>>>(table.metas, table.num_tensors, table.total_chunks, threshold,
                                                   tie_mode, through_ptr, tie_limit, nan_as_zero, words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tie_mode == kTiesPartial) {
    fix_straddling_ties_kernel<<<1, 32, 0, stream>>>(table.metas, table.num_tensors, table.total_chunks, threshold,
                                                     through_ptr, counts_ptr, tie_limit, nan_as_zero, words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// sample_keys + window_select: the one-pass select for a threshold bracketed by a sample

__global__ void sample_keys_kernel(const TensorMeta* __restrict__ metas, int num_tensors, int64_t total,
                                   int64_t count, bool nan_as_zero, int32_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t index = sample_index(i, total, count);
    const TensorMeta m = metas[find_tensor_of_element(metas, num_tensors, index)];
    out[i] = static_cast<int32_t>(key_at(m, index - m.elem_begin, nan_as_zero));
  }
}

at::Tensor sample_keys_cuda(const std::vector<at::Tensor>& grads, int64_t num_samples, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(num_samples >= 1, "num_samples", "expected >= 1, got ", num_samples);
  const c10::cuda::CUDAGuard guard(grads.front().device());
  const int64_t count = std::min(num_samples, info.total_elements);
  at::Tensor out = at::empty({count}, grads.front().options().dtype(at::kInt));
  const DeviceTable table = upload_table(grads, info, kChunk, "sample_keys");
  if (count == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
  sample_keys_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table.metas, table.num_tensors, info.total_elements, count, nan_as_zero, out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

constexpr int kWindowBuffer = 7680;  // shared-memory candidates per block before a flush (45 KB with the keys)
static_assert(kChunk <= 65536, "local candidate positions are 16-bit");
static_assert(kWindowBuffer > kThreads * 8, "an empty buffer must hold a whole tile of candidates");

// Writes the key > hi_key bits (as mask_words) and appends in-window elements to a shared-memory buffer (warp-
// aggregated shared atomics), flushed to the global candidate arrays with one global atomic per block per chunk,
// so the global counter sees a few tens of thousands of atomics even for billions of elements.
__global__ void __launch_bounds__(kThreads) window_select_kernel(
    const TensorMeta* __restrict__ metas, int num_tensors, int64_t total_chunks, uint32_t lo, uint32_t hi,
    int64_t capacity, bool nan_as_zero, uint32_t* __restrict__ words, unsigned long long* __restrict__ counts,
    int32_t* __restrict__ cand_keys, int64_t* __restrict__ cand_pos) {
  __shared__ uint32_t s_keys[kWindowBuffer];
  __shared__ uint16_t s_local[kWindowBuffer];
  __shared__ int s_count;
  __shared__ unsigned long long s_base;
  __shared__ unsigned long long s_reduce[2][kThreads / 32];
  const unsigned lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  unsigned long long above = 0, nans = 0;
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();

  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const TensorMeta m = metas[find_tensor(metas, num_tensors, chunk)];
    const int64_t begin = (chunk - m.chunk_begin) * kChunk;
    const int64_t end = begin + kChunk < m.numel ? begin + kChunk : m.numel;
    uint32_t* tensor_words = words + m.word_offset;

    auto flush = [&]() {
      __syncthreads();
      if (threadIdx.x == 0) s_base = atomicAdd(counts + 1, static_cast<unsigned long long>(s_count));
      __syncthreads();
      const int64_t pos_base = m.word_offset * 32 + begin;
      for (int j = threadIdx.x; j < s_count; j += blockDim.x) {
        const unsigned long long slot = s_base + j;
        if (slot < static_cast<unsigned long long>(capacity)) {
          cand_keys[slot] = static_cast<int32_t>(s_keys[j]);
          cand_pos[slot] = pos_base + s_local[j];
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) s_count = 0;
      __syncthreads();
    };

    dispatch_key_dtype(m.dtype, [&](auto dtype_tag) {
      constexpr KeyDtype D = decltype(dtype_tag)::value;
      constexpr int E = VecWidth<D>::value;
      constexpr int kLanesPerWord = 32 / E;
      constexpr int kTile = kThreads * E;
      for (int64_t base = begin; base < end; base += kTile) {
        // Read the buffer fill between two barriers so every thread takes the same flush decision.
        __syncthreads();
        const bool full = s_count > kWindowBuffer - kTile;
        __syncthreads();
        if (full) flush();
        const int64_t i = base + static_cast<int64_t>(threadIdx.x) * E;
        uint32_t keys[E];
        bool valid[E];
        load_keys<D>(m, i, nan_as_zero, keys, valid);
        uint32_t bits = 0;
#pragma unroll
        for (int j = 0; j < E; ++j) {
          const bool ok = valid[j] && i + j < end;
          bits |= static_cast<uint32_t>(ok && keys[j] > hi) << j;
          nans += ok && !nan_as_zero && keys[j] == kNanKey;
          const bool inside = ok && keys[j] >= lo && keys[j] <= hi;
          const unsigned hits = __ballot_sync(kFullMask, inside);
          if (hits != 0) {
            const int leader = __ffs(hits) - 1;
            int offset = 0;
            if (static_cast<int>(lane) == leader) offset = atomicAdd(&s_count, __popc(hits));
            offset = __shfl_sync(kFullMask, offset, leader);
            if (inside) {
              const int slot = offset + __popc(hits & lanes_below);
              s_keys[slot] = keys[j];
              s_local[slot] = static_cast<uint16_t>(i + j - begin);
            }
          }
        }
        above += __popc(bits);
        uint32_t word = bits << static_cast<uint32_t>(i & 31);
#pragma unroll
        for (int offset = 1; offset < kLanesPerWord; offset <<= 1) word |= __shfl_xor_sync(kFullMask, word, offset);
        if (lane % kLanesPerWord == 0 && i < end) tensor_words[i >> 5] = word;
      }
    });
    flush();
  }

  for (int offset = 16; offset > 0; offset >>= 1) {
    above += __shfl_down_sync(kFullMask, above, offset);
    nans += __shfl_down_sync(kFullMask, nans, offset);
  }
  if (lane == 0) {
    s_reduce[0][threadIdx.x >> 5] = above;
    s_reduce[1][threadIdx.x >> 5] = nans;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long a = 0, n = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      a += s_reduce[0][w];
      n += s_reduce[1][w];
    }
    if (a) atomicAdd(counts, a);
    if (n) atomicAdd(counts + 2, n);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_select_cuda(const std::vector<at::Tensor>& grads,
                                                                               int64_t lo_key, int64_t hi_key,
                                                                               int64_t capacity, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(0 <= lo_key && lo_key <= hi_key && hi_key <= static_cast<int64_t>(kNanKey), "lo_key, hi_key",
                  "expected 0 <= lo_key <= hi_key <= 0x7FFFFFFF, got ", lo_key, ", ", hi_key);
  SALUN_CHECK_ARG(capacity >= 0, "capacity", "expected >= 0, got ", capacity);
  const c10::cuda::CUDAGuard guard(grads.front().device());
  const auto options = grads.front().options();
  at::Tensor words = at::zeros({info.total_words}, options.dtype(at::kInt));
  at::Tensor counts = at::zeros({3}, options.dtype(at::kLong));
  at::Tensor cand_keys = at::zeros({capacity}, options.dtype(at::kInt));
  at::Tensor cand_pos = at::zeros({capacity}, options.dtype(at::kLong));
  const DeviceTable table = upload_table(grads, info, kChunk, "window_select");
  if (table.total_chunks == 0) return {words, counts, cand_keys, cand_pos};
  const int grid = grid_size(reinterpret_cast<const void*>(&window_select_kernel), grads.front().device().index(), 0,
                             table.total_chunks);
  window_select_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table.metas, table.num_tensors, table.total_chunks, static_cast<uint32_t>(lo_key),
      static_cast<uint32_t>(hi_key), capacity, nan_as_zero, reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()),
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), cand_keys.data_ptr<int32_t>(),
      cand_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {words, counts, cand_keys, cand_pos};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(salun_ext, CUDA, m) {
  m.impl("key_histogram", &cuda::key_histogram_cuda);
  m.impl("mask_words", &cuda::mask_words_cuda);
  m.impl("sample_keys", &cuda::sample_keys_cuda);
  m.impl("window_select", &cuda::window_select_cuda);
}

}  // namespace salun_ext
