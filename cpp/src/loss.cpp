#include <rnnloss/loss.h>

#include "checks.h"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <utility>

namespace rnnloss {

using detail::accumulation_dtype;
using detail::lambda_entry;
using detail::lambda_fits_activity;
using detail::lambda_in_range;
using detail::py_float;
using detail::shape_of;

const std::vector<std::string>& component_names() {
  static const std::vector<std::string> names = {"mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv"};
  return names;
}

namespace {

enum Index { kMse = 0, kIn, kHid, kOut, kFr, kFrSd, kFrCv };

// ---- The formulas (each once; the Python module rnnloss.loss holds the same, with its math). ----

// Mean of squares over every element, (1/n) Σ_k x_k²: the weight penalties ‖W‖²_F / (rows·cols).
torch::Tensor mean_square(const torch::Tensor& x) {
  auto xa = x.to(accumulation_dtype(x));
  return (xa * xa).sum() / static_cast<double>(x.numel());
}

// mse: (1/n) Σ_k (ŷ_k − y_k)² over every element; with weights w (shaped like pred, or like pred
// without its last axis: one weight per sample, counted once for each of its N_out outputs, so the
// denominator is N_out·Σw): Σ w·(ŷ − y)² / Σ w. Σ w = 0 gives 0 with a zero gradient.
torch::Tensor mean_squared_error(const torch::Tensor& pred, const torch::Tensor& label, const torch::Tensor& mask) {
  auto acc = torch::promote_types(accumulation_dtype(pred), accumulation_dtype(label));
  if (!mask.defined()) return torch::mse_loss(pred.to(acc), label.to(acc));
  auto diff = pred.to(acc) - label.to(acc);
  auto w = mask.to(acc);
  torch::Tensor weighted, weight;
  if (mask.dim() == pred.dim()) {
    weighted = (w * diff * diff).sum();
    weight = w.sum();
  } else {
    weighted = (w * (diff * diff).sum(-1)).sum();
    weight = w.sum() * pred.size(-1);
  }
  return weighted / torch::where(weight == 0, torch::ones_like(weight), weight);
}

// Per-neuron sums Σ_s r_{s,i} in float64, accurate for float32 rates at 10^7 elements: every
// leading axis but the first summed in the accumulation dtype (short sums), then blocks of 1024
// rows, the block sums added in float64.
torch::Tensor neuron_sums_f64(const torch::Tensor& states) {
  const int64_t block = 1024;
  auto acc = accumulation_dtype(states);
  const int64_t n_hid = states.size(-1);
  if (states.dim() == 1) return states.to(torch::kFloat64);
  auto part = states;
  if (states.dim() > 2) {
    std::vector<int64_t> dims;
    for (int64_t d = 1; d < states.dim() - 1; ++d) dims.push_back(d);
    part = states.sum(dims, /*keepdim=*/false, acc);
  }
  const int64_t rows = part.size(0), blocks = rows / block;
  if (blocks <= 1) return part.to(torch::kFloat64).sum(0);
  auto head = part.narrow(0, 0, blocks * block).reshape({blocks, block, n_hid}).sum(1, false, acc);
  auto total = head.to(torch::kFloat64).sum(0);
  if (blocks * block < rows)
    total = total + part.narrow(0, blocks * block, rows - blocks * block).to(torch::kFloat64).sum(0);
  return total;
}

// Σ r² over every rate, in float64: squared row sums in the accumulation dtype, added in float64.
torch::Tensor sum_of_squares_f64(const torch::Tensor& states) {
  auto r = states.to(accumulation_dtype(states));
  return (r * r).sum(-1).to(torch::kFloat64).sum();
}

// fr_sd and fr_cv from the per-neuron means: μ = mean_i r̄_i, σ = sqrt(mean_i (r̄_i − μ)²) (population
// SD), CV = σ / μ. μ is taken as m + mean_i (r̄_i − m), m the plain mean: the same function, and
// exactly the common value when every r̄_i is equal (the plain mean of 7 equal numbers need not round
// back to them; the correction, a few ulps computed exactly, restores it).
// σ = 0 gives σ = CV = 0 with zero gradients (the sqrt's slope at 0 is never evaluated); σ > 0 with
// μ = 0 gives CV = +inf; NaN rates give NaN (var == 0 is false for NaN).
std::pair<torch::Tensor, torch::Tensor> rate_sd_cv(const torch::Tensor& mean_rates) {
  auto rough = mean_rates.mean();
  auto mu = rough + (mean_rates - rough).mean();
  auto dev = mean_rates - mu;
  auto var = (dev * dev).mean();
  auto flat = var == 0;
  // Double-where: the untaken branch is evaluated on a safe value so its gradient stays finite.
  auto sd = torch::where(flat, torch::zeros_like(var), torch::sqrt(torch::where(flat, torch::ones_like(var), var)));
  auto centred = mu == 0;
  auto cv = torch::where(centred, torch::full_like(var, std::numeric_limits<double>::infinity()),
                         sd / torch::where(centred, torch::ones_like(mu), mu));
  cv = torch::where(flat, torch::zeros_like(var), cv);
  return {sd, cv};
}

void check_lambda_value(const std::string& name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be finite and >= 0, got ", py_float(value));
  TORCH_CHECK_VALUE(lambda_in_range(value), name, " must be finite in float32 (at most 3.4028235e+38), got ",
                    py_float(value));
}

}  // namespace

RNNLossImpl::RNNLossImpl(CTRNN model_, const RNNLossOptions& options) {
  TORCH_CHECK_TYPE(!model_.is_empty(), "model must be a CTRNN (or a subclass), got an empty CTRNN holder");
  const std::array<double, 7> values = {options.lambda_mse(), options.lambda_in(),    options.lambda_hid(),
                                        options.lambda_out(), options.lambda_fr(),    options.lambda_fr_sd(),
                                        options.lambda_fr_cv()};
  for (size_t i = 0; i < 7; ++i) check_lambda_value("lambda_" + component_names()[i], values[i]);
  model = register_module("model", std::move(model_));
  for (size_t i = 0; i < 7; ++i) on_[i] = values[i] > 0.0;
  need_means_ = on_[kFrSd] || on_[kFrCv];
  need_states_ = on_[kFr] || need_means_;
  // On the device of the input weights (the one forward checks pred against): a CPU buffer beside
  // a CUDA model would be copied to the GPU in every forward, a host-device synchronisation per
  // call. A meta model would keep real values on the CPU, as in Python (libtorch's Module::to cannot
  // move a model to meta today, so this only guards a model built there by other means).
  auto device = model->recurrent_layer->input_layer->weight.device();
  if (device.is_meta()) device = torch::kCPU;
  lambdas = register_buffer("lambdas", torch::tensor(std::vector<double>(values.begin(), values.end()),
                                                     torch::dtype(torch::kFloat64).device(device)));
}

std::vector<std::string> RNNLossImpl::active() const {
  std::vector<std::string> out;
  for (size_t i = 0; i < 7; ++i)
    if (on_[i]) out.push_back(component_names()[i]);
  return out;
}

// Module::to(dtype) would round λ: keep the float64 values, follow the device only.
void RNNLossImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  auto exact = lambdas.detach().clone();
  torch::nn::Module::to(device, dtype, non_blocking);
  lambdas.set_data(exact.to(lambdas.device()));
}

void RNNLossImpl::to(torch::Dtype dtype, bool non_blocking) {
  auto exact = lambdas.detach().clone();
  torch::nn::Module::to(dtype, non_blocking);
  lambdas.set_data(exact.to(lambdas.device()));
}

void RNNLossImpl::set_lambda(const std::string& name, double value) {
  int64_t index = -1;
  for (size_t i = 0; i < 7; ++i)
    if (component_names()[i] == name) index = static_cast<int64_t>(i);
  TORCH_CHECK_VALUE(index >= 0, "set_lambda: name must be one of ", detail::py_str_list(component_names()),
                    ", got '", name, "'");
  TORCH_CHECK_VALUE(lambda_in_range(value), "set_lambda: value for '", name,
                    "' must be finite (in float32) and >= 0, got ", py_float(value));
  TORCH_CHECK_VALUE(on_[static_cast<size_t>(index)], "set_lambda: component '", name,
                    "' is inactive (its lambda was 0 at construction), so it is never computed; build the loss with "
                    "a non-zero lambda_",
                    name);
  torch::NoGradGuard no_grad;
  lambdas[index].fill_(value);
}

void RNNLossImpl::check_lambdas() {
  // dtype and shape on every call (metadata). The values: on the CPU every call (as Python, reading
  // nothing else); elsewhere, since a read-back there is a host-device synchronisation, only after a
  // write (version counter) or on other memory: another tensor (assignment), or new storage in the
  // same tensor (to() and torch::load replace it through set_data). The tensor and storage last
  // validated are held, so that their memory cannot come back as a new buffer's address.
  TORCH_CHECK_VALUE(lambdas.scalar_type() == torch::kFloat64 && lambdas.dim() == 1 && lambdas.size(0) == 7,
                    "lambdas must be a float64 tensor of shape [7], got dtype ", detail::dtype_name(lambdas),
                    " and shape ", detail::shape_of(lambdas));
  const bool cached = !lambdas.is_cpu() && !lambdas.is_inference();  // inference tensors: no version counter
  int64_t version = 0;
  const void* data = nullptr;
  if (cached) {
    version = static_cast<int64_t>(lambdas._version());
    data = lambdas.data_ptr();
    if (lambdas.is_same(checked_) && version == checked_version_ && data == checked_data_) return;
  }
  auto values = lambdas.to(torch::kCPU, torch::kFloat64).contiguous();
  const double* v = values.data_ptr<double>();
  for (size_t i = 0; i < 7; ++i) {
    const auto& name = component_names()[i];
    std::string entry = lambda_entry(i);
    const char* kind = std::isnan(v[i]) ? "NaN" : v[i] < 0 ? "a negative value" : "a value beyond float32's range";
    TORCH_CHECK_VALUE(lambda_in_range(v[i]), entry, " must be finite and >= 0; it was set to ", kind);
    TORCH_CHECK_VALUE(lambda_fits_activity(v[i], on_[i]), entry, " is non-zero but component '", name,
                      "' is inactive (its lambda was 0 at construction); build the loss with a non-zero lambda_",
                      name);
  }
  if (!cached) return;
  checked_ = lambdas;
  checked_storage_ = lambdas.storage();
  checked_version_ = version;
  checked_data_ = data;
}

std::tuple<torch::Tensor, torch::Tensor> RNNLossImpl::forward(const torch::Tensor& pred, const torch::Tensor& label,
                                                              const torch::Tensor& states, const torch::Tensor& mask) {
  detail::check_float_tensor(pred, "pred");
  detail::check_float_tensor(label, "label");
  TORCH_CHECK_VALUE(pred.sizes() == label.sizes(), "pred and label must have the same shape, got pred ",
                    shape_of(pred), " and label ", shape_of(label));
  TORCH_CHECK_VALUE(label.device() == pred.device(), "label must be on pred's device ", pred.device().str(), ", got ",
                    label.device().str());
  const int64_t n_hid = model->n_hid();
  if (states.defined()) {
    detail::check_float_tensor(states, "states");
    TORCH_CHECK_VALUE(states.device() == pred.device(), "states must be on pred's device ", pred.device().str(),
                      ", got ", states.device().str());
    TORCH_CHECK_VALUE(states.dim() != 0 && states.size(-1) == n_hid, "states must have N_hid=", n_hid,
                      " as its last dimension, got shape ", shape_of(states));
  } else {
    TORCH_CHECK_VALUE(!need_states_, "states is required when lambda_fr, lambda_fr_sd or lambda_fr_cv > 0, got None");
  }
  if (mask.defined()) {
    TORCH_CHECK_TYPE(!mask.is_complex(), "mask must be a real tensor (floating point, integer or bool), got dtype ",
                     detail::dtype_name(mask));
    auto per_sample = pred.sizes().slice(0, static_cast<size_t>(pred.dim() - 1));
    TORCH_CHECK_VALUE(mask.sizes() == pred.sizes() || mask.sizes() == per_sample,
                      "mask must have pred's shape ", shape_of(pred), " or pred's shape without its last axis ",
                      detail::int_list(per_sample.vec()), ", got shape ", shape_of(mask));
    TORCH_CHECK_VALUE(mask.device() == pred.device(), "mask must be on pred's device ", pred.device().str(), ", got ",
                      mask.device().str());
    if (mask.scalar_type() != torch::kBool) {
      auto valid = ((mask >= 0) & torch::isfinite(mask)).all();
      if (mask.is_cuda())
        torch::_assert_async(valid, "mask must hold finite weights >= 0");  // no host-device sync
      else
        TORCH_CHECK_VALUE(valid.item<bool>(), "mask must hold finite weights >= 0");
    }
  }
  check_lambdas();

  const auto& w_in = model->recurrent_layer->input_layer->weight;
  const auto& w_hid = model->recurrent_layer->hidden_layer->weight;
  const auto& w_out = model->readout_layer->weight;
  TORCH_CHECK_VALUE(!(on_[kIn] || on_[kHid] || on_[kOut]) || w_in.device() == pred.device(),
                    "pred must be on the model's device ", w_in.device().str(),
                    " when a weight penalty is active, got ", pred.device().str());
  auto dtype = torch::promote_types(
      torch::promote_types(accumulation_dtype(pred), accumulation_dtype(label)), accumulation_dtype(w_in));
  if (states.defined()) dtype = torch::promote_types(dtype, accumulation_dtype(states));
  auto zero = torch::zeros({}, torch::TensorOptions().dtype(dtype).device(pred.device()));
  std::vector<torch::Tensor> c(7, zero);
  if (on_[kMse]) c[kMse] = mean_squared_error(pred, label, mask).to(dtype);
  if (on_[kIn]) c[kIn] = mean_square(w_in).to(dtype);
  if (on_[kHid]) c[kHid] = mean_square(w_hid).to(dtype);
  if (on_[kOut]) c[kOut] = mean_square(w_out).to(dtype);
  if (states.defined() && need_states_) {
    // fr and the per-neuron means from float64 sums; the statistics in float64, then cast. One
    // upcast of the rates: both terms' gradients add in float32 and round to half precision once.
    auto rates = states.to(accumulation_dtype(states));
    if (on_[kFr]) c[kFr] = (sum_of_squares_f64(rates) / static_cast<double>(states.numel())).to(dtype);
    if (need_means_) {
      auto [sd, cv] = rate_sd_cv(neuron_sums_f64(rates) / static_cast<double>(states.numel() / n_hid));
      if (on_[kFrSd]) c[kFrSd] = sd.to(dtype);
      if (on_[kFrCv]) c[kFrCv] = cv.to(dtype);
    }
  }
  auto components = torch::stack(c) * lambdas.to(pred.device(), dtype);
  return {components.sum(), components};
}

}  // namespace rnnloss
