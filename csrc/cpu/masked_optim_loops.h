// The per-tensor loops of the CPU masked steps, compiled once per instruction set: masked_optim_loops_default.cpp,
// _avx2.cpp and _avx512.cpp each include the same source (masked_optim_kernels.inc) under their own target, so the
// variants build in parallel; masked_optim.cpp picks one set at run time (pick_loops).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "salun_ext/mask_layout.h"
#include "salun_ext/optim_math.h"

// AVX2 and AVX-512 variants: x86-64 with GCC (its target pragmas); elsewhere only the baseline loops exist.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SALUN_EXT_X86_VARIANTS 1
#endif

namespace salun_ext::cpu_step {

// One work item of a step: elements [begin, end) of one tensor.
struct Work {
  int64_t tensor;
  int64_t begin;
  int64_t end;
  int64_t packed;      // compact steps: the packed state index of the item's first salient entry (else unused)
  int64_t packed_end;  // compact steps: one past the packed index of its last salient entry (else unused)
};

using SgdLoop = void (*)(at::ScalarType dtype, const Work& w, void* p, const void* g, void* buf,
                         const int32_t* words, const SgdScalars& s);
using AdamLoop = void (*)(at::ScalarType dtype, const Work& w, void* p, const void* g, void* m, void* v, void* vmax,
                          const int32_t* words, const AdamScalars& s);

struct StepLoops {
  SgdLoop sgd;
  AdamLoop adam;
  SgdLoop sgd_compact;
  AdamLoop adam_compact;
};

StepLoops loops_default();
#ifdef SALUN_EXT_X86_VARIANTS
StepLoops loops_avx2();    // call only where the CPU has AVX2
StepLoops loops_avx512();  // call only where the CPU has AVX-512 F, VL, BW and DQ
#endif

}  // namespace salun_ext::cpu_step
