// Internal: the input checks and value formatting that make the C++ messages equal Python's, and
// the names and rules that CTRNN, RNNLoss and rnnloss::load share.
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

namespace rnnloss {
namespace detail {

/// The largest float32 (3.4028234663852886e38): every lambda must be at most this.
inline constexpr double kFloat32Max = 3.4028234663852886e38;

/// The three weight layers in CTRNNOptions' order, as per-layer messages and the mask buffers
/// (sparsity_input, sign_hidden, plasticity_readout, ...) name them.
inline constexpr const char* kLayers[3] = {"input", "hidden", "readout"};

/// Whether `value` can be a lambda: finite, >= 0 and at most kFloat32Max (NaN is not).
inline bool lambda_in_range(double value) { return value >= 0.0 && value <= kFloat32Max; }
/// Whether a component can have lambda `value`: one inactive at construction keeps lambda 0.
inline bool lambda_fits_activity(double value, bool active) { return active || value == 0.0; }
/// "lambdas[I] ('NAME')": entry `index` of RNNLoss::lambdas as messages name it.
std::string lambda_entry(size_t index);

/// `torch.float32` etc., as Python prints a dtype.
std::string dtype_name(const torch::Tensor& t);
/// `[2, 3]`, as Python prints list(t.shape).
std::string shape_of(const torch::Tensor& t);
std::string int_list(const std::vector<int64_t>& values);
/// A double as Python's repr(float) writes it: 0.1, 100.0, 1e-05, inf, nan.
std::string py_float(double value);
/// ['a', 'b'], as Python prints a list of strings.
std::string py_str_list(const std::vector<std::string>& values);
/// Device as Python prints it: cpu, cuda:0.
std::string device_name(const torch::Device& device);

/// TypeError unless t is a floating tensor, ValueError if it is empty (Python's check_float_tensor).
void check_float_tensor(const torch::Tensor& t, const std::string& name);
/// float16 / bfloat16 accumulate in float32; float32 / float64 keep theirs.
torch::Dtype accumulation_dtype(const torch::Tensor& t);

}  // namespace detail
}  // namespace rnnloss
