// The messages of rules.h filled in as Python fills them, and the checks built on them.
#include "checks.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace rnnloss {
namespace rules {

namespace {

bool is_type_error(const char* tmpl) {
  return std::any_of(std::begin(kTypeErrors), std::end(kTypeErrors),
                     [&](const char* t) { return std::strcmp(t, tmpl) == 0; });
}

}  // namespace

std::string fill(const char* tmpl, const std::vector<std::string>& args) {
  std::string out;
  size_t next = 0;
  for (const char* p = tmpl; *p != '\0'; ++p) {
    if (p[0] == '{' && p[1] == '}') {
      TORCH_INTERNAL_ASSERT(next < args.size(), "too few arguments for the message \"", tmpl, "\"");
      out += args[next++];
      ++p;
    } else {
      out += *p;
    }
  }
  TORCH_INTERNAL_ASSERT(next == args.size(), "too many arguments for the message \"", tmpl, "\"");
  return out;
}

void raise_message(const char* tmpl, const std::string& message) {
  if (is_type_error(tmpl)) TORCH_CHECK_TYPE(false, message);
  TORCH_CHECK_VALUE(false, message);
}

}  // namespace rules

namespace detail {

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    case c10::kBool: return "torch.bool";
    case c10::kByte: return "torch.uint8";
    case c10::kChar: return "torch.int8";
    case c10::kShort: return "torch.int16";
    case c10::kInt: return "torch.int32";
    case c10::kLong: return "torch.int64";
    case c10::kComplexFloat: return "torch.complex64";
    case c10::kComplexDouble: return "torch.complex128";
    default: return "a non-floating dtype";
  }
}

std::string int_list(c10::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

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

std::string py_str(const std::string& value) {
  // Python quotes with ' unless the text holds ' and no ", and escapes the quote, backslash and
  // control characters (other bytes, UTF-8 included, pass through as printable).
  const bool dq = value.find('\'') != std::string::npos && value.find('"') == std::string::npos;
  const char quote = dq ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : value) {
    if (c == '\\' || c == quote) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + quote;
}

std::string py_str_list(const std::vector<std::string>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + py_str(values[i]);
  return out + "]";
}

const char* lambda_problem(double value) {
  if (std::isnan(value)) return "NaN";
  if (value < 0.0) return "a negative value";
  if (value > rules::kFloat32Max) return "a value beyond float32's range";
  return "";
}

void check_lambda(const std::string& name, double value, bool active, const std::string& component) {
  const char* problem = lambda_problem(value);
  RNNLOSS_CHECK(*problem == '\0', rules::kLambdaValue, name, problem);
  RNNLOSS_CHECK(value == 0.0 || active, rules::kLambdaInactive, name, component, component);
}

std::string lambda_entry(size_t index) {
  return "lambdas[" + std::to_string(index) + "] ('" + rules::kComponentNames[index] + "')";
}

void check_float_tensor(const at::Tensor& t, const char* name) {
  RNNLOSS_CHECK(t.is_floating_point(), rules::kNotFloat, name, t.scalar_type());
  RNNLOSS_CHECK(t.numel() != 0, rules::kEmpty, name, t.sizes());
}

c10::ScalarType accumulation_dtype(const at::Tensor& t) {
  auto d = t.scalar_type();
  return (d == c10::kHalf || d == c10::kBFloat16) ? c10::kFloat : d;
}

}  // namespace detail
}  // namespace rnnloss
