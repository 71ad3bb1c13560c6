// CPU kernels of the exact global saliency select (schemas and reference: salun_ext/_ops.py, _reference.py).
//
//   key_histogram: one read of every tensor; per thread a private histogram of one key digit, restricted to the
//                  elements whose higher digits equal one of the given prefixes (one row per prefix, so several
//                  ratios share a pass). The Python driver (salun_ext/saliency.py) walks the digits from the top.
//   mask_words:    one read; writes the bit-packed mask (layout: mask_layout.h). Elements with key > threshold
//                  are salient; ties at the threshold are all salient (tie_limit < 0) or only the first
//                  tie_limit of them in global index order (exact-k mode), which needs per-chunk tie counts first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "salun_ext/cpu_isa.h"
#include "salun_ext/key.h"
#include "salun_ext/sample_index.h"
#include "salun_ext/tensor_list.h"

namespace salun_ext {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work item; a multiple of 32 (mask words never split)
static_assert(kChunk % kBitsPerWord == 0, "chunks must hold whole mask words");

struct Chunk {
  int32_t tensor;
  int64_t begin;  // element offset inside the tensor
  int64_t end;
};

std::vector<Chunk> make_chunks(const TensorListInfo& info) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < info.numel.size(); ++i) {
    for (int64_t b = 0; b < info.numel[i]; b += kChunk) {
      chunks.push_back(Chunk{static_cast<int32_t>(i), b, std::min(info.numel[i], b + kChunk)});
    }
  }
  return chunks;
}

// Chunks per parallel task: about 2^15 elements each (ATen's GRAIN_SIZE), so a list of many small tensors runs on
// one thread instead of waking the pool for a few microseconds of work (the split never changes a result).
int64_t chunk_grain(const std::vector<Chunk>& chunks) {
  int64_t elements = 0;
  for (const Chunk& ch : chunks) elements += ch.end - ch.begin;
  const int64_t items = static_cast<int64_t>(chunks.size());
  if (elements <= 0) return std::max<int64_t>(items, 1);
  return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(items) * (int64_t{1} << 15) / elements));
}

// Reads element i of a tensor's raw storage as a key. One instantiation per dtype keeps the inner loops free of
// dtype branches.
template <KeyDtype D>
struct KeyReader;

template <>
struct KeyReader<KeyDtype::kFloat32> {
  const uint32_t* p;
  bool nan_as_zero;
  uint32_t operator()(int64_t i) const { return key_from_fp32_bits(p[i], nan_as_zero); }
};

template <>
struct KeyReader<KeyDtype::kBFloat16> {
  const uint16_t* p;
  bool nan_as_zero;
  uint32_t operator()(int64_t i) const { return key_from_bf16_bits(p[i], nan_as_zero); }
};

template <>
struct KeyReader<KeyDtype::kFloat16> {
  const uint16_t* p;
  bool nan_as_zero;
  uint32_t operator()(int64_t i) const { return key_from_fp16_bits(p[i], nan_as_zero); }
};

// Calls fn(reader) with the KeyReader matching the tensor's dtype.
template <typename Fn>
void with_key_reader(const at::Tensor& t, KeyDtype dtype, bool nan_as_zero, Fn&& fn) {
  const void* data = t.data_ptr();
  switch (dtype) {
    case KeyDtype::kFloat32:
      fn(KeyReader<KeyDtype::kFloat32>{static_cast<const uint32_t*>(data), nan_as_zero});
      break;
    case KeyDtype::kBFloat16:
      fn(KeyReader<KeyDtype::kBFloat16>{static_cast<const uint16_t*>(data), nan_as_zero});
      break;
    case KeyDtype::kFloat16:
      fn(KeyReader<KeyDtype::kFloat16>{static_cast<const uint16_t*>(data), nan_as_zero});
      break;
  }
}

at::Tensor key_histogram_cpu(const std::vector<at::Tensor>& grads, int64_t low_bit, int64_t num_bits,
                             const std::vector<int64_t>& prefixes, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  const DigitSpec spec = make_digit_spec(low_bit, num_bits, /*max_bits=*/16);
  check_prefixes(prefixes, spec);
  const int64_t rows = static_cast<int64_t>(prefixes.size());
  const int64_t bins = int64_t{1} << num_bits;
  const std::vector<Chunk> chunks = make_chunks(info);

  // Private histograms per thread, summed at the end: no atomics in the hot loop.
  const int num_threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(num_threads, std::vector<int64_t>(rows * bins, 0));
  const uint32_t shift = static_cast<uint32_t>(low_bit);
  const uint32_t prefix_shift = static_cast<uint32_t>(spec.prefix_shift);
  const uint32_t digit_mask = spec.digit_mask;
  std::vector<uint32_t> prefix_u32(prefixes.begin(), prefixes.end());

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks), [&](int64_t first, int64_t last) {
    int64_t* hist = local[at::get_thread_num()].data();
    for (int64_t c = first; c < last; ++c) {
      const Chunk& ch = chunks[c];
      with_key_reader(grads[ch.tensor], info.dtype[ch.tensor], nan_as_zero, [&](auto key_of) {
        if (rows == 1) {
          const uint32_t want = prefix_u32[0];
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            const uint32_t key = key_of(i);
            if ((key >> prefix_shift) == want) ++hist[(key >> shift) & digit_mask];
          }
        } else {
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            const uint32_t key = key_of(i);
            const uint32_t hi = key >> prefix_shift;
            const int64_t bin = (key >> shift) & digit_mask;
            for (int64_t r = 0; r < rows; ++r) {
              if (hi == prefix_u32[r]) ++hist[r * bins + bin];
            }
          }
        }
      });
    }
  });

  at::Tensor out = at::zeros({rows, bins}, grads.front().options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  for (const auto& h : local) {
    for (int64_t j = 0; j < rows * bins; ++j) dst[j] += h[j];
  }
  return out;
}

// How ties at the threshold are treated inside one chunk.
enum class TieRule { kNone, kAll, kPartial };

template <typename KeyOf>
void write_chunk_words(KeyOf key_of, const Chunk& ch, uint32_t threshold, TieRule rule, int64_t ties_before,
                       int64_t tie_limit, uint32_t* words) {
  int64_t rank = ties_before;
  for (int64_t base = ch.begin; base < ch.end; base += kBitsPerWord) {
    const int64_t n = std::min<int64_t>(kBitsPerWord, ch.end - base);
    uint32_t word = 0;
    if (rule == TieRule::kPartial) {
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t key = key_of(base + j);
        bool take = key > threshold;
        if (key == threshold) take = rank++ < tie_limit;
        word |= static_cast<uint32_t>(take) << j;
      }
    } else {
      const uint32_t bound = rule == TieRule::kAll ? threshold : threshold + 1u;  // key >= bound
      for (int64_t j = 0; j < n; ++j) word |= static_cast<uint32_t>(key_of(base + j) >= bound) << j;
    }
    words[base / kBitsPerWord] = word;
  }
}

at::Tensor mask_words_cpu(const std::vector<at::Tensor>& grads, int64_t threshold_key, int64_t tie_limit,
                          bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(threshold_key >= 0 && threshold_key <= static_cast<int64_t>(kNanKey), "threshold_key",
                  "expected a 31-bit key in [0, 0x7FFFFFFF], got ", threshold_key);
  const uint32_t threshold = static_cast<uint32_t>(threshold_key);
  const std::vector<Chunk> chunks = make_chunks(info);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());

  // Exact-k with a partial tie quota: the rank of a tie in global order needs the tie count of every earlier
  // chunk (one extra read, only in this case). Chunks whose ties all fall inside or outside the quota need no
  // ranking; only the chunk that straddles the quota is ranked element by element.
  const bool partial = tie_limit > 0;
  std::vector<int64_t> ties_before(num_chunks, 0);
  std::vector<int64_t> ties_through(num_chunks, 0);
  if (partial) {
    at::parallel_for(0, num_chunks, chunk_grain(chunks), [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const Chunk& ch = chunks[c];
        with_key_reader(grads[ch.tensor], info.dtype[ch.tensor], nan_as_zero, [&](auto key_of) {
          int64_t count = 0;
          for (int64_t i = ch.begin; i < ch.end; ++i) count += key_of(i) == threshold;
          ties_through[c] = count;
        });
      }
    });
    int64_t running = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      ties_before[c] = running;
      running += ties_through[c];
      ties_through[c] = running;
    }
  }

  at::Tensor out = at::zeros({info.total_words}, grads.front().options().dtype(at::kInt));
  uint32_t* words = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, num_chunks, chunk_grain(chunks), [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& ch = chunks[c];
      TieRule rule = tie_limit < 0 ? TieRule::kAll : TieRule::kNone;
      if (partial) {
        if (ties_before[c] >= tie_limit) {
          rule = TieRule::kNone;
        } else if (ties_through[c] <= tie_limit) {
          rule = TieRule::kAll;
        } else {
          rule = TieRule::kPartial;
        }
      }
      uint32_t* tensor_words = words + info.word_offset[ch.tensor];
      with_key_reader(grads[ch.tensor], info.dtype[ch.tensor], nan_as_zero, [&](auto key_of) {
        write_chunk_words(key_of, ch, threshold, rule, ties_before[c], tie_limit, tensor_words);
      });
    }
  });
  return out;
}

at::Tensor sample_keys_cpu(const std::vector<at::Tensor>& grads, int64_t num_samples, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(num_samples >= 1, "num_samples", "expected >= 1, got ", num_samples);
  const int64_t total = info.total_elements;
  const int64_t count = std::min(num_samples, total);
  at::Tensor out = at::empty({count}, grads.front().options().dtype(at::kInt));
  int32_t* dst = out.data_ptr<int32_t>();
  size_t t = 0;
  int64_t start = 0;  // global index of tensor t's first element
  for (int64_t i = 0; i < count; ++i) {
    const int64_t index = sample_index(i, total, count);  // increasing in i: walk the tensors once
    while (index >= start + info.numel[t]) start += info.numel[t++];
    with_key_reader(grads[t], info.dtype[t], nan_as_zero,
                    [&](auto key_of) { dst[i] = static_cast<int32_t>(key_of(index - start)); });
  }
  return out;
}

// What one chunk of the window select found: counts, and the in-window candidates in global order.
struct WindowChunk {
  int64_t above = 0, inside = 0, nan = 0;
  std::vector<uint32_t> keys;
  std::vector<int64_t> pos;
};

// Bit j of each mask describes element j of one mask word: key > hi, lo <= key <= hi, key is NaN.
struct WordMasks {
  uint32_t above = 0, inside = 0, nan = 0;
};

// Files one word's masks into the chunk result: counts, the mask word (every bit above hi) and the candidates.
inline void record_word(const WordMasks& m, const uint32_t* keys, int64_t global_word, bool count_nan,
                        WindowChunk& r, uint32_t* word_out) {
  if (count_nan) r.nan += __builtin_popcount(m.nan);
  for (uint32_t bits = m.inside; bits != 0; bits &= bits - 1) {
    const int j = __builtin_ctz(bits);
    r.keys.push_back(keys[j]);
    r.pos.push_back(global_word * kBitsPerWord + j);
  }
  r.above += __builtin_popcount(m.above);
  *word_out = m.above;
}

template <typename KeyOf>
WordMasks scan_word(KeyOf key_of, int64_t base, int64_t n, uint32_t lo, uint32_t hi, uint32_t* keys) {
  WordMasks m;
  for (int64_t j = 0; j < n; ++j) keys[j] = key_of(base + j);
  for (int64_t j = 0; j < n; ++j) {
    m.above |= static_cast<uint32_t>(keys[j] > hi) << j;
    m.inside |= static_cast<uint32_t>(keys[j] >= lo && keys[j] <= hi) << j;
    m.nan |= static_cast<uint32_t>(keys[j] == kNanKey) << j;
  }
  return m;
}

template <typename KeyOf>
void window_chunk_scalar(KeyOf key_of, const Chunk& ch, uint32_t lo, uint32_t hi, bool count_nan, int64_t word_base,
                         WindowChunk& r, uint32_t* words) {
  for (int64_t base = ch.begin; base < ch.end; base += kBitsPerWord) {
    uint32_t keys[kBitsPerWord];
    const WordMasks m = scan_word(key_of, base, std::min<int64_t>(kBitsPerWord, ch.end - base), lo, hi, keys);
    const int64_t w = word_base + base / kBitsPerWord;
    record_word(m, keys, w, count_nan, r, words + w);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SALUN_EXT_WINDOW_AVX2 1
// The window select's whole cost is the classification of each key against [lo, hi]: with AVX2 one instruction
// compares 8 keys and a movemask packs their bits, instead of 32 scalar compares and shifts per word (the
// baseline build targets SSE2). Integer compares only, so every ISA gives the same bits. Keys are 31-bit, so the
// signed compares of AVX2 order them as unsigned.
#define SALUN_EXT_AVX2_TARGET __attribute__((target("avx2,f16c,popcnt,bmi")))

SALUN_EXT_AVX2_TARGET inline __m256i load8_magnitudes(const KeyReader<KeyDtype::kFloat32>& r, int64_t i) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.p + i));
}
SALUN_EXT_AVX2_TARGET inline __m256i load8_magnitudes(const KeyReader<KeyDtype::kBFloat16>& r, int64_t i) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p + i));
  return _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
}
SALUN_EXT_AVX2_TARGET inline __m256i load8_magnitudes(const KeyReader<KeyDtype::kFloat16>& r, int64_t i) {
  // F16C converts exactly (denormals included), as fp16_magnitude_to_fp32_bits does; NaN payloads differ, but every
  // NaN becomes one canonical key below.
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p + i));
  return _mm256_castps_si256(_mm256_cvtph_ps(half));
}

template <typename Reader>
SALUN_EXT_AVX2_TARGET WordMasks scan_word_avx2(const Reader& key_of, int64_t base, uint32_t lo, uint32_t hi,
                                               uint32_t* keys) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf = _mm256_set1_epi32(static_cast<int32_t>(kInfKey));
  const __m256i nan_key = _mm256_set1_epi32(key_of.nan_as_zero ? 0 : static_cast<int32_t>(kNanKey));
  const __m256i nan_canonical = _mm256_set1_epi32(static_cast<int32_t>(kNanKey));
  const __m256i hi_v = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const __m256i below_lo = _mm256_set1_epi32(static_cast<int32_t>(lo) - 1);  // key >= lo <=> key > lo - 1
  WordMasks m;
  for (int q = 0; q < 4; ++q) {
    __m256i key = _mm256_and_si256(load8_magnitudes(key_of, base + 8 * q), magnitude);
    key = _mm256_blendv_epi8(key, nan_key, _mm256_cmpgt_epi32(key, inf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + 8 * q), key);
    const __m256i above = _mm256_cmpgt_epi32(key, hi_v);
    const __m256i inside = _mm256_andnot_si256(above, _mm256_cmpgt_epi32(key, below_lo));
    const __m256i nan = _mm256_cmpeq_epi32(key, nan_canonical);
    const int shift = 8 * q;
    m.above |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(above))) << shift;
    m.inside |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(inside))) << shift;
    m.nan |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(nan))) << shift;
  }
  return m;
}

template <typename Reader>
SALUN_EXT_AVX2_TARGET void window_chunk_avx2(const Reader& key_of, const Chunk& ch, uint32_t lo, uint32_t hi,
                                             bool count_nan, int64_t word_base, WindowChunk& r, uint32_t* words) {
  int64_t base = ch.begin;
  for (; base + kBitsPerWord <= ch.end; base += kBitsPerWord) {
    alignas(32) uint32_t keys[kBitsPerWord];
    const WordMasks m = scan_word_avx2(key_of, base, lo, hi, keys);
    const int64_t w = word_base + base / kBitsPerWord;
    if ((m.inside | m.nan) == 0) {  // the common word: nothing to record but the mask bits
      r.above += _mm_popcnt_u32(m.above);
      words[w] = m.above;
    } else {
      record_word(m, keys, w, count_nan, r, words + w);
    }
  }
  if (base < ch.end) window_chunk_scalar(key_of, Chunk{ch.tensor, base, ch.end}, lo, hi, count_nan, word_base, r, words);
}

bool window_avx2_available() {
  static const bool available = [] {
    if (forced_cpu_isa() == "default") return false;  // the baseline loops, forced (tests)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt") &&
           __builtin_cpu_supports("bmi");
  }();
  return available;
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_select_cpu(const std::vector<at::Tensor>& grads,
                                                                              int64_t lo_key, int64_t hi_key,
                                                                              int64_t capacity, bool nan_as_zero) {
  const TensorListInfo info = describe_tensor_list(grads);
  SALUN_CHECK_ARG(0 <= lo_key && lo_key <= hi_key && hi_key <= static_cast<int64_t>(kNanKey), "lo_key, hi_key",
                  "expected 0 <= lo_key <= hi_key <= 0x7FFFFFFF, got ", lo_key, ", ", hi_key);
  SALUN_CHECK_ARG(capacity >= 0, "capacity", "expected >= 0, got ", capacity);
  const uint32_t lo = static_cast<uint32_t>(lo_key), hi = static_cast<uint32_t>(hi_key);
  const std::vector<Chunk> chunks = make_chunks(info);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  at::Tensor words_t = at::zeros({info.total_words}, grads.front().options().dtype(at::kInt));
  uint32_t* words = reinterpret_cast<uint32_t*>(words_t.data_ptr<int32_t>());
#ifdef SALUN_EXT_WINDOW_AVX2
  const bool avx2 = window_avx2_available();
#endif

  // Per-chunk candidate lists, concatenated in chunk order at the end: candidates come out in global order.
  std::vector<WindowChunk> results(num_chunks);
  // Once the window is known to overflow `capacity` the caller falls back to the histogram path, so candidate
  // lists are dropped from then on: memory stays bounded whatever the window holds.
  std::atomic<int64_t> collected{0};
  at::parallel_for(0, num_chunks, chunk_grain(chunks), [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& ch = chunks[c];
      WindowChunk& r = results[c];
      const int64_t word_base = info.word_offset[ch.tensor];
      with_key_reader(grads[ch.tensor], info.dtype[ch.tensor], nan_as_zero, [&](auto key_of) {
#ifdef SALUN_EXT_WINDOW_AVX2
        if (avx2) {
          window_chunk_avx2(key_of, ch, lo, hi, !nan_as_zero, word_base, r, words);
          return;
        }
#endif
        window_chunk_scalar(key_of, ch, lo, hi, !nan_as_zero, word_base, r, words);
      });
      r.inside = static_cast<int64_t>(r.keys.size());
      if (collected.fetch_add(r.inside) + r.inside > capacity) {
        std::vector<uint32_t>().swap(r.keys);
        std::vector<int64_t>().swap(r.pos);
      }
    }
  });

  at::Tensor counts = at::zeros({3}, grads.front().options().dtype(at::kLong));
  at::Tensor cand_keys = at::zeros({capacity}, grads.front().options().dtype(at::kInt));
  at::Tensor cand_pos = at::zeros({capacity}, grads.front().options().dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  int32_t* out_keys = cand_keys.data_ptr<int32_t>();
  int64_t* out_pos = cand_pos.data_ptr<int64_t>();
  for (const WindowChunk& r : results) {
    const int64_t kept = static_cast<int64_t>(r.keys.size());
    for (int64_t j = 0; j < kept && cnt[1] + j < capacity; ++j) {
      out_keys[cnt[1] + j] = static_cast<int32_t>(r.keys[j]);
      out_pos[cnt[1] + j] = r.pos[j];
    }
    cnt[0] += r.above;
    cnt[1] += r.inside;
    cnt[2] += r.nan;
  }
  return {words_t, counts, cand_keys, cand_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(salun_ext, CPU, m) {
  m.impl("key_histogram", &key_histogram_cpu);
  m.impl("mask_words", &mask_words_cpu);
  m.impl("sample_keys", &sample_keys_cpu);
  m.impl("window_select", &window_select_cpu);
}

}  // namespace salun_ext
