// rnnloss_cases CASES RESULTS — runs many cases of the native library in one process (the tests
// in tests/cpp write CASES and read RESULTS; not installed).
//
// CASES: torch.save of {"artifacts": [native payload dicts (rnnloss.export.native.native_payload)],
//                       "cases": [case dicts]}. Every case has "kind"; see run_case().
// RESULTS: a tuple with one tuple per case: ("ok", values...) or ("error", kind, message), kind
// being ValueError / TypeError (c10::ValueError / c10::TypeError), c10::Error or std::exception.
// Only tuples, strings, bools and tensors, so torch.load(weights_only=True) reads it.
#include <rnnloss/rnnloss.h>

#include "checks.h"
#include "native_format.h"

#include <torch/autograd.h>
#include <torch/optim/adam.h>
#include <torch/serialize.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Dict = c10::Dict<c10::IValue, c10::IValue>;
using c10::IValue;

IValue get(const Dict& d, const std::string& key) {
  auto it = d.find(key);
  return it == d.end() ? IValue() : it->value();
}
torch::Tensor tensor(const Dict& d, const std::string& key) {
  auto v = get(d, key);
  return v.isTensor() ? v.toTensor() : torch::Tensor();
}
double number(const IValue& v) { return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt()); }
// A copy that requires grad where it can (integer tensors go in as they are, to meet the checks).
torch::Tensor leaf(const torch::Tensor& t) {
  if (!t.defined()) return t;
  auto copy = t.clone();
  return copy.is_floating_point() ? copy.requires_grad_(true) : copy;
}
IValue tuple(std::vector<IValue> items) { return c10::ivalue::Tuple::create(std::move(items)); }

rnnloss::Exported artifact(const std::vector<IValue>& artifacts, const Dict& c) {
  return rnnloss::detail::from_native_dict(artifacts.at(static_cast<size_t>(get(c, "artifact").toInt())),
                                           "artifact");
}

// The gradients of `objective` w.r.t. `inputs` (undefined where unused) and the model's
// trainable parameters, with their names.
std::vector<IValue> gradients(const torch::Tensor& objective, std::vector<torch::Tensor> inputs,
                              rnnloss::CTRNN& model) {
  std::vector<torch::Tensor> wrt;
  std::vector<IValue> names;
  for (const auto& t : inputs)
    if (t.defined()) wrt.push_back(t);
  size_t n_inputs = wrt.size();
  for (const auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    wrt.push_back(p.value());
    names.push_back(p.key());
  }
  auto grads = torch::autograd::grad({objective}, wrt, {}, false, false, /*allow_unused=*/true);
  std::vector<IValue> out;
  size_t k = 0;
  for (const auto& t : inputs) {  // an unused input's gradient is zero, as Python's test computes it
    if (!t.defined()) {
      out.push_back(IValue());
      continue;
    }
    out.push_back(grads[k].defined() ? grads[k] : torch::zeros_like(t));
    ++k;
  }
  std::vector<IValue> params;
  for (size_t i = n_inputs; i < grads.size(); ++i)
    params.push_back(grads[i].defined() ? grads[i] : torch::zeros_like(wrt[i]));
  out.push_back(tuple(params));
  out.push_back(tuple(names));
  return out;
}

// (values, names, requires_grad flags) of the parameters; values cloned.
std::vector<IValue> named_values(const torch::nn::Module& module) {
  std::vector<IValue> values, names, flags;
  for (const auto& p : module.named_parameters()) {
    values.push_back(p.value().detach().clone());
    names.push_back(p.key());
    flags.push_back(p.value().requires_grad());
  }
  return {tuple(values), tuple(names), tuple(flags)};
}

std::vector<std::string> strings(const IValue& v) {
  std::vector<std::string> out;
  for (const auto& s : v.toListRef()) out.push_back(s.toStringRef());
  return out;
}

rnnloss::CTRNNOptions ctrnn_options(const Dict& o) {
  rnnloss::CTRNNOptions opts(get(o, "n_in").toInt(), get(o, "n_hid").toInt(), get(o, "n_out").toInt());
  auto num = [&](const char* key, auto setter) {
    auto v = get(o, key);
    if (!v.isNone()) setter(number(v));
  };
  num("tau", [&](double v) { opts.tau(v); });
  num("dt", [&](double v) { opts.dt(v); });
  num("preact_noise", [&](double v) { opts.preact_noise(v); });
  num("postact_noise", [&](double v) { opts.postact_noise(v); });
  if (get(o, "activation").isString()) opts.activation(get(o, "activation").toStringRef());
  if (get(o, "init_state").isString()) opts.init_state(get(o, "init_state").toStringRef());
  if (get(o, "batch_first").isBool()) opts.batch_first(get(o, "batch_first").toBool());
  if (get(o, "learn_alpha").isBool()) opts.learn_alpha(get(o, "learn_alpha").toBool());
  if (get(o, "biases").isList()) opts.biases(strings(get(o, "biases")));
  if (get(o, "weights").isList()) opts.weights(strings(get(o, "weights")));
  auto masks = [&](const char* key) {
    std::vector<torch::Tensor> out;
    for (const auto& v : get(o, key).toListRef()) out.push_back(v.isTensor() ? v.toTensor() : torch::Tensor());
    return out;
  };
  if (get(o, "sparsity_masks").isList()) opts.sparsity_masks(masks("sparsity_masks"));
  if (get(o, "ei_masks").isList()) opts.ei_masks(masks("ei_masks"));
  if (get(o, "plasticity_masks").isList()) opts.plasticity_masks(masks("plasticity_masks"));
  return opts;
}

template <class M>
std::string printed(const M& module) {
  std::ostringstream out;
  out << *module;
  return out.str();
}

IValue run_case(const std::vector<IValue>& artifacts, const Dict& c) {
  const std::string kind = get(c, "kind").toStringRef();
  if (kind == "loss") {  // total, components, d/dpred, d/dstates, d/dparams, names
    auto ex = artifact(artifacts, c);
    // "meta": the names of the inputs to move to the meta device (for the device checks).
    std::vector<std::string> meta = get(c, "meta").isList() ? strings(get(c, "meta")) : std::vector<std::string>();
    auto input = [&](const char* key) {
      auto t = tensor(c, key);
      bool to_meta = std::find(meta.begin(), meta.end(), key) != meta.end();
      return to_meta && t.defined() ? t.to(torch::kMeta) : t;
    };
    auto pred = leaf(input("pred"));
    auto states = leaf(input("states"));
    auto lambdas = tensor(c, "lambdas");
    if (lambdas.defined()) {  // a write that bypasses set_lambda: forward must check it
      torch::NoGradGuard no_grad;
      ex.loss->lambdas.copy_(lambdas);
    }
    auto replacement = tensor(c, "replace_lambdas");
    if (replacement.defined()) ex.loss->lambdas.set_data(replacement);  // another dtype or shape
    auto [total, components] = ex.loss->forward(pred, input("label"), states, input("mask"));
    std::vector<IValue> out = {std::string("ok"), total.detach(), components.detach()};
    for (auto& g : gradients(total, {pred, states}, ex.model)) out.push_back(g);
    return tuple(out);
  }
  if (kind == "forward") {  // output, states, d/dx and d/dparams of Σ g_out·output + Σ g_states·states
    auto ex = artifact(artifacts, c);
    ex.model->eval();
    auto x = leaf(tensor(c, "x"));
    auto [output, states] = ex.model->forward(x, tensor(c, "init_state"));
    auto objective = (output * tensor(c, "g_out")).sum() + (states * tensor(c, "g_states")).sum();
    std::vector<IValue> out = {std::string("ok"), output.detach(), states.detach()};
    for (auto& g : gradients(objective, {x}, ex.model)) out.push_back(g);
    return tuple(out);
  }
  if (kind == "constraints") {  // the parameters (values, names, flags) after enforce_constraints()
    auto ex = artifact(artifacts, c);
    ex.model->enforce_constraints();
    auto values = named_values(*ex.model);
    return tuple({std::string("ok"), values[0], values[1], values[2]});
  }
  if (kind == "ctrnn") {  // construct from options (the constructor's checks); its printout
    rnnloss::CTRNN model(ctrnn_options(get(c, "options").toGenericDict()));
    return tuple({std::string("ok"), printed(model)});
  }
  if (kind == "empty_model") {  // RNNLoss of an empty CTRNN holder
    rnnloss::RNNLoss loss{rnnloss::CTRNN(nullptr)};
    return tuple({std::string("ok")});
  }
  if (kind == "loss_options") {  // construct RNNLoss with "lambdas" (7 floats)
    auto ex = artifact(artifacts, c);
    auto l = get(c, "lambdas").toListRef();
    auto v = [&](size_t i) { return number(l[i]); };
    rnnloss::RNNLoss loss(ex.model, rnnloss::RNNLossOptions().lambda_mse(v(0)).lambda_in(v(1)).lambda_hid(v(2))
                                        .lambda_out(v(3)).lambda_fr(v(4)).lambda_fr_sd(v(5)).lambda_fr_cv(v(6)));
    return tuple({std::string("ok"), loss->lambdas.clone(), printed(loss)});
  }
  if (kind == "to_dtype") {  // loss->to(float32 | float16): the λ buffer and a weight afterwards
    auto ex = artifact(artifacts, c);
    ex.loss->to(get(c, "dtype").toStringRef() == "float16" ? torch::kFloat16 : torch::kFloat32);
    return tuple({std::string("ok"), ex.loss->lambdas.clone(), ex.model->readout_layer->weight.detach().clone()});
  }
  if (kind == "set_lambda") {  // set_lambda(name, value) for each pair in "calls", in order
    auto ex = artifact(artifacts, c);
    for (const auto& call : get(c, "calls").toListRef()) {
      auto pair = call.toTupleRef().elements();
      ex.loss->set_lambda(pair[0].toStringRef(), number(pair[1]));
    }
    return tuple({std::string("ok"), ex.loss->lambdas.clone()});
  }
  if (kind == "device_lambda_check") {  // the off-CPU λ check, run on the CPU with "lambdas"
    auto ex = artifact(artifacts, c);
    std::array<bool, 7> active{};
    for (size_t i = 0; i < 7; ++i) active[i] = ex.loss->is_active(static_cast<int64_t>(i));
    rnnloss::detail::assert_lambdas_on_device(tensor(c, "lambdas"), active);
    return tuple({std::string("ok")});
  }
  if (kind == "load") {  // rnnloss::load(path): the λ, the active set and the model's parameters
    auto ex = rnnloss::load(get(c, "path").toStringRef());
    std::vector<IValue> active;
    for (const auto& name : ex.loss->active()) active.push_back(name);
    auto values = named_values(*ex.model);
    return tuple({std::string("ok"), ex.loss->lambdas.clone(), tuple(active), values[0], values[1]});
  }
  if (kind == "clone") {  // clone(), then change the original; the copy must keep the old state
    auto ex = artifact(artifacts, c);
    auto copy = std::dynamic_pointer_cast<rnnloss::RNNLossImpl>(ex.loss->clone());
    auto model_copy = std::dynamic_pointer_cast<rnnloss::CTRNNImpl>(ex.model->clone());
    {
      torch::NoGradGuard no_grad;
      for (auto& p : ex.model->parameters()) p.add_(1.0);
      for (auto& b : ex.model->buffers()) b.add_(1.0);
      ex.loss->lambdas.mul_(2.0);
    }
    bool separate = copy->model.ptr() != ex.model.ptr() && model_copy != ex.model.ptr();
    for (const auto& p : ex.model->named_parameters())
      separate = separate && !copy->model->named_parameters()[p.key()].is_same(p.value()) &&
                 !model_copy->named_parameters()[p.key()].is_same(p.value());
    auto values = named_values(*copy->model);
    auto model_values = named_values(*model_copy);
    std::vector<IValue> buffers, buffer_names;
    for (const auto& b : copy->model->named_buffers()) {
      buffers.push_back(b.value().clone());
      buffer_names.push_back(b.key());
    }
    // The copy computes: its forward on the case's inputs.
    auto [total, components] = copy->forward(tensor(c, "pred"), tensor(c, "label"), tensor(c, "states"));
    return tuple({std::string("ok"), separate, copy->lambdas.clone(), values[0], values[1], values[2],
                  model_values[0], tuple(buffers), tuple(buffer_names), components.detach(), printed(copy),
                  printed(model_copy)});
  }
  if (kind == "train") {  // Adam on (xs[s], targets[s]) for every step s; totals, components, final params
    auto ex = artifact(artifacts, c);
    auto xs = tensor(c, "xs"), targets = tensor(c, "targets");
    ex.loss->train();
    torch::optim::Adam opt(ex.model->parameters(), torch::optim::AdamOptions(number(get(c, "lr"))));
    std::vector<torch::Tensor> totals, comps;
    for (int64_t s = 0; s < xs.size(0); ++s) {
      auto [output, states] = ex.model->forward(xs[s]);
      auto [total, components] = ex.loss->forward(output, targets[s], states);
      opt.zero_grad();
      total.backward();
      ex.model->apply_plasticity();
      opt.step();
      ex.model->enforce_constraints();
      totals.push_back(total.detach());
      comps.push_back(components.detach());
    }
    auto values = named_values(*ex.model);
    return tuple({std::string("ok"), torch::stack(totals), torch::stack(comps), values[0], values[1]});
  }
  throw std::runtime_error("rnnloss_cases: unknown case kind '" + kind + "'");
}

IValue error(const std::string& kind, const char* message) {
  return tuple({std::string("error"), kind, std::string(message)});
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: rnnloss_cases CASES RESULTS\n";
    return 2;
  }
  auto bytes = rnnloss::detail::read_bytes(argv[1]);
  if (!bytes) {
    std::cerr << "rnnloss_cases: cannot read " << argv[1] << "\n";
    return 2;
  }
  auto root = torch::pickle_load(*bytes).toGenericDict();
  auto artifact_list = get(root, "artifacts").toListRef();
  std::vector<IValue> artifacts(artifact_list.begin(), artifact_list.end());
  std::vector<IValue> results;
  for (const auto& c : get(root, "cases").toListRef()) {
    try {
      results.push_back(run_case(artifacts, c.toGenericDict()));
    } catch (const c10::ValueError& e) {
      results.push_back(error("ValueError", e.what_without_backtrace()));
    } catch (const c10::TypeError& e) {
      results.push_back(error("TypeError", e.what_without_backtrace()));
    } catch (const c10::Error& e) {
      results.push_back(error("c10::Error", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      results.push_back(error("std::exception", e.what()));
    }
  }
  auto out = torch::pickle_save(tuple(results));
  std::ofstream(argv[2], std::ios::binary).write(out.data(), static_cast<std::streamsize>(out.size()));
  return 0;
}
