// rnnloss::CTRNN — the continuous-time RNN of the Python package, in libtorch's C++ frontend.
//
// Dynamics (α = dt / τ, or one learnable α per neuron with learn_alpha):
//   v_{t+1} = (1 − α) v_t + α (W_hid r_t + b_hid + W_in u_t + b_in + σ_pre ξ_t)
//   r_{t+1} = f(v_{t+1}) + σ_post η_t,   output_t = W_out r_t + b_out
// with v_0 = init_state (or recurrent_layer.hidden_state with init_state "learn", else 0) and
// r_0 = f(v_0); noise only in training mode. states holds r_1 … r_T.
#pragma once

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

namespace rnnloss {

/// Options of CTRNN; the setters carry the Python keyword names.
struct CTRNNOptions {
  CTRNNOptions(int64_t n_in, int64_t n_hid, int64_t n_out) : n_in_(n_in), n_hid_(n_hid), n_out_(n_out) {}

  TORCH_ARG(int64_t, n_in);
  TORCH_ARG(int64_t, n_hid);
  TORCH_ARG(int64_t, n_out);
  /// Time constant and step (same unit); α = dt / τ must lie in (0, 1].
  TORCH_ARG(double, tau) = 100.0;
  TORCH_ARG(double, dt) = 10.0;
  /// "relu", "tanh", "sigmoid", "softplus" or "retanh" (max(tanh(x), 0)).
  TORCH_ARG(std::string, activation) = "relu";
  /// σ_pre and σ_post (>= 0), used in training mode only.
  TORCH_ARG(double, preact_noise) = 0.0;
  TORCH_ARG(double, postact_noise) = 0.0;
  /// Per layer (input, hidden, readout): "uniform" (Python True), "normal", "zero" (trained, from 0),
  /// "fixed" (Python None: a zero bias that is not trained) or "absent" (Python False: no bias).
  TORCH_ARG(std::vector<std::string>, biases) = std::vector<std::string>(3, "uniform");
  /// Per layer: "uniform" (U(±1/√fan_in)), "normal" (N(0, 1/fan_in)) or "zero".
  TORCH_ARG(std::vector<std::string>, weights) = std::vector<std::string>(3, "uniform");
  /// Empty, or three tensors (input, hidden, readout), each undefined (no mask) or shaped like
  /// the weight (out × in); 0 marks an absent synapse.
  TORCH_ARG(std::vector<torch::Tensor>, sparsity_masks);
  /// Empty, or three sign tensors: length in_features (Dale's law) or shaped like the weight;
  /// +1 excitatory, −1 inhibitory, 0 unconstrained.
  TORCH_ARG(std::vector<torch::Tensor>, ei_masks);
  /// Empty, or three per-synapse gradient scales (>= 0), used by apply_plasticity().
  TORCH_ARG(std::vector<torch::Tensor>, plasticity_masks);
  /// "zero" (v_0 = 0) or "learn" (v_0 = recurrent_layer.hidden_state, trained).
  TORCH_ARG(std::string, init_state) = "zero";
  /// One trained α per neuron (recurrent_layer.alpha), kept in [1e-3, 1] by enforce_constraints().
  TORCH_ARG(bool, learn_alpha) = false;
  /// x, output and states are (B, T, ·) instead of (T, B, ·).
  TORCH_ARG(bool, batch_first) = false;

 public:
  /// The same bias for all three layers: true = "uniform", false = "absent".
  CTRNNOptions& biases(bool on) {
    biases_ = std::vector<std::string>(3, on ? "uniform" : "absent");
    return *this;
  }
  /// The same initialisation for all three layers.
  CTRNNOptions& weights(const std::string& init) {
    weights_ = std::vector<std::string>(3, init);
    return *this;
  }
  CTRNNOptions& weights(const char* init) { return weights(std::string(init)); }
};

/// Holds W_in, W_hid (nn::Linear "input_layer", "hidden_layer"), "hidden_state" and, with
/// learn_alpha, "alpha": Python's recurrent_layer.*.
class RecurrentLayerImpl : public torch::nn::Cloneable<RecurrentLayerImpl> {
 public:
  RecurrentLayerImpl(int64_t n_in, int64_t n_hid, bool bias_in, bool bias_hid, bool learn_init, double alpha,
                     bool learn_alpha);
  /// Registers the layers and parameters anew (zero weights; CTRNN initialises them).
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  torch::nn::Linear input_layer{nullptr}, hidden_layer{nullptr};
  torch::Tensor hidden_state, alpha;  // alpha is undefined unless learn_alpha

 private:
  int64_t n_in_, n_hid_;
  bool bias_in_, bias_hid_, learn_init_;
  double alpha_;
  bool learn_alpha_;
};
TORCH_MODULE(RecurrentLayer);

/// The model. A Cloneable module: clone() is a deep copy (parameters, buffers, requires_grad flags).
class CTRNNImpl : public torch::nn::Cloneable<CTRNNImpl> {
 public:
  /// Checks the options (Python's messages, c10::ValueError / c10::TypeError) and builds the model.
  explicit CTRNNImpl(const CTRNNOptions& options);

  /// Builds the layers, masks and initial weights from options() anew (the constructor's work).
  void reset() override;
  /// A deep copy on `device` (or where each tensor is), requires_grad flags included.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;
  /// rnnloss::CTRNN(dims=(3, 64, 2), tau=100.0, dt=10.0, activation='relu', layout=(T, B, N)[, ...]):
  /// the options that differ from a plain model, as Python's repr writes them.
  void pretty_print(std::ostream& stream) const override;

  /// x: (T, B, N_in), or (B, T, N_in) with batch_first; init_state: (B, N_hid) or undefined.
  /// Returns (output, states) in x's layout with N_out and N_hid last.
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x,
                                                   const torch::Tensor& init_state = torch::Tensor());

  /// Project the weights in place: zero absent synapses, clamp signs to the E/I masks, keep a
  /// learnable α in [1e-3, 1]. Called at construction; call it after each optimizer step.
  void enforce_constraints();
  /// Scale each weight's gradient by its plasticity mask (call between backward() and step()).
  void apply_plasticity();

  const CTRNNOptions& options() const { return options_; }
  int64_t n_in() const { return options_.n_in(); }
  int64_t n_hid() const { return options_.n_hid(); }
  int64_t n_out() const { return options_.n_out(); }
  /// dt / τ (the fixed α; with learn_alpha the initial value of recurrent_layer.alpha).
  double alpha() const { return alpha_; }

  RecurrentLayer recurrent_layer{nullptr};
  torch::nn::Linear readout_layer{nullptr};

 private:
  torch::Tensor activate(const torch::Tensor& v) const;
  torch::nn::Linear& layer(int index);

  CTRNNOptions options_;
  double alpha_ = 0.0;
  // Given masks are registered buffers (sparsity_input, sign_hidden, plasticity_readout, ...);
  // an absent mask stays undefined here and is not a buffer (Python's non-persistent placeholder).
  torch::Tensor sparsity_[3], sign_[3], plasticity_[3];
};
TORCH_MODULE(CTRNN);

}  // namespace rnnloss
