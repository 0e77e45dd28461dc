#include <rnnloss/loss.h>

#include "checks.h"

#include <torch/types.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>

namespace rnnloss {

using detail::accumulation_dtype;
using rules::Term;

const std::vector<std::string>& component_names() {
  static const std::vector<std::string> names(std::begin(rules::kComponentNames), std::end(rules::kComponentNames));
  return names;
}

namespace {

// ---- The formulas: the Python module rnnloss.terms, term by term (its docstrings hold the math). ----

// Σ w (pred − label)² and Σ w (terms.error_sums): with a mask both in float64, so that tiny (even
// subnormal float32) weights neither underflow nor lose digits. Without a mask: the sum of squares and
// the element count (float64).
std::pair<torch::Tensor, torch::Tensor> error_sums(const torch::Tensor& pred, const torch::Tensor& label,
                                                   const torch::Tensor& mask) {
  auto acc = torch::promote_types(accumulation_dtype(pred), accumulation_dtype(label));
  auto p = pred.to(acc), y = label.to(acc);
  if (!mask.defined()) {
    auto count = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat64).device(p.device())) +
                 static_cast<double>(p.numel());
    return {torch::mse_loss(p, y, at::Reduction::Sum), count};
  }
  p = p.to(torch::kFloat64);
  y = y.to(torch::kFloat64);
  auto w = mask.to(torch::kFloat64);
  auto diff = p - y;
  if (mask.dim() == p.dim()) return {(w * diff * diff).sum(), w.sum()};
  return {(w * (diff * diff).sum(-1)).sum(), w.sum() * p.size(-1)};
}

// A weight penalty: ‖W‖²_F / (rows · cols) (terms.mean_square).
torch::Tensor mean_square(const torch::Tensor& w) {
  auto wa = w.to(accumulation_dtype(w));
  return (wa * wa).sum() / static_cast<double>(w.numel());
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

// fr_sd and fr_cv from the per-neuron means (terms.rate_sd_cv): μ = m + mean_i (r̄_i − m), m the
// plain mean (exactly the common value when every r̄_i is equal); σ the population SD; CV = σ / μ.
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
  return {sd, torch::where(flat, torch::zeros_like(var), cv)};
}

std::array<double, 7> values_of(const RNNLossOptions& o) {
  return {o.lambda_mse(), o.lambda_in(), o.lambda_hid(), o.lambda_out(), o.lambda_fr(), o.lambda_fr_sd(),
          o.lambda_fr_cv()};
}

}  // namespace

RNNLossImpl::RNNLossImpl(CTRNN model_, const RNNLossOptions& options_) : options(options_) {
  RNNLOSS_CHECK(!model_.is_empty(), rules::kModelType, "an empty CTRNN holder");
  const auto values = values_of(options);
  for (size_t i = 0; i < 7; ++i)
    detail::check_lambda(std::string("lambda_") + rules::kComponentNames[i], values[i], true,
                         std::string("lambda_") + rules::kComponentNames[i]);
  for (size_t i = 0; i < 7; ++i) on_[i] = values[i] > 0.0;
  need_means_ = on_[Term::kFrSd] || on_[Term::kFrCv];
  need_states_ = on_[Term::kFr] || need_means_;
  model = register_module("model", std::move(model_));
  register_lambdas();
}

void RNNLossImpl::reset() {
  model = register_module("model", CTRNN(model->options()));
  register_lambdas();
}

void RNNLossImpl::register_lambdas() {
  // On the device of the input weights (the one forward checks pred against): a CPU buffer beside
  // a CUDA model would be copied to the GPU in every forward. A meta model keeps real values on the
  // CPU, as in Python.
  auto device = model->recurrent_layer->input_layer->weight.device();
  if (device.is_meta()) device = torch::kCPU;
  const auto values = values_of(options);
  lambdas = register_buffer("lambdas", torch::tensor(std::vector<double>(values.begin(), values.end()),
                                                     torch::dtype(torch::kFloat64).device(device)));
}

void RNNLossImpl::pretty_print(std::ostream& stream) const {
  // Python's extra_repr: f"{name}={value:g}" for each non-zero λ.
  auto values = lambdas.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  stream << "rnnloss::RNNLoss(";
  bool first = true;
  for (int64_t i = 0; i < values.numel() && i < 7; ++i) {
    double v = values.data_ptr<double>()[i];
    if (v == 0.0) continue;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", v);
    stream << (first ? "" : ", ") << "lambda_" << rules::kComponentNames[i] << "=" << buf;
    first = false;
  }
  stream << ")";
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
    if (name == rules::kComponentNames[i]) index = static_cast<int64_t>(i);
  if (index < 0) {
    std::string names;
    for (const char* n : rules::kComponentNames) names += (names.empty() ? "" : ", ") + std::string(n);
    rules::raise(rules::kLambdaName, names, name);
  }
  detail::check_lambda("lambda_" + name, value, on_[static_cast<size_t>(index)], name);
  torch::NoGradGuard no_grad;
  lambdas.narrow(0, index, 1).fill_(value);  // fill_ takes the float64 value as it is
}

torch::Tensor RNNLossImpl::checked_lambdas() const {
  const auto& lam = lambdas;
  RNNLOSS_CHECK(lam.scalar_type() == torch::kFloat64 && lam.dim() == 1 && lam.size(0) == 7, rules::kLambdasBuffer,
                lam.scalar_type(), lam.sizes());
  if (lam.is_cpu()) {
    auto values = lam.contiguous();
    const double* v = values.data_ptr<double>();
    for (size_t i = 0; i < 7; ++i)
      detail::check_lambda(detail::lambda_entry(i), v[i], on_[i], rules::kComponentNames[i]);
    return lam;
  }
  // Elsewhere reading the values back would be a host–device synchronisation per call.
  detail::assert_lambdas_on_device(lam, on_);
  return lam;
}

namespace detail {

void assert_lambdas_on_device(const at::Tensor& lam, const std::array<bool, 7>& active) {
  // The conditions of check_lambda, as one device-side assertion (its message is the rule's).
  auto ok = (lam >= 0.0) & (lam <= rules::kFloat32Max);
  for (int64_t i = 0; i < 7; ++i)
    if (!active[static_cast<size_t>(i)]) ok.narrow(0, i, 1).logical_and_(lam.narrow(0, i, 1) == 0.0);
  at::_assert_async(ok.all(), rules::kLambdasValues);
}

}  // namespace detail

std::tuple<torch::Tensor, torch::Tensor> RNNLossImpl::forward(const torch::Tensor& pred, const torch::Tensor& label,
                                                              const torch::Tensor& states, const torch::Tensor& mask_) {
  // The checks of Python's RNNLoss._check_inputs, in its order.
  detail::check_float_tensor(pred, "pred");
  detail::check_float_tensor(label, "label");
  RNNLOSS_CHECK(pred.sizes() == label.sizes(), rules::kLabelShape, pred.sizes(), label.sizes());
  RNNLOSS_CHECK(label.device() == pred.device(), rules::kDevice, "label", "pred", pred.device(), label.device());
  const int64_t n_hid = model->n_hid();
  if (states.defined()) {
    detail::check_float_tensor(states, "states");
    RNNLOSS_CHECK(states.device() == pred.device(), rules::kDevice, "states", "pred", pred.device(), states.device());
    RNNLOSS_CHECK(states.dim() != 0 && states.size(-1) == n_hid, rules::kStatesLastDim, n_hid, states.sizes());
  } else {
    RNNLOSS_CHECK(!need_states_, rules::kStatesMissing);
  }
  if (mask_.defined()) {
    RNNLOSS_CHECK(!mask_.is_complex(), rules::kMaskDtype, mask_.scalar_type());
    auto per_sample = pred.sizes().slice(0, static_cast<size_t>(pred.dim() - 1));
    RNNLOSS_CHECK(mask_.sizes() == pred.sizes() || mask_.sizes() == per_sample, rules::kMaskShape, pred.sizes(),
                  per_sample, mask_.sizes());
    RNNLOSS_CHECK(mask_.device() == pred.device(), rules::kDevice, "mask", "pred", pred.device(), mask_.device());
  }
  const auto& w_in = model->recurrent_layer->input_layer->weight;
  const auto& w_hid = model->recurrent_layer->hidden_layer->weight;
  const auto& w_out = model->readout_layer->weight;
  const bool weights_on = on_[Term::kIn] || on_[Term::kHid] || on_[Term::kOut];
  RNNLOSS_CHECK(!weights_on || w_in.device() == pred.device(), rules::kDevice, "pred", "the model", w_in.device(),
                pred.device());
  torch::Tensor mask = mask_;
  if (mask.defined()) {
    if (!mask.is_floating_point()) mask = mask.to(accumulation_dtype(pred));  // integer or bool weights
    auto valid = ((mask >= 0) & torch::isfinite(mask)).all();
    if (mask.is_cpu())
      RNNLOSS_CHECK(valid.item<bool>(), rules::kMaskWeights);
    else
      torch::_assert_async(valid, rules::kMaskWeights);  // no host–device synchronisation
  }
  auto lam = checked_lambdas();

  // terms.statistics, then terms.components.
  auto dtype = torch::promote_types(
      torch::promote_types(accumulation_dtype(pred), accumulation_dtype(label)), accumulation_dtype(w_in));
  if (states.defined()) dtype = torch::promote_types(dtype, accumulation_dtype(states));
  auto zero = torch::zeros({}, torch::TensorOptions().dtype(dtype).device(pred.device()));
  std::vector<torch::Tensor> c(7, zero);
  if (on_[Term::kMse]) {
    auto [sq_err, weight] = error_sums(pred, label, mask);
    c[Term::kMse] = (sq_err / torch::where(weight == 0, torch::ones_like(weight), weight)).to(dtype);
  }
  if (on_[Term::kIn]) c[Term::kIn] = mean_square(w_in).to(dtype);
  if (on_[Term::kHid]) c[Term::kHid] = mean_square(w_hid).to(dtype);
  if (on_[Term::kOut]) c[Term::kOut] = mean_square(w_out).to(dtype);
  if (states.defined() && need_states_) {
    // fr and the per-neuron means from float64 sums; the statistics in float64, then cast. One
    // upcast of the rates: both terms' gradients add in float32 and round to half precision once.
    auto rates = states.to(accumulation_dtype(states));
    const double samples = static_cast<double>(states.numel() / n_hid);
    if (on_[Term::kFr]) c[Term::kFr] = (sum_of_squares_f64(rates) / (samples * static_cast<double>(n_hid))).to(dtype);
    if (need_means_) {
      auto [sd, cv] = rate_sd_cv(neuron_sums_f64(rates) / samples);
      if (on_[Term::kFrSd]) c[Term::kFrSd] = sd.to(dtype);
      if (on_[Term::kFrCv]) c[Term::kFrCv] = cv.to(dtype);
    }
  }
  auto components = torch::stack(c) * lam.to(pred.device(), dtype);
  return {components.sum(), components};
}

}  // namespace rnnloss
