// rnnloss::RNNLoss — the composite CTRNN loss of the Python package, in libtorch's C++ frontend.
//
// forward(pred, label, states, mask) -> (total, components), components of length 7 in the fixed
// order of component_names(), λ applied, total = components.sum():
//   0 mse    λ_mse · mean((pred − label)²)   (with a mask w: Σ w·(pred − label)² / Σ w, the weights
//                                             divided by their largest first: tiny weights lose nothing)
//   1 in     λ_in  · ‖W_in‖²_F / (N_in · N_hid)
//   2 hid    λ_hid · ‖W_hid‖²_F / N_hid²
//   3 out    λ_out · ‖W_out‖²_F / (N_out · N_hid)
//   4 fr     λ_fr  · mean of r² over every sample and neuron
//   5 fr_sd  λ_fr_sd · σ, σ the population SD of the per-neuron mean rates
//   6 fr_cv  λ_fr_cv · σ / μ, μ the mean of all rates
// A component whose λ is 0 at construction is inactive: never computed, its entry exactly 0.
// λ are checked where they are written (constructor, set_lambda, rnnloss::load); forward checks the
// buffer's dtype and shape, its values on the CPU, and elsewhere with a device-side assertion (no
// host–device synchronisation). Misuse throws c10::ValueError / c10::TypeError with Python's message.
#pragma once

#include <rnnloss/ctrnn.h>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <array>
#include <ostream>
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

/// The loss. A Cloneable module: clone() deep-copies it and its model.
class RNNLossImpl : public torch::nn::Cloneable<RNNLossImpl> {
 public:
  /// Holds `model` as the submodule "model": the weight penalties read its live parameters. Every
  /// λ must be finite in float32 and >= 0 (c10::ValueError with Python's message).
  explicit RNNLossImpl(CTRNN model, const RNNLossOptions& options = RNNLossOptions());

  /// Registers a fresh model (built from the model's options) and λ from `options`: what clone()
  /// calls on its copy, whose submodules and buffers it has cleared, before filling in copies.
  void reset() override;
  /// rnnloss::RNNLoss(lambda_mse=1, lambda_fr=0.01): the non-zero λ, as Python's repr writes them.
  void pretty_print(std::ostream& stream) const override;

  /// pred, label: any identical shape; states: (…, N_hid), required when λ_fr, λ_fr_sd or
  /// λ_fr_cv > 0; mask: undefined, or shaped like pred or like pred without its last axis.
  /// Returns (total (0-dim), components (7)); float16/bfloat16 give float32.
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& pred, const torch::Tensor& label,
                                                   const torch::Tensor& states = torch::Tensor(),
                                                   const torch::Tensor& mask = torch::Tensor());

  /// Change a λ (annealing); name is one of component_names(). An inactive component's λ stays 0.
  void set_lambda(const std::string& name, double value);
  const std::vector<std::string>& component_names() const { return rnnloss::component_names(); }
  /// Names of the components computed by this loss (fixed at construction).
  std::vector<std::string> active() const;
  bool is_active(int64_t index) const { return on_.at(static_cast<size_t>(index)); }

  /// `lambdas` stays float64 whatever dtype the module is moved to.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  /// The construction λ (reset() restores them).
  RNNLossOptions options;
  CTRNN model{nullptr};
  /// The λ values, float64 [7] (a buffer: saved, moved with to(), writable for annealing).
  torch::Tensor lambdas;

 private:
  /// The λ buffer, checked: dtype and shape always; the values on the CPU, or else by a device-side
  /// assertion (no host–device synchronisation).
  torch::Tensor checked_lambdas() const;
  void register_lambdas();

  std::array<bool, 7> on_{};
  bool need_states_ = false, need_means_ = false;
};
TORCH_MODULE(RNNLoss);

}  // namespace rnnloss
