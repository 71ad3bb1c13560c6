// Argument checks of the masked optimizer step ops, shared by the CPU and CUDA launchers (same messages as the
// reference in salun_ext/_reference.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "salun_ext/mask_layout.h"

namespace salun_ext {

inline void check_step_list(const char* op, const char* list_name, at::TensorList params, at::TensorList values,
                            bool same_shape) {
  TORCH_CHECK(values.size() == params.size(), "salun_ext: ", op, ": argument '", list_name, "' has ", values.size(),
              " tensors, expected ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& t = values[i];
    if (same_shape) {
      TORCH_CHECK(t.sizes() == p.sizes(), "salun_ext: ", op, ": ", list_name, "[", i, "] has shape ", t.sizes(),
                  ", expected ", p.sizes());
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), "salun_ext: ", op, ": ", list_name, "[", i, "] has dtype ",
                  t.scalar_type(), ", expected ", p.scalar_type(), " (the parameter's)");
      TORCH_CHECK(t.is_contiguous(), "salun_ext: ", op, ": ", list_name, "[", i, "] must be contiguous");
    }
    TORCH_CHECK(t.device() == p.device(), "salun_ext: ", op, ": ", list_name, "[", i, "] is on ", t.device(),
                ", expected ", p.device());
  }
}

inline void check_step_params(const char* op, at::TensorList params, at::TensorList mask_words) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "salun_ext: ", op, ": params[",
                i, "] has dtype ", dtype, ", expected float32, bfloat16 or float16");
    TORCH_CHECK(p.is_contiguous(), "salun_ext: ", op, ": params[", i, "] must be contiguous");
    TORCH_CHECK(p.device() == params[0].device(), "salun_ext: ", op, ": params[", i, "] is on ", p.device(),
                ", expected ", params[0].device());
  }
  TORCH_CHECK(mask_words.size() == params.size(), "salun_ext: ", op, ": argument 'mask_words' has ",
              mask_words.size(), " tensors, expected ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = mask_words[i];
    const int64_t expected = mask_segment_words(params[i].numel());
    TORCH_CHECK(w.scalar_type() == at::kInt && (w.numel() == 0 || w.numel() == expected), "salun_ext: ", op,
                ": mask_words[", i, "] must be int32 with 0 or ", expected, " words, got ", w.scalar_type(), " with ",
                w.numel());
    TORCH_CHECK(w.numel() == 0 || (w.device() == params[i].device() && w.is_contiguous()), "salun_ext: ", op,
                ": mask_words[", i, "] must be contiguous on ", params[i].device());
  }
}

// The tensor lists of masked_sgd_ (both devices check these before anything else).
inline void check_sgd_lists(const char* op, at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, at::TensorList mask_words, bool has_momentum) {
  check_step_params(op, params, mask_words);
  check_step_list(op, "grads", params, grads, /*same_shape=*/true);
  if (has_momentum) check_step_list(op, "momentum_buffers", params, momentum_buffers, /*same_shape=*/true);
}

// The tensor lists of masked_adam_ (each device then checks the step counts the way it reads them).
inline void check_adam_lists(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             at::TensorList mask_words, bool amsgrad) {
  check_step_params(op, params, mask_words);
  check_step_list(op, "grads", params, grads, /*same_shape=*/true);
  check_step_list(op, "exp_avgs", params, exp_avgs, /*same_shape=*/true);
  check_step_list(op, "exp_avg_sqs", params, exp_avg_sqs, /*same_shape=*/true);
  if (amsgrad) check_step_list(op, "max_exp_avg_sqs", params, max_exp_avg_sqs, /*same_shape=*/true);
  check_step_list(op, "state_steps", params, state_steps, /*same_shape=*/false);
}

// A list of compact state tensors: values[i] is 1-D and holds one entry per salient element of params[i], with
// params[i]'s dtype and device. counts: the salient counts (the CPU launcher counts the mask bits); nullptr checks
// only numel <= params[i].numel() (the CUDA launcher: counting would need a host sync; its kernel bounds-checks).
inline void check_packed_list(const char* op, const char* list_name, at::TensorList params, at::TensorList values,
                              const int64_t* counts) {
  TORCH_CHECK(values.size() == params.size(), "salun_ext: ", op, ": argument '", list_name, "' has ", values.size(),
              " tensors, expected ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& t = values[i];
    const bool ok = t.dim() == 1 && (counts != nullptr ? t.numel() == counts[i] : t.numel() <= p.numel());
    TORCH_CHECK(ok, "salun_ext: ", op, ": ", list_name, "[", i, "] has shape ", t.sizes(), ", expected (",
                counts != nullptr ? std::to_string(counts[i]) : std::string("<= ") + std::to_string(p.numel()),
                ",) (one entry per salient element of params[", i, "])");
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "salun_ext: ", op, ": ", list_name, "[", i, "] has dtype ",
                t.scalar_type(), ", expected ", p.scalar_type(), " (the parameter's)");
    TORCH_CHECK(t.is_contiguous(), "salun_ext: ", op, ": ", list_name, "[", i, "] must be contiguous");
    TORCH_CHECK(t.device() == p.device(), "salun_ext: ", op, ": ", list_name, "[", i, "] is on ", t.device(),
                ", expected ", p.device());
  }
}

// The tensor lists of masked_sgd_compact_ / masked_adam_compact_ (dense grads, compact state); call after
// check_step_params (the counts come from the checked mask words).
inline void check_sgd_compact_lists(const char* op, at::TensorList params, at::TensorList grads,
                                    at::TensorList momentum_buffers, bool has_momentum, const int64_t* counts) {
  check_step_list(op, "grads", params, grads, /*same_shape=*/true);
  if (has_momentum) check_packed_list(op, "momentum_buffers", params, momentum_buffers, counts);
}

inline void check_adam_compact_lists(const char* op, at::TensorList params, at::TensorList grads,
                                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList max_exp_avg_sqs, at::TensorList state_steps, bool amsgrad,
                                     const int64_t* counts) {
  check_step_list(op, "grads", params, grads, /*same_shape=*/true);
  check_packed_list(op, "exp_avgs", params, exp_avgs, counts);
  check_packed_list(op, "exp_avg_sqs", params, exp_avg_sqs, counts);
  if (amsgrad) check_packed_list(op, "max_exp_avg_sqs", params, max_exp_avg_sqs, counts);
  // (without counts, the CUDA kernel bounds every packed index by exp_avgs[i]'s length: the others must match it)
  for (size_t i = 0; i < params.size(); ++i) {
    const bool same = exp_avg_sqs[i].numel() == exp_avgs[i].numel() &&
                      (!amsgrad || max_exp_avg_sqs[i].numel() == exp_avgs[i].numel());
    TORCH_CHECK(same, "salun_ext: ", op, ": exp_avgs[", i, "], exp_avg_sqs[", i,
                "] (and max_exp_avg_sqs) must have the same length (one entry per salient element of params[", i,
                "])");
  }
  check_step_list(op, "state_steps", params, state_steps, /*same_shape=*/false);
}

inline void check_scalar_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, "salun_ext: ", op, ": argument '", name, "' must hold one value, got ", t->numel());
  TORCH_CHECK(t->device() == device || t->device().is_cpu(), "salun_ext: ", op, ": argument '", name, "' is on ",
              t->device(), ", expected ", device);
}

}  // namespace salun_ext
