// rnnloss::RNNLoss — the composite CTRNN loss of the Python package, in libtorch's C++ frontend.
//
// forward(pred, label, states, mask) -> (total, components), components of length 7 in the fixed
// order of component_names(), λ applied, total = components.sum():
//   0 mse    λ_mse · mean((pred − label)²)   (with a mask w: Σ w·(pred − label)² / Σ w)
//   1 in     λ_in  · ‖W_in‖²_F / (N_in · N_hid)
//   2 hid    λ_hid · ‖W_hid‖²_F / N_hid²
//   3 out    λ_out · ‖W_out‖²_F / (N_out · N_hid)
//   4 fr     λ_fr  · mean of r² over every sample and neuron
//   5 fr_sd  λ_fr_sd · σ, σ the population SD of the per-neuron mean rates
//   6 fr_cv  λ_fr_cv · σ / μ, μ the mean of all rates
// A component whose λ is 0 at construction is inactive: never computed, its entry exactly 0.
#pragma once

#include <rnnloss/ctrnn.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace rnnloss {

/// The component names, in the order of the components vector.
const std::vector<std::string>& component_names();

struct RNNLossOptions {
  TORCH_ARG(double, lambda_mse) = 1.0;
  TORCH_ARG(double, lambda_in) = 0.0;
  TORCH_ARG(double, lambda_hid) = 0.0;
  TORCH_ARG(double, lambda_out) = 0.0;
  TORCH_ARG(double, lambda_fr) = 0.0;
  TORCH_ARG(double, lambda_fr_sd) = 0.0;
  TORCH_ARG(double, lambda_fr_cv) = 0.0;
};

class RNNLossImpl : public torch::nn::Module {
 public:
  /// Holds `model` as the submodule "model": the weight penalties read its live parameters.
  explicit RNNLossImpl(CTRNN model, const RNNLossOptions& options = RNNLossOptions());

  /// pred, label: any identical shape; states: (…, N_hid), required when λ_fr, λ_fr_sd or
  /// λ_fr_cv > 0; mask: undefined, or shaped like pred or like pred without its last axis.
  /// Returns (total (0-dim), components (7)); float16/bfloat16 give float32.
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& pred, const torch::Tensor& label,
                                                   const torch::Tensor& states = torch::Tensor(),
                                                   const torch::Tensor& mask = torch::Tensor());

  /// Change an active component's λ (annealing); name is one of component_names().
  void set_lambda(const std::string& name, double value);
  const std::vector<std::string>& component_names() const { return rnnloss::component_names(); }
  /// Names of the components computed by this loss (fixed at construction).
  std::vector<std::string> active() const;
  bool is_active(int64_t index) const { return on_.at(static_cast<size_t>(index)); }

  /// `lambdas` stays float64 whatever dtype the module is moved to.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  CTRNN model{nullptr};
  /// The λ values, float64 [7] (a buffer: saved, moved with to(), writable for annealing).
  torch::Tensor lambdas;

 private:
  void check_lambdas();

  std::array<bool, 7> on_{};
  bool need_states_ = false, need_means_ = false;
  torch::Tensor checked_;          // off the CPU: the lambdas tensor last validated, its storage (held:
  c10::Storage checked_storage_;   // its address cannot be reused), version counter and data
  int64_t checked_version_ = -1;
  const void* checked_data_ = nullptr;
};
TORCH_MODULE(RNNLoss);

}  // namespace rnnloss
