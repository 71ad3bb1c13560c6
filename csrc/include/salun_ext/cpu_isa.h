// The instruction set a test forces on the CPU kernels: SALUN_EXT_CPU_ISA=default|avx2|avx512 (unset: the best
// the CPU supports). Read in one place so that every op accepts and rejects the same values.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace salun_ext {

// The forced instruction set, or "" when none is forced; any other value is refused by name.
inline std::string forced_cpu_isa() {
  const char* forced = std::getenv("SALUN_EXT_CPU_ISA");
  const std::string want = forced ? forced : "";
  TORCH_CHECK(want.empty() || want == "default" || want == "avx2" || want == "avx512",
              "salun_ext: SALUN_EXT_CPU_ISA must be default, avx2 or avx512, got ", want);
  return want;
}

}  // namespace salun_ext
