// Multi-tensor tables for the CUDA kernels: a list of tensors walked as fixed-size chunks in global index order
// (tensor order, then flat index), with no concatenation. The host builds one TensorMeta per non-empty tensor and
// uploads the table once per op call (pinned memory, async on the current stream); each block then walks chunks
// with a grid-stride loop and finds a chunk's tensor by binary search over chunk_begin. An upload cannot be part
// of a CUDA graph (the graph would copy from the freed pinned buffer on every replay): upload_table refuses to run
// while the current stream is capturing.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "salun_ext/key.h"
#include "salun_ext/tensor_list.h"

namespace salun_ext {
namespace cuda {

struct TensorMeta {
  const void* ptr;
  int64_t numel;
  int64_t chunk_begin;  // index of this tensor's first chunk in the global chunk sequence
  int64_t word_offset;  // first mask word of this tensor
  int64_t elem_begin;   // global index of this tensor's first element
  int32_t dtype;        // KeyDtype
  int32_t vector_ok;    // 1 when ptr is 16-byte aligned (16-byte loads allowed)
};

struct DeviceTable {
  at::Tensor storage;  // keeps the device copy alive
  const TensorMeta* metas = nullptr;
  int num_tensors = 0;
  int64_t total_chunks = 0;
};

// Whether `stream` is capturing a CUDA graph right now.
inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Refuses an op that uploads host data while the current stream captures a graph (`op` names it in the error).
inline void check_not_capturing(const char* op) {
  TORCH_CHECK(!stream_is_capturing(c10::cuda::getCurrentCUDAStream()), "salun_ext: ", op,
              " cannot run inside a CUDA graph capture: it uploads a table of tensor pointers from a temporary host "
              "buffer, which every replay of the graph would read again after it is freed; call it outside the "
              "capture");
}

inline DeviceTable upload_table(const std::vector<at::Tensor>& tensors, const TensorListInfo& info, int64_t chunk,
                                const char* op) {
  std::vector<TensorMeta> metas;
  int64_t chunks = 0;
  int64_t elements = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (info.numel[i] == 0) continue;  // empty tensors own no chunk and no mask word
    const void* ptr = tensors[i].data_ptr();
    metas.push_back(TensorMeta{ptr, info.numel[i], chunks, info.word_offset[i], elements,
                               static_cast<int32_t>(info.dtype[i]),
                               (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) ? 1 : 0});
    chunks += (info.numel[i] + chunk - 1) / chunk;
    elements += info.numel[i];
  }
  DeviceTable table;
  table.num_tensors = static_cast<int>(metas.size());
  table.total_chunks = chunks;
  if (metas.empty()) return table;
  check_not_capturing(op);
  const int64_t bytes = static_cast<int64_t>(metas.size() * sizeof(TensorMeta));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), metas.data(), bytes);
  table.storage = host.to(tensors.front().device(), /*non_blocking=*/true);
  table.metas = reinterpret_cast<const TensorMeta*>(table.storage.data_ptr());
  return table;
}

// Index of the tensor owning global chunk `chunk` (largest t with chunk_begin <= chunk).
__device__ __forceinline__ int find_tensor(const TensorMeta* metas, int num_tensors, int64_t chunk) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (metas[mid].chunk_begin <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Index of the tensor holding global element `index` (largest t with elem_begin <= index).
__device__ __forceinline__ int find_tensor_of_element(const TensorMeta* metas, int num_tensors, int64_t index) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (metas[mid].elem_begin <= index) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The key of element i of a tensor (scalar load).
__device__ __forceinline__ uint32_t key_at(const TensorMeta& m, int64_t i, bool nan_as_zero) {
  switch (static_cast<KeyDtype>(m.dtype)) {
    case KeyDtype::kFloat32:
      return key_from_fp32_bits(static_cast<const uint32_t*>(m.ptr)[i], nan_as_zero);
    case KeyDtype::kBFloat16:
      return key_from_bf16_bits(static_cast<const uint16_t*>(m.ptr)[i], nan_as_zero);
    default:
      return key_from_fp16_bits(static_cast<const uint16_t*>(m.ptr)[i], nan_as_zero);
  }
}

// Elements per 16-byte vector: 4 fp32 or 8 bf16/fp16.
template <KeyDtype D>
struct VecWidth {
  static constexpr int value = D == KeyDtype::kFloat32 ? 4 : 8;
};

// Loads the keys of elements [i, i + E) of a tensor (E = VecWidth); out-of-range elements get valid = false.
template <KeyDtype D>
__device__ __forceinline__ void load_keys(const TensorMeta& m, int64_t i, bool nan_as_zero,
                                          uint32_t (&keys)[VecWidth<D>::value], bool (&valid)[VecWidth<D>::value]) {
  constexpr int E = VecWidth<D>::value;
  if (m.vector_ok && i + E <= m.numel) {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const char*>(m.ptr) + i * (16 / E));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < E; ++j) {
      valid[j] = true;
      if constexpr (D == KeyDtype::kFloat32) {
        keys[j] = key_from_fp32_bits(w[j], nan_as_zero);
      } else {
        const uint16_t h = static_cast<uint16_t>(w[j / 2] >> (16 * (j % 2)));
        keys[j] = D == KeyDtype::kBFloat16 ? key_from_bf16_bits(h, nan_as_zero) : key_from_fp16_bits(h, nan_as_zero);
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int64_t idx = i + j;
    valid[j] = idx < m.numel;
    if (!valid[j]) {
      keys[j] = 0;
    } else if constexpr (D == KeyDtype::kFloat32) {
      keys[j] = key_from_fp32_bits(static_cast<const uint32_t*>(m.ptr)[idx], nan_as_zero);
    } else {
      const uint16_t h = static_cast<const uint16_t*>(m.ptr)[idx];
      keys[j] = D == KeyDtype::kBFloat16 ? key_from_bf16_bits(h, nan_as_zero) : key_from_fp16_bits(h, nan_as_zero);
    }
  }
}

// Launches `fn` with the KeyDtype of tensor meta `m` as a compile-time constant (uniform per chunk).
template <typename Fn>
__device__ __forceinline__ void dispatch_key_dtype(int32_t dtype, Fn&& fn) {
  switch (static_cast<KeyDtype>(dtype)) {
    case KeyDtype::kFloat32:
      fn(std::integral_constant<KeyDtype, KeyDtype::kFloat32>{});
      break;
    case KeyDtype::kBFloat16:
      fn(std::integral_constant<KeyDtype, KeyDtype::kBFloat16>{});
      break;
    case KeyDtype::kFloat16:
      fn(std::integral_constant<KeyDtype, KeyDtype::kFloat16>{});
      break;
  }
}

inline int multiprocessor_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace cuda
}  // namespace salun_ext
