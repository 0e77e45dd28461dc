// Internal: the C++ side of the rules table (rules.h, generated from src/rnnloss/rules.py) — every
// message is one of its templates, filled by rules::format with arguments written as Python writes
// them — and the checks that CTRNN, RNNLoss and rnnloss::load share.
#pragma once

#include "rules.h"

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace rnnloss {
namespace detail {

/// The three weight layers in CTRNNOptions' order, as per-layer messages and the mask buffers
/// (sparsity_input, sign_hidden, plasticity_readout, ...) name them.
inline constexpr const char* kLayers[3] = {"input", "hidden", "readout"};

/// `torch.float32` etc., as Python prints a dtype.
std::string dtype_name(c10::ScalarType dtype);
/// `[2, 3]`, as Python prints a list of ints.
std::string int_list(c10::IntArrayRef values);
/// A double as Python's repr(float) writes it: 0.1, 100.0, 1e-05, inf, nan.
std::string py_float(double value);
/// A string as Python's repr(str) writes it: 'gelu' (quotes and escapes as Python chooses them).
std::string py_str(const std::string& value);
/// ['a', 'b'], as Python prints a list of strings.
std::string py_str_list(const std::vector<std::string>& values);

/// One argument of a message, as Python's code formats it: strings as they are (the caller writes
/// a repr where Python uses one), integers in decimal, doubles as repr(float), shapes and int lists
/// as [2, 3], devices as cpu / cuda:0, dtypes as torch.float32.
template <class T>
std::string text(const T& value) {
  using U = std::decay_t<T>;
  if constexpr (std::is_same_v<U, bool>) {
    return value ? "True" : "False";
  } else if constexpr (std::is_integral_v<U>) {
    return std::to_string(value);
  } else if constexpr (std::is_floating_point_v<U>) {
    return py_float(static_cast<double>(value));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return std::string(std::string_view(value));
  } else if constexpr (std::is_same_v<U, c10::Device>) {
    return value.str();
  } else if constexpr (std::is_same_v<U, c10::ScalarType>) {
    return dtype_name(value);
  } else {
    return int_list(c10::IntArrayRef(value));
  }
}

}  // namespace detail

namespace rules {

/// `tmpl` (a rules.h message) with each `{}` replaced, in order, by the next of `args`.
std::string fill(const char* tmpl, const std::vector<std::string>& args);

template <class... Args>
std::string format(const char* tmpl, const Args&... args) {
  return fill(tmpl, {detail::text(args)...});
}

/// Throw `message` as the exception the rule `tmpl` raises: c10::TypeError for the rules Python
/// raises as TypeError, c10::ValueError for every other.
[[noreturn]] void raise_message(const char* tmpl, const std::string& message);

template <class... Args>
[[noreturn]] void raise(const char* tmpl, const Args&... args) {
  raise_message(tmpl, format(tmpl, args...));
}

}  // namespace rules

/// Raise rule `tmpl` (a rules.h constant), filled with the arguments, unless `cond` holds; the
/// arguments are evaluated only when it does not.
#define RNNLOSS_CHECK(cond, tmpl, ...)                              \
  do {                                                              \
    if (C10_UNLIKELY(!(cond))) {                                    \
      ::rnnloss::rules::raise(tmpl __VA_OPT__(, ) __VA_ARGS__);     \
    }                                                               \
  } while (0)

namespace detail {

/// What is wrong with `value` as a λ ("" when nothing): "NaN", "a negative value" or "a value
/// beyond float32's range" (Python's rules.lambda_problem: words, the same in every runtime).
const char* lambda_problem(double value);
/// LAMBDA_VALUE for a value that is not a λ, LAMBDA_INACTIVE for a non-zero λ of an inactive
/// component (Python's rules.check_lambda); `name` as the message names the λ.
void check_lambda(const std::string& name, double value, bool active, const std::string& component);
/// "lambdas[I] ('NAME')": entry `index` of RNNLoss::lambdas as messages name it.
std::string lambda_entry(size_t index);

/// The λ buffer's values checked without reading them back: one device-side assertion
/// (LAMBDAS_VALUES) that every λ is finite in float32, >= 0, and 0 where `active` is false. On the
/// CPU the assertion raises at once (the test driver runs it there).
void assert_lambdas_on_device(const at::Tensor& lam, const std::array<bool, 7>& active);

/// NOT_FLOAT unless t is a floating tensor, EMPTY if it has no elements (Python's check_float_tensor).
void check_float_tensor(const at::Tensor& t, const char* name);
/// float16 / bfloat16 accumulate in float32; float32 / float64 keep theirs.
c10::ScalarType accumulation_dtype(const at::Tensor& t);

}  // namespace detail
}  // namespace rnnloss
