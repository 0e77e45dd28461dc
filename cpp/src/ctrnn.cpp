#include <rnnloss/ctrnn.h>

#include "checks.h"

#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace rnnloss {

using detail::kLayers;

namespace {

const std::vector<std::string> kActivations = {"relu", "tanh", "sigmoid", "softplus", "retanh"};
const std::vector<std::string> kWeightInits = {"uniform", "normal", "zero"};
// Python's True, "uniform", "normal", "zero", None and False.
const std::vector<std::string> kBiasInits = {"uniform", "normal", "zero", "fixed", "absent"};
const std::vector<std::string> kInitStates = {"zero", "learn"};
constexpr double kAlphaMin = 1e-3;  // learnable α is kept in [kAlphaMin, 1] by enforce_constraints()

bool one_of(const std::string& value, const std::vector<std::string>& allowed) {
  return std::find(allowed.begin(), allowed.end(), value) != allowed.end();
}

// Python's _layer_specs and the per-layer choice checks. C++ takes no tensors here, so the
// choices are the strings alone.
void check_per_layer(const std::vector<std::string>& specs, const char* name) {
  RNNLOSS_CHECK(specs.size() == 3, rules::kPerLayer, name, detail::py_str_list(specs));
}
void check_layer_choices(const std::vector<std::string>& specs, const char* name,
                         const std::vector<std::string>& allowed) {
  for (int i = 0; i < 3; ++i)
    RNNLOSS_CHECK(one_of(specs[i], allowed), rules::kLayerChoice, name, kLayers[i], detail::py_str_list(allowed),
                  detail::py_str(specs[i]));
}

// Python's _masks: three optional masks checked against the weights' shapes.
std::vector<torch::Tensor> checked_masks(const std::vector<torch::Tensor>& masks, const char* name,
                                         const std::vector<torch::nn::Linear>& linears, bool allow_vector) {
  std::vector<torch::Tensor> out(3);
  if (masks.empty()) return out;
  TORCH_CHECK_TYPE(masks.size() == 3, name,
                   " must be None or a sequence of three (input, hidden, readout) masks or None");
  for (int i = 0; i < 3; ++i) {
    torch::Tensor mask = masks[i];
    if (!mask.defined()) continue;
    const auto& weight = linears[i]->weight;
    if (mask.scalar_type() == torch::kBool) mask = mask.to(torch::kFloat32);
    int64_t fan_in = weight.size(1);
    if (allow_vector && mask.dim() == 1 && mask.numel() == fan_in) mask = mask.reshape({1, -1}).expand(weight.sizes());
    RNNLOSS_CHECK(mask.sizes() == weight.sizes(), rules::kLayerShape, name, kLayers[i],
                  detail::int_list(weight.sizes()) + (allow_vector ? " or [" + std::to_string(fan_in) + "]" : ""),
                  mask.sizes());
    RNNLOSS_CHECK(torch::isfinite(mask.to(torch::kFloat64)).all().item<bool>(), rules::kLayerFinite, name, kLayers[i]);
    out[i] = mask.to(weight.scalar_type()).contiguous();
  }
  return out;
}

void init_linear(torch::nn::Linear& lin, const std::string& weight, const std::string& bias) {
  double bound = 1.0 / std::sqrt(static_cast<double>(lin->options.in_features()));
  if (weight == "uniform") lin->weight.uniform_(-bound, bound);
  else if (weight == "normal") lin->weight.normal_(0.0, bound);
  else lin->weight.zero_();
  if (!lin->bias.defined()) return;
  if (bias == "uniform") lin->bias.uniform_(-bound, bound);
  else if (bias == "normal") lin->bias.normal_(0.0, bound);
  else lin->bias.zero_();  // "zero", or "fixed": nn4n's untrained zero bias
  if (bias == "fixed") lin->bias.requires_grad_(false);
}

// |w|·sign on constrained entries, then balance the summed E and I weight (in place).
void dale_init(torch::Tensor& weight, const torch::Tensor& sign) {
  weight.copy_(torch::where(sign != 0, weight.abs() * sign, weight));
  auto exc = weight.masked_select(sign > 0).sum();
  auto inh = -weight.masked_select(sign < 0).sum();
  if (exc.item<double>() > 0 && inh.item<double>() > 0) {
    if (exc.item<double>() > inh.item<double>())
      weight.copy_(torch::where(sign > 0, weight * (inh / exc), weight));
    else
      weight.copy_(torch::where(sign < 0, weight * (exc / inh), weight));
  }
}

// Project weight in place onto its constraint set (sparsity 0 = absent synapse; sign ±1 or 0).
void project(torch::Tensor& weight, const torch::Tensor& sparsity, const torch::Tensor& sign) {
  if (sparsity.defined()) weight.mul_(sparsity);
  if (sign.defined()) {
    auto w = torch::where(sign > 0, weight.clamp_min(0.0), weight);
    w = torch::where(sign < 0, w.clamp_max(0.0), w);
    weight.copy_(w);
  }
}

}  // namespace

// ---- RecurrentLayer ----

RecurrentLayerImpl::RecurrentLayerImpl(int64_t n_in, int64_t n_hid, bool bias_in, bool bias_hid, bool learn_init,
                                       double alpha_value, bool learn_alpha)
    : n_in_(n_in),
      n_hid_(n_hid),
      bias_in_(bias_in),
      bias_hid_(bias_hid),
      learn_init_(learn_init),
      alpha_(alpha_value),
      learn_alpha_(learn_alpha) {
  reset();
}

void RecurrentLayerImpl::reset() {
  input_layer =
      register_module("input_layer", torch::nn::Linear(torch::nn::LinearOptions(n_in_, n_hid_).bias(bias_in_)));
  hidden_layer =
      register_module("hidden_layer", torch::nn::Linear(torch::nn::LinearOptions(n_hid_, n_hid_).bias(bias_hid_)));
  hidden_state = register_parameter("hidden_state", torch::zeros({n_hid_}), /*requires_grad=*/learn_init_);
  alpha = learn_alpha_ ? register_parameter("alpha", torch::full({n_hid_}, alpha_)) : torch::Tensor();
}

void RecurrentLayerImpl::pretty_print(std::ostream& stream) const { stream << "rnnloss::RecurrentLayer"; }

// ---- CTRNN ----

CTRNNImpl::CTRNNImpl(const CTRNNOptions& options) : options_(options) { reset(); }

void CTRNNImpl::reset() {
  const auto& o = options_;
  // The checks in the order of Python's constructor, with its messages.
  RNNLOSS_CHECK(o.n_in() > 0 && o.n_hid() > 0 && o.n_out() > 0, rules::kDims,
                "(" + std::to_string(o.n_in()) + ", " + std::to_string(o.n_hid()) + ", " +
                    std::to_string(o.n_out()) + ")");
  const std::pair<const char*, double> positive[] = {{"tau", o.tau()}, {"dt", o.dt()}};
  for (const auto& [name, value] : positive)
    RNNLOSS_CHECK(std::isfinite(value) && value > 0, rules::kPositive, name, value);
  const std::pair<const char*, double> non_negative[] = {{"preact_noise", o.preact_noise()},
                                                         {"postact_noise", o.postact_noise()}};
  for (const auto& [name, value] : non_negative)
    RNNLOSS_CHECK(std::isfinite(value) && value >= 0, rules::kNonNegative, name, value);
  RNNLOSS_CHECK(o.dt() <= o.tau(), rules::kDtAboveTau, o.dt(), o.tau());
  RNNLOSS_CHECK(one_of(o.activation(), kActivations), rules::kChoice, "activation", detail::py_str_list(kActivations),
                detail::py_str(o.activation()));
  RNNLOSS_CHECK(one_of(o.init_state(), kInitStates), rules::kChoice, "init_state", detail::py_str_list(kInitStates),
                detail::py_str(o.init_state()));
  check_per_layer(o.biases(), "biases");
  check_per_layer(o.weights(), "weights");
  check_layer_choices(o.biases(), "biases", kBiasInits);
  check_layer_choices(o.weights(), "weights", kWeightInits);

  alpha_ = o.dt() / o.tau();
  const auto& b = o.biases();
  recurrent_layer = register_module(
      "recurrent_layer", RecurrentLayer(o.n_in(), o.n_hid(), b[0] != "absent", b[1] != "absent",
                                        o.init_state() == "learn", alpha_, o.learn_alpha()));
  readout_layer = register_module(
      "readout_layer", torch::nn::Linear(torch::nn::LinearOptions(o.n_hid(), o.n_out()).bias(b[2] != "absent")));
  std::vector<torch::nn::Linear> linears = {recurrent_layer->input_layer, recurrent_layer->hidden_layer,
                                            readout_layer};
  {
    torch::NoGradGuard no_grad;
    for (int i = 0; i < 3; ++i) init_linear(linears[i], o.weights()[i], b[i]);
  }
  auto sparsity = checked_masks(o.sparsity_masks(), "sparsity_masks", linears, false);
  auto signs = checked_masks(o.ei_masks(), "ei_masks", linears, true);
  auto plasticity = checked_masks(o.plasticity_masks(), "plasticity_masks", linears, false);
  for (int i = 0; i < 3; ++i) {
    RNNLOSS_CHECK(!signs[i].defined() || ((signs[i] == 1) | (signs[i] == -1) | (signs[i] == 0)).all().item<bool>(),
                  rules::kEiValues, kLayers[i]);
    RNNLOSS_CHECK(!plasticity[i].defined() || (plasticity[i] >= 0).all().item<bool>(), rules::kPlasticityValues,
                  kLayers[i]);
  }
  for (int i = 0; i < 3; ++i) {
    std::string layer = kLayers[i];
    sparsity_[i] = sparsity[i].defined() ? register_buffer("sparsity_" + layer, sparsity[i].clone()) : torch::Tensor();
    sign_[i] = signs[i].defined() ? register_buffer("sign_" + layer, signs[i].clone()) : torch::Tensor();
    plasticity_[i] =
        plasticity[i].defined() ? register_buffer("plasticity_" + layer, plasticity[i].clone()) : torch::Tensor();
  }
  {
    torch::NoGradGuard no_grad;
    for (int i = 0; i < 3; ++i)
      if (sign_[i].defined()) dale_init(linears[i]->weight, sign_[i]);
  }
  enforce_constraints();
}

std::shared_ptr<torch::nn::Module> CTRNNImpl::clone(const std::optional<torch::Device>& device) const {
  auto copy = torch::nn::Cloneable<CTRNNImpl>::clone(device);
  // libtorch's clone registers every parameter anew (requires_grad true, as nn::Linear's reset
  // does) and copies only the values: carry the flags over too (the "fixed" biases, frozen weights).
  auto theirs = copy->named_parameters();
  for (const auto& p : named_parameters()) theirs[p.key()].requires_grad_(p.value().requires_grad());
  return copy;
}

void CTRNNImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options_;
  stream << "rnnloss::CTRNN(dims=(" << o.n_in() << ", " << o.n_hid() << ", " << o.n_out()
         << "), tau=" << detail::py_float(o.tau()) << ", dt=" << detail::py_float(o.dt())
         << ", activation=" << detail::py_str(o.activation())
         << ", layout=" << (o.batch_first() ? "(B, T, N)" : "(T, B, N)");
  if (o.preact_noise() != 0.0) stream << ", preact_noise=" << detail::py_float(o.preact_noise());
  if (o.postact_noise() != 0.0) stream << ", postact_noise=" << detail::py_float(o.postact_noise());
  if (o.init_state() == "learn") stream << ", init_state='learn'";
  if (o.learn_alpha()) stream << ", learn_alpha=True";
  std::string masks;
  const std::pair<const char*, const torch::Tensor*> kinds[] = {
      {"sparsity", sparsity_}, {"sign", sign_}, {"plasticity", plasticity_}};
  for (const auto& [kind, tensors] : kinds) {
    if (!(tensors[0].defined() || tensors[1].defined() || tensors[2].defined())) continue;
    if (!masks.empty()) masks += '+';
    masks += kind;
  }
  if (!masks.empty()) stream << ", masks=" << masks;
  stream << ")";
}

torch::nn::Linear& CTRNNImpl::layer(int index) {
  if (index == 0) return recurrent_layer->input_layer;
  if (index == 1) return recurrent_layer->hidden_layer;
  return readout_layer;
}

void CTRNNImpl::enforce_constraints() {
  torch::NoGradGuard no_grad;
  // The members share their TensorImpl with the buffers, so Module::to()'s set_data reaches them.
  for (int i = 0; i < 3; ++i) project(layer(i)->weight, sparsity_[i], sign_[i]);
  if (recurrent_layer->alpha.defined()) recurrent_layer->alpha.clamp_(kAlphaMin, 1.0);
}

void CTRNNImpl::apply_plasticity() {
  torch::NoGradGuard no_grad;
  for (int i = 0; i < 3; ++i) {
    auto& grad = layer(i)->weight.mutable_grad();
    if (plasticity_[i].defined() && grad.defined()) grad.mul_(plasticity_[i]);
  }
}

torch::Tensor CTRNNImpl::activate(const torch::Tensor& v) const {
  const auto& a = options_.activation();
  if (a == "relu") return torch::relu(v);
  if (a == "tanh") return torch::tanh(v);
  if (a == "sigmoid") return torch::sigmoid(v);
  if (a == "softplus") return torch::softplus(v);
  return torch::relu(torch::tanh(v));  // retanh
}

std::tuple<torch::Tensor, torch::Tensor> CTRNNImpl::forward(const torch::Tensor& input,
                                                            const torch::Tensor& init_state) {
  detail::check_float_tensor(input, "x");
  const auto& w_in = recurrent_layer->input_layer->weight;
  const int64_t n_in = options_.n_in(), n_hid = options_.n_hid();
  const bool batch_first = options_.batch_first();
  RNNLOSS_CHECK(input.dim() == 3 && input.size(2) == n_in, rules::kXShape,
                batch_first ? "(B, T, N_in)" : "(T, B, N_in)", n_in, input.sizes());
  RNNLOSS_CHECK(input.scalar_type() == w_in.scalar_type(), rules::kXDtype, w_in.scalar_type(), input.scalar_type());
  torch::Tensor x = batch_first ? input.transpose(0, 1) : input;
  const int64_t steps = x.size(0), batch = x.size(1);
  torch::Tensor v;
  if (!init_state.defined()) {
    if (options_.init_state() == "learn")
      v = recurrent_layer->hidden_state.to(x.scalar_type()).expand({batch, n_hid});
    else
      v = torch::zeros({batch, n_hid}, x.options());
  } else {
    detail::check_float_tensor(init_state, "init_state");
    RNNLOSS_CHECK(init_state.dim() == 2 && init_state.size(0) == batch && init_state.size(1) == n_hid,
                  rules::kInitStateShape, std::vector<int64_t>{batch, n_hid}, init_state.sizes());
    v = init_state.to(x.scalar_type());
  }
  // The input drive and both biases for every step in one matmul.
  auto drive = torch::linear(x, w_in, recurrent_layer->input_layer->bias);
  const auto& b_hid = recurrent_layer->hidden_layer->bias;
  if (b_hid.defined()) drive = drive + b_hid;
  auto w_hid_t = recurrent_layer->hidden_layer->weight.t();
  const bool noisy_pre = is_training() && options_.preact_noise() > 0.0;
  const bool noisy_post = is_training() && options_.postact_noise() > 0.0;
  const auto& alpha_vec = recurrent_layer->alpha;
  auto r = activate(v);
  std::vector<torch::Tensor> rates;
  rates.reserve(static_cast<size_t>(steps));
  // unbind, not drive[t]: each select's backward would zero-fill a full (T, B, N_hid) tensor.
  auto drive_steps = drive.unbind(0);
  for (int64_t t = 0; t < steps; ++t) {
    auto pre = torch::addmm(drive_steps[static_cast<size_t>(t)], r, w_hid_t);
    if (noisy_pre) pre = pre + options_.preact_noise() * torch::randn_like(pre);
    if (alpha_vec.defined())
      v = (1.0 - alpha_vec) * v + alpha_vec * pre;
    else
      v = (1.0 - alpha_) * v + alpha_ * pre;
    r = activate(v);
    if (noisy_post) r = r + options_.postact_noise() * torch::randn_like(r);
    rates.push_back(r);
  }
  auto states = torch::stack(rates);
  auto output = torch::linear(states, readout_layer->weight, readout_layer->bias);
  if (batch_first) return {output.transpose(0, 1), states.transpose(0, 1)};
  return {output, states};
}

}  // namespace rnnloss
