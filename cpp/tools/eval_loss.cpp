// eval_loss: the exported loss and its gradients on tensors saved from Python; see kUsage.
#include <rnnloss/rnnloss.h>

#include "cli.h"
#include "native_format.h"

#include <torch/autograd.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

const char* const kUsage =
    "usage: eval_loss ARTIFACT_DIR INPUTS OUTPUTS [--engine native|torchscript]\n"
    "\n"
    "Reads INPUTS, a dict of the tensors 'pred', 'label' and 'states' (and optionally 'mask'),\n"
    "as Python's torch.save({'pred': pred, 'label': label, 'states': states}, INPUTS) writes it;\n"
    "evaluates the exported loss and writes the tuple (total, components, d total/d pred,\n"
    "d total/d states) to OUTPUTS (Python: torch.load(OUTPUTS, weights_only=True)); prints total=.\n"
    "\n"
    "  --engine native       rnnloss::load(ARTIFACT_DIR) (reads rnnloss_native.pt; the default)\n"
    "  --engine torchscript  ARTIFACT_DIR/rnn_loss.pt through TorchScript\n"
    "\n"
    "Exit status: 0 done; 1 the loss refused the inputs or a file could not be read or written;\n"
    "2 bad arguments. Every non-zero exit prints one line saying why.\n";

int fail(int status, const std::string& why) { return cli::fail("eval_loss", status, why); }

const char* const kInputsExpected =
    "INPUTS must be a dict of the tensors 'pred', 'label' and 'states' (optionally 'mask'), as "
    "torch.save({'pred': pred, 'label': label, 'states': states}, path) writes it";

// The tensors of INPUTS by name, or a message saying what is wrong with it.
std::string read_inputs(const std::string& path, std::map<std::string, torch::Tensor>& out) {
  auto bytes = rnnloss::detail::read_bytes(path);
  if (!bytes) throw std::runtime_error("cannot read INPUTS " + path);
  c10::IValue value;
  try {
    value = rnnloss::detail::unpickle(*bytes, path);
  } catch (const c10::ValueError& e) {
    return std::string(kInputsExpected) + "; " + e.what_without_backtrace();
  }
  if (!value.isGenericDict()) return std::string(kInputsExpected) + "; got a " + value.tagKind();
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString()) return std::string(kInputsExpected) + "; got a key that is not a string";
    const auto& key = item.key().toStringRef();
    if (key != "pred" && key != "label" && key != "states" && key != "mask")
      return std::string(kInputsExpected) + "; got an unexpected key '" + key + "'";
    if (!item.value().isTensor())
      return std::string(kInputsExpected) + "; got '" + key + "' as a " + item.value().tagKind();
    out[key] = item.value().toTensor();
  }
  for (const char* key : {"pred", "label", "states"})
    if (!out.count(key)) return std::string(kInputsExpected) + "; '" + key + "' is missing";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc), positional;
  std::string engine = "native";
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--engine") {
      if (i + 1 >= args.size()) return fail(2, "--engine needs a value: native or torchscript");
      engine = args[++i];
      if (engine != "native" && engine != "torchscript")
        return fail(2, "--engine must be native or torchscript, got '" + engine + "'");
    } else if (args[i].rfind("--", 0) == 0) {
      return fail(2, "unknown argument " + args[i] + " (see --help)");
    } else {
      positional.push_back(args[i]);
    }
  }
  if (positional.size() != 3)
    return fail(2, "expected ARTIFACT_DIR INPUTS OUTPUTS, got " + std::to_string(positional.size()) +
                       " positional arguments (see --help)");
  const std::string &dir = positional[0], &inputs_path = positional[1], &outputs_path = positional[2];
  try {
    std::map<std::string, torch::Tensor> in;
    std::string problem = read_inputs(inputs_path, in);
    if (!problem.empty()) return fail(1, problem);
    // Leaves for the gradients where they can be (a floating tensor): any other dtype goes to the
    // loss as it is and is refused there with the loss's own message.
    auto leaf = [](const torch::Tensor& t) {
      auto copy = t.detach().clone();
      return copy.is_floating_point() ? copy.requires_grad_(true) : copy;
    };
    auto pred = leaf(in["pred"]), states = leaf(in["states"]);
    auto label = in["label"];
    auto mask = in.count("mask") ? in["mask"] : torch::Tensor();

    torch::Tensor total, components;
    if (engine == "native") {
      auto exported = rnnloss::load(dir);
      exported.loss->eval();
      std::tie(total, components) = exported.loss->forward(pred, label, states, mask);
    } else {
      torch::jit::Module loss = torch::jit::load(dir + "/rnn_loss.pt");
      loss.eval();
      std::vector<c10::IValue> call = {pred, label, states};
      if (mask.defined()) call.push_back(mask);
      auto out = loss.forward(call).toTuple();
      total = out->elements()[0].toTensor();
      components = out->elements()[1].toTensor();
    }
    // d total / d pred and d total / d states (total = components.sum()).
    auto grads = torch::autograd::grad({total}, {pred, states}, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < 2; ++k)
      if (!grads[k].defined()) grads[k] = torch::zeros_like(k == 0 ? pred : states);
    // A plain tuple pickles without TorchScript type tags, so torch.load(weights_only=True) reads it.
    auto result = c10::ivalue::Tuple::create({total.detach(), components.detach(), grads[0], grads[1]});
    auto bytes = torch::pickle_save(result);
    std::ofstream out(outputs_path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) return fail(1, "cannot write OUTPUTS " + outputs_path);
    std::cout << "total=" << total.item<double>() << "\n";
    return 0;
  } catch (const c10::Error& e) {
    return fail(1, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(1, e.what());
  }
}
