#include "checks.h"

#include <rnnloss/loss.h>

#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace rnnloss {
namespace detail {

std::string dtype_name(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return "torch.float32";
    case torch::kFloat64: return "torch.float64";
    case torch::kFloat16: return "torch.float16";
    case torch::kBFloat16: return "torch.bfloat16";
    case torch::kBool: return "torch.bool";
    case torch::kUInt8: return "torch.uint8";
    case torch::kInt8: return "torch.int8";
    case torch::kInt16: return "torch.int16";
    case torch::kInt32: return "torch.int32";
    case torch::kInt64: return "torch.int64";
    case torch::kComplexFloat: return "torch.complex64";
    case torch::kComplexDouble: return "torch.complex128";
    default: return "a non-floating dtype";
  }
}

std::string int_list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

std::string shape_of(const torch::Tensor& t) { return int_list(t.sizes().vec()); }

std::string py_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // Shortest round-trip digits (what repr uses), then repr's layout: positional for decimal
  // exponents -4 <= e < 16, else d.ddde±XX.
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, value, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. -1.25e-05
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci = sci.substr(1);
  }
  size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  int exponent = std::atoi(sci.c_str() + e + 1);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  if (exponent < -4 || exponent >= 16) {
    std::string mant = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    std::string exp = std::to_string(std::abs(exponent));
    if (exp.size() < 2) exp = "0" + exp;
    return sign + mant + "e" + (exponent < 0 ? "-" : "+") + exp;
  }
  std::string out;
  if (exponent < 0) {
    out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  } else if (static_cast<int>(digits.size()) <= exponent + 1) {
    out = digits + std::string(static_cast<size_t>(exponent + 1) - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, static_cast<size_t>(exponent + 1)) + "." + digits.substr(static_cast<size_t>(exponent + 1));
  }
  return sign + out;
}

std::string py_str_list(const std::vector<std::string>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", '" : "'") + values[i] + "'";
  return out + "]";
}

std::string lambda_entry(size_t index) {
  return "lambdas[" + std::to_string(index) + "] ('" + component_names().at(index) + "')";
}

std::string device_name(const torch::Device& device) { return device.str(); }

void check_float_tensor(const torch::Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.is_floating_point(), name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype ",
                   dtype_name(t));
  TORCH_CHECK_VALUE(t.numel() != 0, name, " must not be empty, got shape ", shape_of(t));
}

torch::Dtype accumulation_dtype(const torch::Tensor& t) {
  auto d = t.scalar_type();
  return (d == torch::kFloat16 || d == torch::kBFloat16) ? torch::kFloat32 : d;
}

}  // namespace detail
}  // namespace rnnloss
