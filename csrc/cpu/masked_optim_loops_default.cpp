// The CPU step loops for the baseline instruction set (masked_optim_loops.h).
#include "masked_optim_loops.h"

namespace salun_ext::cpu_step {
namespace {
#include "masked_optim_kernels.inc"
}  // namespace
}  // namespace salun_ext::cpu_step

namespace salun_ext::cpu_step {
StepLoops loops_default() { return {&sgd_work, &adam_work, &sgd_compact_work, &adam_compact_work}; }
}  // namespace salun_ext::cpu_step
