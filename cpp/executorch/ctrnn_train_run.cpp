// ctrnn_train_run PROGRAM.pte IN OUT --steps N --lr LR: SGD on ctrnn_train.pte (rnnloss-export's joint
// forward-backward program) with ExecuTorch's plain Module.
//
// The pip wheel ships no training module for C++, and none is needed: the program's methods
// __et_training_gradients_index_forward, __et_training_parameters_index_forward and __et_training_fqn_forward
// say where forward's outputs (total, components, gradients..., parameters...) hold the gradients and the
// parameters and what they are called, and the parameter outputs alias the program's own weights, so
// p -= lr * g in place is a step of plain SGD (what Python's get_sgd_optimizer(lr, no momentum, no decay) does).
//
// IN holds x, target and (when the program was exported with "mask": true) mask; OUT gets loss (the total of
// every step, before its update) and the final parameters, named as in RNNLoss's state_dict
// ("model.recurrent_layer.hidden_layer.weight", ...). File format and exit statuses: common.h.
#include <chrono>
#include <cstring>

#include "common.h"

static const char* const USAGE =
    "usage: ctrnn_train_run PROGRAM.pte IN OUT --steps N --lr LR\n"
    "  N steps of plain SGD (learning rate LR) on the training program PROGRAM.pte (ctrnn_train.pte of\n"
    "  rnnloss-export) with the tensors x, target and, for a program exported with a mask, mask from IN.\n"
    "  Writes to OUT the tensor loss (N,), the total before each update, and the final parameters by name.\n"
    "  Tensor files: named float32 tensors, each int32 name_length, name, int32 ndim, int64 sizes[ndim],\n"
    "  float32 data (little endian, row-major). x is (time, batch, n_in), or (batch, time, n_in) for a\n"
    "  batch_first model; target and mask are shaped like x with n_out features; mask is finite and >= 0.\n"
    "Exit status: 0 done, 2 refused (usage, input files, shapes), 1 the runtime failed.\n";

static double number(const std::string& option, const char* text) {
  char* end = nullptr;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || !std::isfinite(v)) throw Refused(option + " takes a number, not '" + text + "'");
  return v;
}

int main(int argc, char** argv) {
  return run_main("ctrnn_train_run", [&] {
    std::vector<std::string> args;
    double steps_arg = -1, lr = -1;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--help" || a == "-h") {
        std::fputs(USAGE, stdout);
        return;
      }
      if (a == "--steps" || a == "--lr") {
        if (i + 1 == argc) throw Refused(a + " needs a value");
        (a == "--steps" ? steps_arg : lr) = number(a, argv[++i]);
      } else if (a.rfind("--", 0) == 0) {
        throw Refused("unknown option " + a + " (see --help)");
      } else {
        args.push_back(a);
      }
    }
    if (args.size() != 3) throw Refused("expected PROGRAM.pte IN OUT --steps N --lr LR (see --help)");
    if (steps_arg < 1 || steps_arg > 1e9 || steps_arg != std::floor(steps_arg))
      throw Refused("--steps takes a whole number of steps, at least 1");
    if (lr <= 0) throw Refused("--lr takes a learning rate > 0");
    const int64_t steps = static_cast<int64_t>(steps_arg);
    const std::string &path = args[0], &in = args[1], &out = args[2];

    Module module(path, Module::LoadMode::File);
    const Contract contract = contract_of(module, path);
    if (!module.method_names()->count("__et_training_fqn_forward"))
      throw Refused(path + " is not a training program (no __et_training_* methods); "
                    "ctrnn_train_run runs ctrnn_train.pte");
    const size_t grads_at = int_method(module, "__et_training_gradients_index_forward");
    const size_t params_at = int_method(module, "__et_training_parameters_index_forward");
    std::vector<std::string> fqns;
    for (const auto& v : execute(module, "__et_training_fqn_forward")) fqns.emplace_back(v.toString());
    if (grads_at < 1 || params_at != grads_at + fqns.size())
      throw std::runtime_error("the __et_training_* methods disagree on the number of parameters");

    // The inputs, checked against the contract before anything runs.
    const bool masked = contract.inputs.size() == 3;
    std::vector<std::string> wanted{"x", "target"};
    if (masked) wanted.push_back("mask");
    Tensors tensors = read_tensors(in);
    std::vector<Tensor*> t = take(tensors, wanted, in);
    contract.check("x", *t[0], contract.inputs[0][2], "n_in");
    contract.check("target", *t[1], contract.inputs[1][2], "n_out", t[0]);
    if (masked) {
      contract.check("mask", *t[2], contract.inputs[2][2], "n_out", t[0]);
      for (float m : t[2]->data)
        if (!(m >= 0 && std::isfinite(m))) throw Refused("mask holds a negative or non-finite value");
    }
    std::vector<executorch::extension::TensorPtr> held;
    std::vector<et::EValue> inputs;
    for (Tensor* tensor : t) {
      held.push_back(as_input(*tensor));
      inputs.emplace_back(*held.back());
    }

    std::vector<float> losses;
    std::vector<et::EValue> outputs;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t step = 0; step < steps; ++step) {
      outputs = execute(module, "forward", inputs);
      if (outputs.size() != params_at + fqns.size())
        throw std::runtime_error("forward answered " + std::to_string(outputs.size()) + " values, not " +
                                 std::to_string(params_at + fqns.size()));
      losses.push_back(outputs[0].toTensor().const_data_ptr<float>()[0]);
      for (size_t i = 0; i < fqns.size(); ++i) {
        const auto& g = outputs[grads_at + i].toTensor();
        auto p = outputs[params_at + i].toTensor();
        if (g.numel() != p.numel()) throw std::runtime_error(fqns[i] + ": gradient and parameter sizes differ");
        float* pd = p.mutable_data_ptr<float>();
        const float* gd = g.const_data_ptr<float>();
        for (ssize_t k = 0; k < p.numel(); ++k) pd[k] -= static_cast<float>(lr) * gd[k];
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    // The parameter outputs of the last step alias the weights, which hold the last update.
    std::vector<Named> written{{"loss", {steps}, losses.data()}};
    for (size_t i = 0; i < fqns.size(); ++i) {
      const std::string& fqn = fqns[i];
      written.push_back(named(fqn.rfind("loss.", 0) == 0 ? fqn.substr(5) : fqn, outputs[params_at + i].toTensor()));
    }
    write_tensors(out, written);
    std::printf("%lld steps, loss %.6g -> %.6g, %.1f us/step\n", static_cast<long long>(steps), losses.front(),
                losses.back(), 1e6 * seconds / steps);
  });
}
