// Named argument checks: every failure names the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define SALUN_CHECK_ARG(cond, arg, ...) TORCH_CHECK((cond), "salun_ext: argument '", arg, "': ", __VA_ARGS__)

#define SALUN_CHECK_DEVICE(t, device, name)                                                                  \
  TORCH_CHECK((t).device() == (device), "salun_ext: ", name, " is on ", (t).device(), ", expected ", (device))

#define SALUN_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), "salun_ext: ", name, " must be contiguous (call .contiguous() first)")

#define SALUN_CHECK_DTYPE(t, dtype, name) \
  TORCH_CHECK((t).scalar_type() == (dtype), "salun_ext: ", name, " has dtype ", (t).scalar_type(), ", expected ", (dtype))

namespace salun_ext {

// Gradient lists: fp32, bf16 or fp16, one device, contiguous.
inline void check_key_tensor(const at::Tensor& t, int64_t index, const c10::Device& device) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "salun_ext: grads[", index,
              "] has dtype ", dtype, ", expected float32, bfloat16 or float16");
  TORCH_CHECK(t.device() == device, "salun_ext: grads[", index, "] is on ", t.device(), ", expected ", device,
              " (all tensors of one list must share a device)");
  TORCH_CHECK(t.is_contiguous(), "salun_ext: grads[", index, "] must be contiguous");
}

}  // namespace salun_ext
