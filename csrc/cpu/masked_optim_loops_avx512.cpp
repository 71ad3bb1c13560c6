// The CPU step loops compiled for AVX-512 (masked_optim_loops.h); used only where the CPU has it.
#include "masked_optim_loops.h"
#ifdef SALUN_EXT_X86_VARIANTS
#include <immintrin.h>  // compact state's expand / compress
#endif

#ifdef SALUN_EXT_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq")
#define SALUN_EXT_EXPAND_COMPRESS 1  // compact steps stage fp32 salient entries with AVX-512 compress / expand
namespace salun_ext::cpu_step {
namespace {
#include "masked_optim_kernels.inc"
}  // namespace
}  // namespace salun_ext::cpu_step
#undef SALUN_EXT_EXPAND_COMPRESS
#pragma GCC pop_options

namespace salun_ext::cpu_step {
StepLoops loops_avx512() { return {&sgd_work, &adam_work, &sgd_compact_work, &adam_compact_work}; }
}  // namespace salun_ext::cpu_step
#endif
