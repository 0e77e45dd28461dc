// train_ctrnn: train the exported CTRNN from C++ on a perceptual decision task; see usage().
//
// The task: noisy evidence for one of N_out choices on the first input channels, a fixation cue
// on the last channel (when N_in > N_out), and a one-hot response after a delay. Adam over the
// model's parameters, apply_plasticity() before and enforce_constraints() after every step, λ_fr
// annealed linearly to a tenth of its initial value. Two engines run the same loop:
//   native       rnnloss::load(ARTIFACT_DIR): the C++ library, no TorchScript (rnnloss_native.pt)
//   torchscript  ARTIFACT_DIR/ctrnn_train.pt through torch::jit
#include <rnnloss/rnnloss.h>

#include "cli.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/cuda.h>
#include <torch/optim/adam.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char* const kUsage =
    "usage: train_ctrnn ARTIFACT_DIR [--engine native|torchscript] [--steps N] [--device cpu|cuda]\n"
    "                   [--out FILE] [--log-every K] [--seed S] [--time T] [--batch B]\n"
    "\n"
    "Trains the exported CTRNN on a perceptual decision task with Adam (lr 1e-2), calling\n"
    "apply_plasticity() and enforce_constraints() around each step and annealing lambda_fr to a\n"
    "tenth of its initial value. Logs the named loss components every K steps (default 50), then\n"
    "prints ms_per_step=<median step time after the first 5 steps>, saves the trained model to FILE\n"
    "and ends with initial_mse=<float> final_mse=<float> steps=<int> (MSE on a fixed batch).\n"
    "\n"
    "  --engine native       rnnloss::load(ARTIFACT_DIR): the C++ library, reads rnnloss_native.pt;\n"
    "                        FILE holds the loss's state_dict as (name, tensor) pairs (default\n"
    "                        ./ctrnn_trained_native.pt); in Python:\n"
    "                        loss.load_state_dict(dict(torch.load(FILE, weights_only=True)))\n"
    "  --engine torchscript  ARTIFACT_DIR/ctrnn_train.pt through TorchScript;\n"
    "                        FILE is a TorchScript module (default ./ctrnn_trained.pt)\n"
    "  defaults: --engine native --steps 300 --device cpu --seed 0 --time 50 --batch 32\n"
    "  N, K, T, B and S are decimal integers in the 64-bit range (no sign for N, K, T, B); FILE's\n"
    "  folder must exist and be writable (checked before training). FILE is not written into\n"
    "  ARTIFACT_DIR by default: a file the export did not write there makes a later\n"
    "  `rnnloss-export --force` refuse to replace that folder.\n"
    "\n"
    "Exit status: 0 the final MSE is at most half the initial one; 1 it is not, or training failed;\n"
    "2 bad arguments. Every non-zero exit prints one line saying why.\n";

struct Task {
  torch::Tensor x, target;  // time-first (T, B, ·)
};

// Perceptual decision: stimulus for t < 0.6T, delay until 0.7T, then respond.
Task make_trials(int64_t time, int64_t batch, int64_t n_in, int64_t n_out, torch::Generator& gen) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  int64_t n_evidence = std::min(n_in, n_out);
  auto choice = torch::randint(n_evidence, {batch}, gen, torch::kLong);
  auto coherence = 0.5 + torch::rand({batch}, gen, opts);
  auto x = 0.3 * torch::randn({time, batch, n_in}, gen, opts);
  auto target = torch::zeros({time, batch, n_out}, opts);
  int64_t stim_end = time * 6 / 10, respond = time * 7 / 10;
  auto onehot = torch::one_hot(choice, n_out).to(torch::kFloat32);  // (B, N_out)
  auto evidence = torch::one_hot(choice, n_in).to(torch::kFloat32) * coherence.unsqueeze(1);
  x.slice(0, 0, stim_end) += evidence.unsqueeze(0);
  if (n_in > n_out) x.select(2, n_in - 1).slice(0, 0, respond) += 1.0;  // fixation cue
  target.slice(0, respond, time) += onehot.unsqueeze(0);
  return {x, target};
}

torch::Tensor layout(const torch::Tensor& t, bool batch_first) {
  return batch_first ? t.transpose(0, 1).contiguous() : t;
}

// What the loop needs from either engine.
struct Engine {
  std::vector<int64_t> dims;  // N_in, N_hid, N_out
  bool batch_first = false;
  torch::Dtype dtype = torch::kFloat32;
  std::vector<std::string> names;
  std::vector<torch::Tensor> parameters;
  double lambda_fr0 = 0.0;
  std::function<std::pair<torch::Tensor, torch::Tensor>(const torch::Tensor&, const torch::Tensor&)> forward;
  std::function<void(bool)> train;
  std::function<void()> apply_plasticity, enforce_constraints;
  std::function<void(double)> set_lambda_fr;
  std::function<double()> lambda_fr;
  std::function<void(const std::string&)> save;
};

Engine native_engine(const std::string& dir, torch::Device device) {
  auto exported = rnnloss::load(dir);
  auto model = exported.model;
  auto loss = exported.loss;
  loss->to(device);  // the model is its submodule
  Engine e;
  e.dims = {model->n_in(), model->n_hid(), model->n_out()};
  e.batch_first = model->options().batch_first();
  e.dtype = model->readout_layer->weight.scalar_type();
  e.names = loss->component_names();
  e.parameters = model->parameters();
  e.lambda_fr0 = loss->lambdas[4].item<double>();
  e.forward = [model, loss](const torch::Tensor& x, const torch::Tensor& target) mutable {
    auto [output, states] = model->forward(x);
    auto [total, components] = loss->forward(output, target, states);
    return std::make_pair(total, components);
  };
  e.train = [loss](bool on) mutable { loss->train(on); };
  e.apply_plasticity = [model]() mutable { model->apply_plasticity(); };
  e.enforce_constraints = [model]() mutable { model->enforce_constraints(); };
  e.set_lambda_fr = [loss](double value) mutable {
    if (loss->is_active(4)) loss->set_lambda("fr", value);
  };
  e.lambda_fr = [loss]() { return loss->lambdas[4].item<double>(); };
  e.save = [loss](const std::string& path) mutable {
    // The loss's state_dict as (name, tensor) pairs: a plain tuple that Python reads with
    // torch.load(path, weights_only=True); the names are Python's RNNLoss.state_dict() keys.
    std::vector<c10::IValue> items;
    for (const auto& p : loss->named_parameters())
      items.push_back(c10::ivalue::Tuple::create({p.key(), p.value().detach().cpu()}));
    for (const auto& b : loss->named_buffers())
      items.push_back(c10::ivalue::Tuple::create({b.key(), b.value().detach().cpu()}));
    auto bytes = torch::pickle_save(c10::ivalue::Tuple::create(items));
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("cannot write --out " + path);
  };
  return e;
}

Engine torchscript_engine(const std::string& dir, torch::Device device) {
  auto module = std::make_shared<torch::jit::Module>(torch::jit::load(dir + "/ctrnn_train.pt", device));
  auto loss = module->attr("loss").toModule();
  auto lambdas = loss.attr("lambdas").toTensor();  // the live buffer: writes take effect
  Engine e;
  e.dims = module->run_method("dims").toIntVector();
  e.batch_first = module->run_method("is_batch_first").toBool();
  e.dtype = loss.attr("model").toModule().attr("readout_layer").toModule().attr("weight").toTensor().scalar_type();
  for (const auto& name : loss.attr("component_names").toList()) e.names.push_back(name.get().toStringRef());
  for (const auto& p : module->parameters()) e.parameters.push_back(p);
  e.lambda_fr0 = lambdas[4].item<double>();
  e.forward = [module](const torch::Tensor& x, const torch::Tensor& target) {
    auto out = module->forward({x, target}).toTuple();
    return std::make_pair(out->elements()[0].toTensor(), out->elements()[1].toTensor());
  };
  e.train = [module](bool on) { module->train(on); };
  e.apply_plasticity = [loss]() { loss.attr("model").toModule().run_method("apply_plasticity"); };
  e.enforce_constraints = [module]() { module->run_method("enforce_constraints"); };
  e.set_lambda_fr = [lambdas](double value) mutable {  // through the buffer (0 stays 0 when inactive)
    torch::NoGradGuard no_grad;
    lambdas[4].fill_(value);
  };
  e.lambda_fr = [lambdas]() { return lambdas[4].item<double>(); };
  e.save = [module](const std::string& path) {
    module->to(torch::kCPU);
    module->save(path);
  };
  return e;
}

int fail(int status, const std::string& why) { return cli::fail("train_ctrnn", status, why); }

// The whole of `text` as a decimal int64 (an optional '-', then digits: no spaces, no '+', no
// base prefix); false if it is anything else or out of the 64-bit range.
bool parse_int(const std::string& text, int64_t& out) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value, 10);
  if (ec != std::errc() || ptr != end) return false;
  out = value;
  return true;
}

// Why FILE cannot be written, or "" if it looks writable: its folder must exist, be a folder and
// be writable, and FILE must not be a folder (or, if it exists, must be writable).
std::string out_problem(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file(path);
  if (fs::is_directory(file, ec)) return "is a folder";
  fs::path folder = file.parent_path().empty() ? fs::path(".") : file.parent_path();
  auto status = fs::status(folder, ec);
  if (ec && ec != std::errc::no_such_file_or_directory) return "folder " + folder.string() + ": " + ec.message();
  if (!fs::exists(status)) return "folder " + folder.string() + " does not exist";
  if (!fs::is_directory(status)) return folder.string() + " is not a folder";
  if (::access(folder.c_str(), W_OK) != 0) return "folder " + folder.string() + " is not writable";
  if (fs::exists(file, ec) && ::access(file.c_str(), W_OK) != 0) return "the file exists and is not writable";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  if (args.empty() || args[0].rfind("--", 0) == 0)
    return fail(2, "the first argument must be the artifact folder (see --help)");
  std::string dir = args[0], out_path, device_name = "cpu", engine_name = "native";
  int64_t steps = 300, log_every = 50, seed = 0, time = 50, batch = 32;
  for (size_t i = 1; i < args.size(); i += 2) {
    const std::string& arg = args[i];
    if (i + 1 >= args.size()) return fail(2, arg + " needs a value (see --help)");
    const std::string& val = args[i + 1];
    bool ok = true;
    if (arg == "--steps") ok = parse_int(val, steps) && steps > 0;
    else if (arg == "--log-every") ok = parse_int(val, log_every) && log_every > 0;
    else if (arg == "--seed") ok = parse_int(val, seed);
    else if (arg == "--time") ok = parse_int(val, time) && time >= 5;
    else if (arg == "--batch") ok = parse_int(val, batch) && batch > 0;
    else if (arg == "--device") ok = (device_name = val) == "cpu" || val == "cuda";
    else if (arg == "--engine") ok = (engine_name = val) == "native" || val == "torchscript";
    else if (arg == "--out") ok = !(out_path = val).empty();
    else return fail(2, "unknown argument " + arg + " (see --help)");
    if (!ok) {
      const char* expected = arg == "--device" ? "cpu or cuda"
                             : arg == "--engine" ? "native or torchscript"
                             : arg == "--time"   ? "an integer >= 5"
                             : arg == "--seed"   ? "an integer"
                             : arg == "--out"    ? "a file path"
                                                 : "an integer > 0";
      return fail(2, arg + " must be " + expected + ", got '" + val + "'");
    }
  }
  const bool native = engine_name == "native";
  if (out_path.empty()) out_path = native ? "./ctrnn_trained_native.pt" : "./ctrnn_trained.pt";
  if (auto problem = out_problem(out_path); !problem.empty()) return fail(2, "--out " + out_path + ": " + problem);
  try {
    torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    if (device.is_cuda() && !torch::cuda::is_available()) return fail(2, "--device cuda: no CUDA GPU available");
    torch::manual_seed(seed);
    Engine e = native ? native_engine(dir, device) : torchscript_engine(dir, device);
    e.train(true);
    torch::optim::Adam opt(e.parameters, torch::optim::AdamOptions(1e-2));

    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    auto to_model = [&](const torch::Tensor& t) { return layout(t, e.batch_first).to(device, e.dtype); };
    Task eval = make_trials(time, batch, e.dims[0], e.dims[2], gen);
    auto eval_x = to_model(eval.x), eval_t = to_model(eval.target);
    auto mse_on_eval = [&]() {
      torch::NoGradGuard no_grad;
      e.train(false);
      auto components = e.forward(eval_x, eval_t).second;
      e.train(true);
      return components[0].item<double>();
    };
    double initial = mse_on_eval();

    std::vector<double> step_ms;
    for (int64_t step = 1; step <= steps; ++step) {
      e.set_lambda_fr(e.lambda_fr0 *
                      (1.0 - 0.9 * static_cast<double>(step - 1) / static_cast<double>(std::max<int64_t>(steps - 1, 1))));
      Task trials = make_trials(time, batch, e.dims[0], e.dims[2], gen);
      auto x = to_model(trials.x), target = to_model(trials.target);
      auto t0 = std::chrono::steady_clock::now();  // timed: forward, backward, step, constraints
      auto [total, components] = e.forward(x, target);
      opt.zero_grad();
      total.backward();
      e.apply_plasticity();
      opt.step();
      e.enforce_constraints();
      if (device.is_cuda()) torch::cuda::synchronize();
      step_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      if (step == 1 || step % log_every == 0 || step == steps) {
        auto c = components.detach().cpu();
        std::cout << "step " << step << " total=" << std::setprecision(6) << total.item<double>();
        for (size_t k = 0; k < e.names.size(); ++k)
          std::cout << " " << e.names[k] << "=" << c[static_cast<int64_t>(k)].item<double>();
        std::cout << " lambda_fr=" << e.lambda_fr() << "\n";
      }
    }
    double final_mse = mse_on_eval();
    // Median step time once warm (TorchScript's profiling executor optimises in the first steps).
    std::vector<double> steady(step_ms.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(5, step_ms.size() - 1)),
                               step_ms.end());
    std::nth_element(steady.begin(), steady.begin() + static_cast<std::ptrdiff_t>(steady.size() / 2), steady.end());
    std::cout << "ms_per_step=" << steady[steady.size() / 2] << "\n";
    e.save(out_path);
    std::cout << "saved " << out_path << "\n";
    std::cout << "initial_mse=" << initial << " final_mse=" << final_mse << " steps=" << steps << std::endl;
    if (final_mse > 0.5 * initial) {
      std::ostringstream why;
      why << "the MSE on the evaluation batch did not halve (" << initial << " -> " << final_mse
          << "); train longer (--steps)";
      return fail(1, why.str());
    }
    return 0;
  } catch (const c10::Error& err) {
    return fail(1, err.what_without_backtrace());
  } catch (const std::exception& err) {
    return fail(1, err.what());
  }
}
