// Argument checks shared by the CPU and CUDA bindings. Every message names the
// argument and states what was expected, so a user can fix the call site.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdint>
#include <string>
#include <type_traits>

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

// Raised by a kernel's CPU path when a data-dependent check fails
// (NaN logits, malformed tree). CUDA paths never sync to raise; they write
// the documented sentinel values instead.
#define HX_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
