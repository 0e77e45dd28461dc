#include <rnnloss/load.h>

#include "checks.h"
#include "native_format.h"

#include <torch/serialize.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace rnnloss {

using detail::dtype_name;
using detail::int_list;
using detail::kLayers;
using detail::lambda_entry;
using detail::py_float;
using detail::py_str_list;

namespace {

constexpr const char* kFormat = "rnnloss.native";
constexpr int64_t kVersion = 1;

using Dict = c10::Dict<c10::IValue, c10::IValue>;

// An IValue as Python's repr would write it (containers of plain values), else what it is.
std::string py_repr(const c10::IValue& v) {
  if (v.isNone()) return "None";
  if (v.isBool()) return v.toBool() ? "True" : "False";
  if (v.isInt()) return std::to_string(v.toInt());
  if (v.isDouble()) return py_float(v.toDouble());
  if (v.isString()) return detail::py_str(v.toStringRef());
  if (v.isList() || v.isTuple()) {
    const bool list = v.isList();
    std::vector<c10::IValue> items;
    if (list) {
      for (const auto& item : v.toListRef()) items.push_back(item);
    } else {
      for (const auto& item : v.toTupleRef().elements()) items.push_back(item);
    }
    std::string out = list ? "[" : "(";
    for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + py_repr(items[i]);
    return out + (list ? "]" : (items.size() == 1 ? ",)" : ")"));
  }
  return std::string("a ") + v.tagKind();
}

// Typed access to the artifact's dict, with a message that names the file and the key.
struct Reader {
  std::string path;

  c10::IValue get(const Dict& dict, const std::string& key, const std::string& where) const {
    auto it = dict.find(key);
    TORCH_CHECK_VALUE(it != dict.end(), "rnnloss::load: ", path, " has no '", where, key, "'");
    return it->value();
  }
  Dict dict(const Dict& d, const std::string& key, const std::string& where = "") const {
    auto v = get(d, key, where);
    TORCH_CHECK_VALUE(v.isGenericDict(), "rnnloss::load: ", path, ": '", where, key, "' must be a dict");
    return v.toGenericDict();
  }
  double number(const Dict& d, const std::string& key, const std::string& where) const {
    auto v = get(d, key, where);
    TORCH_CHECK_VALUE(v.isDouble() || v.isInt(), "rnnloss::load: ", path, ": '", where, key, "' must be a number");
    return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
  }
  bool flag(const c10::IValue& v, const std::string& what) const {
    TORCH_CHECK_VALUE(v.isBool(), "rnnloss::load: ", path, ": '", what, "' must be a bool");
    return v.toBool();
  }
  std::string text(const c10::IValue& v, const std::string& what) const {
    TORCH_CHECK_VALUE(v.isString(), "rnnloss::load: ", path, ": '", what, "' must be a string");
    return v.toStringRef();
  }
  std::vector<c10::IValue> list(const Dict& d, const std::string& key, const std::string& where, size_t size) const {
    auto v = get(d, key, where);
    TORCH_CHECK_VALUE(v.isList() && v.toListRef().size() == size, "rnnloss::load: ", path, ": '", where, key,
                      "' must be a list of ", size);
    auto ref = v.toListRef();
    return std::vector<c10::IValue>(ref.begin(), ref.end());
  }
};

}  // namespace

Exported load(const std::string& path) {
  std::filesystem::path file(path);
  if (std::filesystem::is_directory(file)) file /= kNativeArtifact;
  auto bytes = detail::read_bytes(file.string());
  TORCH_CHECK_VALUE(bytes.has_value(), "rnnloss::load: cannot read ", file.string(),
                    " (the export command writes it; from Python: rnnloss.export.native.save_native(loss, path))");
  c10::IValue root;
  try {
    root = detail::unpickle(*bytes, file.string());
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "rnnloss::load: ", e.what_without_backtrace());
  }
  return detail::from_native_dict(root, file.string());
}

namespace detail {

std::optional<std::vector<char>> read_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in.good()) return std::nullopt;
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

c10::IValue unpickle(const std::vector<char>& bytes, const std::string& file) {
  auto starts_with = [&](const char* prefix, size_t n) {
    return bytes.size() >= n && std::memcmp(bytes.data(), prefix, n) == 0;
  };
  // torch.save(..., _use_new_zipfile_serialization=False) begins with its magic number
  // 0x1950a86a20f9469cfc6c pickled (protocol 2, LONG1 of 10 little-endian bytes).
  static const char kLegacy[] = "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";
  TORCH_CHECK_VALUE(!starts_with(kLegacy, sizeof(kLegacy) - 1), "cannot read ", file,
                    ": it is in torch.save's legacy format (_use_new_zipfile_serialization=False); write it with "
                    "torch.save's default format");
  TORCH_CHECK_VALUE(!starts_with("\x80", 1), "cannot read ", file,
                    ": it is a bare pickle stream, not torch.save's format (a zip archive)");
  TORCH_CHECK_VALUE(starts_with("PK\x03\x04", 4), "cannot read ", file,
                    ": it is not a torch.save file (not a zip archive)");
  try {
    return torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    std::string reason = e.what_without_backtrace();
    reason = reason.substr(0, reason.find('\n'));
    if (auto dot = reason.find(". "); dot != std::string::npos) reason = reason.substr(0, dot + 1);
    TORCH_CHECK_VALUE(reason.find("_get_layout") == std::string::npos && reason.find("sparse") == std::string::npos,
                      "cannot read ", file, ": it holds a sparse tensor; libtorch's reader loads dense tensors only "
                      "(save t.to_dense())");
    // Python pickles an int of 2^31 or more in magnitude in as few bytes as it needs; libtorch's
    // unpickler reads only 8-byte ones (an int that size is no sane dimension or setting).
    TORCH_CHECK_VALUE(reason.rfind("Expected length to be 8", 0) != 0, "cannot read ", file,
                      ": it holds an integer of magnitude 2^31 or more that libtorch's unpickler cannot read (",
                      reason, ")");
    TORCH_CHECK_VALUE(false, "cannot read ", file, ": ", reason);
  }
}

namespace {

// An IValue as Python would print it in a message, with its type when that is not int: 2,
// '1' (a string), 1.0 (a float).
std::string describe(const c10::IValue& v) {
  if (v.isInt()) return std::to_string(v.toInt());
  if (v.isString()) return "'" + v.toStringRef() + "' (a string)";
  if (v.isDouble()) return py_float(v.toDouble()) + " (a float)";
  if (v.isBool()) return std::string(v.toBool() ? "True" : "False") + " (a bool)";
  if (v.isNone()) return "None";
  return std::string("a ") + v.tagKind();
}

}  // namespace

Exported from_native_dict(const c10::IValue& root, const std::string& where) {
  Reader r{where};
  TORCH_CHECK_VALUE(root.isGenericDict(), "rnnloss::load: ", r.path, " is not an rnnloss native export (not a dict)");
  auto top = root.toGenericDict();
  auto format = r.get(top, "format", "");
  TORCH_CHECK_VALUE(format.isString() && format.toStringRef() == kFormat, "rnnloss::load: ", r.path,
                    " is not an rnnloss native export (its 'format' is not '", kFormat, "')");
  auto version = r.get(top, "version", "");
  TORCH_CHECK_VALUE(version.isInt() && version.toInt() == kVersion, "rnnloss::load: ", r.path, " has format version ",
                    describe(version), "; this library reads version ", kVersion);

  auto m = r.dict(top, "model");
  const std::string at = "model.";
  auto dims = r.list(m, "dims", at, 3);
  for (const auto& d : dims) TORCH_CHECK_VALUE(d.isInt(), "rnnloss::load: ", r.path, ": 'model.dims' must hold ints");
  auto state = r.dict(top, "state_dict");
  auto tensor = [&](const std::string& key) {
    auto v = r.get(state, key, "state_dict.");
    TORCH_CHECK_VALUE(v.isTensor(), "rnnloss::load: ", r.path, ": 'state_dict.", key, "' must be a tensor");
    const auto& t = v.toTensor();
    TORCH_CHECK_VALUE(t.is_floating_point(), "rnnloss::load: ", r.path, ": 'state_dict.", key,
                      "' must be a floating-point tensor, got dtype ", dtype_name(t.scalar_type()));
    return t;
  };
  // The dims must match the weights the file holds before anything of their size is allocated.
  const int64_t n_in = dims[0].toInt(), n_hid = dims[1].toInt(), n_out = dims[2].toInt();
  const std::pair<const char*, std::vector<int64_t>> weights[3] = {
      {"recurrent_layer.input_layer.weight", {n_hid, n_in}},
      {"recurrent_layer.hidden_layer.weight", {n_hid, n_hid}},
      {"readout_layer.weight", {n_out, n_hid}}};
  for (const auto& [key, shape] : weights) {
    auto w = tensor(key);
    TORCH_CHECK_VALUE(w.sizes() == c10::IntArrayRef(shape), "rnnloss::load: ", r.path, ": 'model.dims' is ",
                      int_list({n_in, n_hid, n_out}), " but 'state_dict.", key, "' has shape ", int_list(w.sizes()),
                      " (expected ", int_list(shape), ")");
  }
  CTRNNOptions options(n_in, n_hid, n_out);
  options.tau(r.number(m, "tau", at)).dt(r.number(m, "dt", at));
  options.activation(r.text(r.get(m, "activation", at), "model.activation"));
  options.preact_noise(r.number(m, "preact_noise", at)).postact_noise(r.number(m, "postact_noise", at));
  options.batch_first(r.flag(r.get(m, "batch_first", at), "model.batch_first"));
  options.learn_alpha(r.flag(r.get(m, "learn_alpha", at), "model.learn_alpha"));
  options.init_state(r.text(r.get(m, "init_state", at), "model.init_state"));
  std::vector<std::string> biases;
  for (const auto& b : r.list(m, "biases", at, 3)) {
    auto kind = r.text(b, "model.biases");
    TORCH_CHECK_VALUE(kind == "trained" || kind == "fixed" || kind == "absent", "rnnloss::load: ", r.path,
                      ": 'model.biases' entries must be 'trained', 'fixed' or 'absent', got '", kind, "'");
    biases.push_back(kind == "trained" ? "zero" : kind);  // the values come from the state_dict
  }
  options.biases(biases).weights("zero");

  // Masks: present ones are in the state_dict under the buffer names CTRNN gives them.
  std::vector<std::pair<std::string, std::string>> mask_kinds = {
      {"sparsity_masks", "sparsity_"}, {"ei_masks", "sign_"}, {"plasticity_masks", "plasticity_"}};
  for (const auto& [key, prefix] : mask_kinds) {
    auto present = r.list(m, key, at, 3);
    std::vector<torch::Tensor> masks(3);
    bool any = false;
    for (int i = 0; i < 3; ++i) {
      if (!r.flag(present[static_cast<size_t>(i)], "model." + key)) continue;
      masks[static_cast<size_t>(i)] = tensor(prefix + kLayers[i]);
      any = true;
    }
    if (!any) masks.clear();
    if (key == "sparsity_masks") options.sparsity_masks(masks);
    else if (key == "ei_masks") options.ei_masks(masks);
    else options.plasticity_masks(masks);
  }

  CTRNN model(options);
  model->to(tensor("recurrent_layer.input_layer.weight").scalar_type());
  {
    torch::NoGradGuard no_grad;
    size_t expected = 0;
    auto copy = [&](const std::string& name, torch::Tensor& target) {
      auto value = tensor(name);
      TORCH_CHECK_VALUE(value.sizes() == target.sizes(), "rnnloss::load: ", r.path, ": 'state_dict.", name,
                        "' has shape ", value.sizes(), ", the model's has ", target.sizes());
      target.copy_(value);
      ++expected;
    };
    for (auto& p : model->named_parameters()) copy(p.key(), p.value());
    for (auto& b : model->named_buffers()) copy(b.key(), b.value());
    TORCH_CHECK_VALUE(state.size() == expected, "rnnloss::load: ", r.path, ": 'state_dict' has ", state.size(),
                      " entries, the model built from its config has ", expected);
  }

  auto l = r.dict(top, "loss");
  const auto& library_names = component_names();
  auto names = r.get(l, "component_names", "loss.");
  std::vector<std::string> file_names;
  TORCH_CHECK_VALUE(names.isList(), "rnnloss::load: ", r.path, ": 'loss.component_names' must be a list of strings");
  for (const auto& n : names.toListRef()) file_names.push_back(r.text(n, "loss.component_names"));
  TORCH_CHECK_VALUE(file_names == library_names, "rnnloss::load: ", r.path, ": 'loss.component_names' is ",
                    py_str_list(file_names), ", this library's are ", py_str_list(library_names),
                    ": it was written by another version of rnnloss");
  // The active set: exactly seven bools (one line naming what the file holds instead).
  auto active_value = r.get(l, "active", "loss.");
  bool seven_bools = active_value.isList() && active_value.toListRef().size() == 7;
  if (seven_bools)
    for (const auto& a : active_value.toListRef()) seven_bools = seven_bools && a.isBool();
  TORCH_CHECK_VALUE(seven_bools, "rnnloss::load: ", r.path, ": 'loss.active' must be a list of 7 bools, got ",
                    py_repr(active_value));
  std::array<bool, 7> active{};
  for (size_t i = 0; i < 7; ++i) active[i] = active_value.toListRef()[i].toBool();
  auto lambda_values = r.list(l, "lambdas", "loss.", 7);
  std::vector<double> lambdas(7);
  std::array<double, 7> construct{};
  for (size_t i = 0; i < 7; ++i) {
    const auto& v = lambda_values[i];
    TORCH_CHECK_VALUE(v.isDouble() || v.isInt(), "rnnloss::load: ", r.path, ": 'loss.lambdas' must hold numbers");
    lambdas[i] = v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
    // λ are checked where they are written: here, with the rules' messages.
    const std::string entry = lambda_entry(i), name = rules::kComponentNames[i];
    const char* problem = detail::lambda_problem(lambdas[i]);
    TORCH_CHECK_VALUE(*problem == '\0', "rnnloss::load: ", r.path, ": ",
                      rules::format(rules::kLambdaValue, entry, problem));
    TORCH_CHECK_VALUE(lambdas[i] == 0.0 || active[i], "rnnloss::load: ", r.path, ": ",
                      rules::format(rules::kLambdaInactive, entry, name, name));
    // An active component annealed to 0 stays active: build it with a placeholder, then write λ.
    construct[i] = active[i] ? (lambdas[i] > 0 ? lambdas[i] : 1.0) : 0.0;
  }
  RNNLoss loss(model, RNNLossOptions()
                          .lambda_mse(construct[0])
                          .lambda_in(construct[1])
                          .lambda_hid(construct[2])
                          .lambda_out(construct[3])
                          .lambda_fr(construct[4])
                          .lambda_fr_sd(construct[5])
                          .lambda_fr_cv(construct[6]));
  {
    torch::NoGradGuard no_grad;
    loss->lambdas.copy_(torch::tensor(lambdas, torch::dtype(torch::kFloat64)));
  }
  return {model, loss};
}

}  // namespace detail
}  // namespace rnnloss
