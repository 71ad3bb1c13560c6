// The CPU step loops compiled for AVX2 (masked_optim_loops.h); used only where the CPU has it.
#include "masked_optim_loops.h"
#ifdef SALUN_EXT_X86_VARIANTS
#include <immintrin.h>  // compact state's permutes
#endif

#ifdef SALUN_EXT_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2")
#define SALUN_EXT_AVX2_PERMUTE 1  // compact steps expand / compress fp32 packed state with AVX2 permutes
namespace salun_ext::cpu_step {
namespace {
#include "masked_optim_kernels.inc"
}  // namespace
}  // namespace salun_ext::cpu_step
#undef SALUN_EXT_AVX2_PERMUTE
#pragma GCC pop_options

namespace salun_ext::cpu_step {
StepLoops loops_avx2() { return {&sgd_work, &adam_work, &sgd_compact_work, &adam_compact_work}; }
}  // namespace salun_ext::cpu_step
#endif
