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
#include <type_traits>
#include <vector>

#include "multi_tensor.cuh"
#include "salun_ext/key.h"
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
  const DeviceTable table = upload_table(grads, info, kChunk);
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
    bool tie = false;
    if (i < end) {
      uint32_t key;
      switch (static_cast<KeyDtype>(m.dtype)) {
        case KeyDtype::kFloat32:
          key = key_from_fp32_bits(static_cast<const uint32_t*>(m.ptr)[i], nan_as_zero);
          break;
        case KeyDtype::kBFloat16:
          key = key_from_bf16_bits(static_cast<const uint16_t*>(m.ptr)[i], nan_as_zero);
          break;
        default:
          key = key_from_fp16_bits(static_cast<const uint16_t*>(m.ptr)[i], nan_as_zero);
          break;
      }
      tie = key == threshold;
    }
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
  const DeviceTable table = upload_table(grads, info, kChunk);
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

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(salun_ext, CUDA, m) {
  m.impl("key_histogram", &cuda::key_histogram_cuda);
  m.impl("mask_words", &cuda::mask_words_cuda);
}

}  // namespace salun_ext
