// Argument checks shared by the CPU and CUDA bindings. Every message names the
// argument and states what was expected, so a user can fix the call site. The
// fakes (heterospec_ext/ops/_fake_checks.py: check_tensor) word theirs alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <type_traits>

#include "core/macros.h"

namespace heterospec {

// "[2, 64, 128256]": shapes for error messages, formatted here rather than by
// streaming c10::IntArrayRef. On the H200 device image (torch 2.11), CUDA calls
// whose check message streamed an IntArrayRef died with SIGSEGV while dtype
// messages (no IntArrayRef) raised normally; see bench/RESULTS.md.
inline std::string hx_shape(c10::IntArrayRef shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

inline std::string hx_shape(const at::Tensor& t) {
  std::string text = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(t.size(i));
  }
  return text + "]";
}

// The shortest decimal text that reads back as exactly `value` (std::to_chars):
// "1.0000001" where the default 6-digit stream prints "1", so a message shows
// why a value next to a bound was rejected. "nan", "inf" and "-inf" as such.
template <typename T, typename = std::enable_if_t<std::is_floating_point_v<T>>>
inline std::string hx_value(T value) {
  char text[64];
  const std::to_chars_result end = std::to_chars(text, text + sizeof(text), value);
  return std::string(text, end.ptr);
}

}  // namespace heterospec

#define HX_CHECK_DIM(t, n)                                                      \
  TORCH_CHECK((t).dim() == (n), #t " must be a " #n "-D tensor, got ",          \
              (t).dim(), "-D with shape ", ::heterospec::hx_shape(t))

#define HX_CHECK_DTYPE(t, dt)                                                   \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt),          \
              ", got ", (t).scalar_type())

#define HX_CHECK_SIZE(t, d, n)                                                  \
  TORCH_CHECK((t).size(d) == (n), #t ".size(" #d ") must be ", (n), ", got ",   \
              (t).size(d), " (shape ", ::heterospec::hx_shape(t), ")")

#define HX_CHECK_SAME_DEVICE(a, b)                                              \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b                       \
              " must be on the same device, got ", (a).device(), " and ",       \
              (b).device())

#define HX_CHECK_LOGIT_DTYPE(t)                                                 \
  TORCH_CHECK((t).scalar_type() == at::kFloat ||                                \
                  (t).scalar_type() == at::kHalf ||                             \
                  (t).scalar_type() == at::kBFloat16,                           \
              #t " must be float32, float16 or bfloat16, got ",                 \
              (t).scalar_type())

namespace heterospec {

// The check of every preallocated output of an _out op, in the order of the
// fakes' check_tensor: rank, dtype, each size, the device of `input` (the
// input the op allocates its functional outputs next to) and, unless the op
// copies results back into strided buffers, a contiguous layout.
inline void check_output(const at::Tensor& out, const char* name, at::ScalarType dtype,
                         at::IntArrayRef sizes, const at::Tensor& input,
                         const char* input_name, bool must_be_contiguous = true) {
  const int64_t rank = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(out.dim() == rank, name, " must be a ", rank, "-D tensor, got ", out.dim(),
              "-D with shape ", hx_shape(out));
  TORCH_CHECK(out.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              out.scalar_type());
  for (int64_t d = 0; d < rank; ++d) {
    TORCH_CHECK(out.size(d) == sizes[d], name, ".size(", d, ") must be ", sizes[d], ", got ",
                out.size(d), " (shape ", hx_shape(out), ")");
  }
  TORCH_CHECK(out.device() == input.device(), name, " and ", input_name,
              " must be on the same device, got ", out.device(), " and ", input.device());
  TORCH_CHECK(!must_be_contiguous || out.is_contiguous(), name, " must be contiguous");
}

// The torch-free launchers' name for a logit dtype. Call it after
// HX_CHECK_LOGIT_DTYPE: every op checks its logits' dtype first, so the error
// below is unreachable through the ops and only guards new call sites.
inline core::LogitDType logit_dtype(const at::Tensor& logits, const char* name) {
  switch (logits.scalar_type()) {
    case at::kFloat: return core::LogitDType::kFloat32;
    case at::kHalf: return core::LogitDType::kFloat16;
    case at::kBFloat16: return core::LogitDType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
}

}  // namespace heterospec

// Raised by a kernel's CPU path when a data-dependent check fails
// (NaN logits, malformed tree). CUDA paths never sync to raise; they write
// the documented sentinel values instead.
#define HX_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
