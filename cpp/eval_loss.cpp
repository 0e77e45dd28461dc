// eval_loss ARTIFACT_DIR INPUTS OUTPUTS
//
// Loads ARTIFACT_DIR/rnn_loss.pt, reads pred, label and states from INPUTS (a dict of tensors
// written by Python's torch.save), evaluates the loss and its gradients with respect to pred and
// states, and writes the tuple (total, components, d_pred, d_states) to OUTPUTS (torch.load reads it).
#include <torch/script.h>
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: eval_loss ARTIFACT_DIR INPUTS OUTPUTS\n";
    return 2;
  }
  try {
    torch::jit::Module loss = torch::jit::load(std::string(argv[1]) + "/rnn_loss.pt");
    auto inputs = torch::pickle_load(read_file(argv[2])).toGenericDict();
    auto pred = inputs.at("pred").toTensor().clone().requires_grad_(true);
    auto label = inputs.at("label").toTensor();
    auto states = inputs.at("states").toTensor().clone().requires_grad_(true);

    auto out = loss.forward({pred, label, states}).toTuple();
    auto total = out->elements()[0].toTensor();
    auto components = out->elements()[1].toTensor();
    // Same objective as the Python side: d(total + sum(components)).
    auto grads = torch::autograd::grad({total + components.sum()}, {pred, states});

    // A plain tuple pickles without TorchScript type tags, so torch.load(weights_only=True) reads it.
    auto result = c10::ivalue::Tuple::create({total.detach(), components.detach(), grads[0], grads[1]});
    auto bytes = torch::pickle_save(result);
    std::ofstream(argv[3], std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    std::cout << "total=" << total.item<double>() << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "eval_loss: " << e.what() << "\n";
    return 1;
  }
}
