// train_ctrnn ARTIFACT_DIR [--steps N] [--device cpu|cuda] [--out FILE] [--log-every K] [--seed S]
//             [--time T] [--batch B]
//
// Trains the CTRNN in ARTIFACT_DIR/ctrnn_train.pt from C++ on a perceptual decision task:
// noisy evidence for one of N_out choices on the first input channels, a fixation cue on the
// last channel (when N_in > N_out), and a one-hot response after a delay. Adam over the module's
// parameters, enforce_constraints() after every step, and λ_fr annealed (linearly to a tenth of
// its initial value) by writing the `lambdas` buffer. Ends with
//   initial_mse=<float> final_mse=<float> steps=<int>
// and exits 0 only if the final MSE (on a fixed evaluation batch) is at most half the initial.
// It also prints ms_per_step=<median wall time of a training step after the first 5 steps>.
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

namespace {

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
  auto onehot = torch::one_hot(choice, n_out).to(torch::kFloat32);            // (B, N_out)
  auto evidence = torch::one_hot(choice, n_in).to(torch::kFloat32) * coherence.unsqueeze(1);
  x.slice(0, 0, stim_end) += evidence.unsqueeze(0);
  if (n_in > n_out) x.select(2, n_in - 1).slice(0, 0, respond) += 1.0;       // fixation cue
  target.slice(0, respond, time) += onehot.unsqueeze(0);
  return {x, target};
}

torch::Tensor layout(const torch::Tensor& t, bool batch_first) {
  return batch_first ? t.transpose(0, 1).contiguous() : t;
}

void usage() {
  std::cerr << "usage: train_ctrnn ARTIFACT_DIR [--steps N] [--device cpu|cuda] [--out FILE]"
               " [--log-every K] [--seed S] [--time T] [--batch B]\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage();
    return 2;
  }
  std::string dir = argv[1], out_path = dir + "/ctrnn_trained.pt", device_name = "cpu";
  int64_t steps = 300, log_every = 50, seed = 0, time = 50, batch = 32;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    std::string val = argv[++i];
    if (arg == "--steps") steps = std::atoll(val.c_str());
    else if (arg == "--device") device_name = val;
    else if (arg == "--out") out_path = val;
    else if (arg == "--log-every") log_every = std::atoll(val.c_str());
    else if (arg == "--seed") seed = std::atoll(val.c_str());
    else if (arg == "--time") time = std::atoll(val.c_str());
    else if (arg == "--batch") batch = std::atoll(val.c_str());
    else {
      usage();
      return 2;
    }
  }
  if (steps <= 0 || log_every <= 0 || time < 5 || batch <= 0 || (device_name != "cpu" && device_name != "cuda")) {
    usage();
    return 2;
  }
  try {
    torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    if (device.is_cuda() && !torch::cuda::is_available()) {
      std::cerr << "train_ctrnn: --device cuda: no CUDA GPU available\n";
      return 2;
    }
    torch::manual_seed(seed);
    torch::jit::Module module = torch::jit::load(dir + "/ctrnn_train.pt", device);
    module.train();
    auto dims = module.run_method("dims").toIntVector();
    bool batch_first = module.run_method("is_batch_first").toBool();
    auto loss = module.attr("loss").toModule();
    auto names = loss.attr("component_names").toList();
    auto lambdas = loss.attr("lambdas").toTensor();  // the live buffer: writes take effect
    const int64_t fr = 4;
    double lambda_fr0 = lambdas[fr].item<double>();

    std::vector<torch::Tensor> params;
    for (const auto& p : module.parameters()) params.push_back(p);
    torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-2));

    auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    Task eval = make_trials(time, batch, dims[0], dims[2], gen);
    auto eval_x = layout(eval.x, batch_first).to(device), eval_t = layout(eval.target, batch_first).to(device);
    auto mse_on_eval = [&]() {
      torch::NoGradGuard no_grad;
      module.eval();
      auto out = module.forward({eval_x, eval_t}).toTuple();
      module.train();
      return out->elements()[1].toTensor()[0].item<double>();
    };
    double initial = mse_on_eval();

    std::vector<double> step_ms;
    for (int64_t step = 1; step <= steps; ++step) {
      {  // anneal λ_fr through the buffer
        torch::NoGradGuard no_grad;
        lambdas[fr].fill_(lambda_fr0 * (1.0 - 0.9 * static_cast<double>(step - 1) / std::max<int64_t>(steps - 1, 1)));
      }
      Task trials = make_trials(time, batch, dims[0], dims[2], gen);
      auto x = layout(trials.x, batch_first).to(device), target = layout(trials.target, batch_first).to(device);
      auto t0 = std::chrono::steady_clock::now();  // timed: forward, backward, step, constraints
      auto out = module.forward({x, target}).toTuple();
      auto total = out->elements()[0].toTensor();
      auto components = out->elements()[1].toTensor();
      opt.zero_grad();
      total.backward();
      opt.step();
      module.run_method("enforce_constraints");
      if (device.is_cuda()) torch::cuda::synchronize();
      step_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      if (step == 1 || step % log_every == 0 || step == steps) {
        auto c = components.detach().cpu();
        std::cout << "step " << step << " total=" << std::setprecision(6) << total.item<double>();
        for (size_t k = 0; k < names.size(); ++k)
          std::cout << " " << names.get(k).toStringRef() << "=" << c[static_cast<int64_t>(k)].item<double>();
        std::cout << " lambda_fr=" << lambdas[fr].item<double>() << "\n";
      }
    }
    double final_mse = mse_on_eval();
    // Median step time once TorchScript's profiling executor has optimised the graph.
    std::vector<double> steady(step_ms.begin() + std::min<size_t>(5, step_ms.size() - 1), step_ms.end());
    std::nth_element(steady.begin(), steady.begin() + steady.size() / 2, steady.end());
    std::cout << "ms_per_step=" << steady[steady.size() / 2] << "\n";
    module.to(torch::kCPU);
    module.save(out_path);
    std::cout << "saved " << out_path << "\n";
    std::cout << "initial_mse=" << initial << " final_mse=" << final_mse << " steps=" << steps << std::endl;
    return final_mse <= 0.5 * initial ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "train_ctrnn: " << e.what() << "\n";
    return 1;
  }
}
