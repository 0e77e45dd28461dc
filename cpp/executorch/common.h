// What ctrnn_run and ctrnn_train_run share: the tensor file format, the program's shape contract, the log
// sink and the exit statuses.
//
// Tensor file (little endian): named float32 tensors one after another until the end of the file, each
//   int32 name_length, char name[name_length] (UTF-8), int32 ndim, int64 sizes[ndim], float32 data[prod(sizes)]
// with the data in row-major (C) order. Python writes one with
//   f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack(f"<i{t.dim()}q", t.dim(), *t.shape)
//           + t.float().contiguous().numpy().tobytes())
//
// Exit status: 0 done; 2 refused before anything ran (the command line, an input file that is missing or
// malformed, an input that breaks the program's contract, a program file that cannot be opened or is not of
// the kind asked for); 1 ExecuTorch failed to load or run the program, or the output could not be written.
// Every failure is one line on stderr: "PROGRAM_NAME: what".
//
// The contract of ctrnn.pte and ctrnn_train.pte (the constant methods time_steps and max_batch, the
// description rnnloss_json and the forward method's input sizes at the bound): x is (time, batch, n_in), or
// (batch, time, n_in) when the model is batch_first, with time exactly time_steps and batch 1..max_batch;
// target and mask (training) are shaped like x with n_out features.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

namespace et = executorch::runtime;
using executorch::extension::Module;

// A failure the user can fix before anything runs: exit status 2.
struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- ExecuTorch's log: errors are kept for the failure line, the rest is dropped --------------------------

inline std::string& last_runtime_error() {
  static std::string message;
  return message;
}

inline void keep_errors(et_timestamp_t, et_pal_log_level_t level, const char*, const char*, size_t,
                        const char* message, size_t length) {
  if (level == kError || level == kFatal) last_runtime_error().assign(message, length);
}

// Runs body() with ExecuTorch's log routed to keep_errors; turns exceptions into one line and an exit status.
inline int run_main(const char* program_name, const std::function<void()>& body) {
  et::register_pal(et::PalImpl::create(keep_errors, __FILE__));
  try {
    body();
    return 0;
  } catch (const Refused& e) {
    std::fprintf(stderr, "%s: %s\n", program_name, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", program_name, e.what());
    return 1;
  }
}

// ---- tensor files ------------------------------------------------------------------------------------------

struct Tensor {
  std::vector<int64_t> sizes;
  std::vector<float> data;
};
using Tensors = std::map<std::string, Tensor>;

inline std::string shape(const std::vector<int64_t>& sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

inline Tensors read_tensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Refused("cannot open " + path);
  Tensors tensors;
  auto malformed = [&](const std::string& what) { return Refused(path + ": not a tensor file (" + what + ")"); };
  while (f.peek() != std::char_traits<char>::eof()) {
    int32_t length = 0, ndim = 0;
    if (!f.read(reinterpret_cast<char*>(&length), 4) || length < 1 || length > 256) throw malformed("name length");
    std::string name(length, '\0');
    if (!f.read(name.data(), length)) throw malformed("truncated name");
    if (tensors.count(name)) throw malformed("two tensors named " + name);
    if (!f.read(reinterpret_cast<char*>(&ndim), 4) || ndim < 0 || ndim > 16) throw malformed(name + ": rank");
    Tensor& t = tensors[name];
    t.sizes.resize(ndim);
    if (!f.read(reinterpret_cast<char*>(t.sizes.data()), 8 * ndim)) throw malformed(name + ": truncated sizes");
    int64_t count = 1;
    for (int64_t s : t.sizes) {
      if (s < 0 || s > (int64_t{1} << 31) || (count *= s) > (int64_t{1} << 31)) throw malformed(name + ": sizes");
    }
    t.data.resize(count);
    if (!f.read(reinterpret_cast<char*>(t.data.data()), 4 * count)) throw malformed(name + ": truncated data");
  }
  return tensors;
}

struct Named {
  std::string name;
  std::vector<int64_t> sizes;
  const float* data;
};

inline Named named(const std::string& name, const executorch::aten::Tensor& t) {
  if (t.scalar_type() != executorch::aten::ScalarType::Float) throw std::runtime_error(name + " is not float32");
  return {name, std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), t.const_data_ptr<float>()};
}

// Written beside `path` and renamed into place, so that `path` is either complete or untouched.
inline void write_tensors(const std::string& path, const std::vector<Named>& tensors) {
  const std::string part = path + ".part";
  {
    std::ofstream f(part, std::ios::binary);
    for (const Named& t : tensors) {
      const int32_t length = static_cast<int32_t>(t.name.size()), ndim = static_cast<int32_t>(t.sizes.size());
      int64_t count = 1;
      for (int64_t s : t.sizes) count *= s;
      f.write(reinterpret_cast<const char*>(&length), 4).write(t.name.data(), length);
      f.write(reinterpret_cast<const char*>(&ndim), 4).write(reinterpret_cast<const char*>(t.sizes.data()), 8 * ndim);
      f.write(reinterpret_cast<const char*>(t.data), 4 * count);
    }
    if (!f.flush()) {
      std::remove(part.c_str());
      throw std::runtime_error("cannot write " + path);
    }
  }
  if (std::rename(part.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

// ---- the program -------------------------------------------------------------------------------------------

inline std::string error_text(const std::string& what, et::Error error) {
  char code[16];
  std::snprintf(code, sizeof code, "0x%x", static_cast<unsigned>(error));
  std::string detail = last_runtime_error();
  for (char& ch : detail)  // one printable line, whatever the log held
    if (static_cast<unsigned char>(ch) < 0x20 || static_cast<unsigned char>(ch) > 0x7e) ch = '?';
  return what + " failed (ExecuTorch error " + code + ")" + (detail.empty() ? "" : ": " + detail);
}

inline std::vector<et::EValue> execute(Module& module, const std::string& method,
                                       const std::vector<et::EValue>& inputs = {}) {
  last_runtime_error().clear();
  auto result = module.execute(method, inputs);
  if (!result.ok()) throw std::runtime_error(error_text(method, result.error()));
  return std::move(result.get());
}

inline int64_t int_method(Module& module, const std::string& method) {
  auto out = execute(module, method);
  if (out.empty() || !out[0].isInt()) throw std::runtime_error(method + " does not answer an integer");
  return out[0].toInt();
}

// The value of a true/false key in the JSON description (the one flag the contract needs from it).
inline bool json_flag(const std::string& json, const std::string& key) {
  size_t at = json.find("\"" + key + "\"");
  if (at != std::string::npos) at = json.find_first_not_of(" \t\r\n:", at + key.size() + 2);
  if (at != std::string::npos && json.compare(at, 4, "true") == 0) return true;
  if (at != std::string::npos && json.compare(at, 5, "false") == 0) return false;
  throw std::runtime_error("rnnloss_json has no " + key + " flag");
}

struct Contract {
  int64_t time = 0, max_batch = 0;
  bool batch_first = false;
  std::vector<std::vector<int64_t>> inputs;  // forward's input sizes at the bound (its method meta)

  // x, or a tensor shaped like x with `features` features (`what`: n_in, n_out): the contract, or a Refused
  // naming the difference.
  void check(const std::string& name, const Tensor& t, int64_t features, const char* what,
             const Tensor* like = nullptr) const {
    const char* layout = batch_first ? "(batch, time, features)" : "(time, batch, features)";
    const std::string is = name + " is " + shape(t.sizes) + "; ";
    if (t.sizes.size() != 3) throw Refused(is + "the program takes rank 3, " + layout);
    const int64_t steps = t.sizes[batch_first ? 1 : 0], batch = t.sizes[batch_first ? 0 : 1];
    if (steps != time)
      throw Refused(is + "the program runs exactly " + std::to_string(time) + " time steps (executorch.time)");
    if (batch < 1 || batch > max_batch)
      throw Refused(is + "the program takes a batch of 1 to " + std::to_string(max_batch) + " (executorch.max_batch)");
    if (t.sizes[2] != features)
      throw Refused(is + "the program takes " + std::to_string(features) + " features (" + what + ")");
    if (like && batch != like->sizes[batch_first ? 0 : 1]) throw Refused(is + "its batch differs from x's");
  }
};

inline Contract contract_of(Module& module, const std::string& path) {
  if (!std::ifstream(path, std::ios::binary)) throw Refused("cannot open " + path);
  if (auto error = module.load(); error != et::Error::Ok)
    throw std::runtime_error(error_text("loading " + path, error));
  auto names = module.method_names();
  for (const char* method : {"forward", "time_steps", "max_batch", "rnnloss_json"}) {
    if (!names.ok() || !names.get().count(method))
      throw Refused(path + " has no method " + method + " (not an rnnloss ExecuTorch program)");
  }
  Contract c;
  c.time = int_method(module, "time_steps");
  c.max_batch = int_method(module, "max_batch");
  auto json = execute(module, "rnnloss_json");
  if (json.empty() || !json[0].isString()) throw std::runtime_error("rnnloss_json does not answer a string");
  c.batch_first = json_flag(std::string(json[0].toString()), "batch_first");
  auto meta = module.method_meta("forward");
  if (!meta.ok()) throw std::runtime_error(error_text("forward's method meta", meta.error()));
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok() || info->sizes().size() != 3) throw std::runtime_error("forward's input " + std::to_string(i) +
                                                                          " is not a tensor of rank 3");
    c.inputs.emplace_back(info->sizes().begin(), info->sizes().end());
  }
  return c;
}

// The file's tensors named `wanted` (in that order); any other name, or one missing, is refused.
inline std::vector<Tensor*> take(Tensors& tensors, const std::vector<std::string>& wanted, const std::string& path) {
  std::vector<Tensor*> found;
  for (const std::string& name : wanted) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Refused(path + " has no tensor named " + name);
    found.push_back(&it->second);
  }
  for (const auto& [name, t] : tensors) {
    if (std::find(wanted.begin(), wanted.end(), name) == wanted.end())
      throw Refused(path + " holds " + name + ", which this program does not take");
  }
  return found;
}

inline executorch::extension::TensorPtr as_input(Tensor& t) {
  std::vector<executorch::aten::SizesType> sizes(t.sizes.begin(), t.sizes.end());
  return executorch::extension::from_blob(t.data.data(), std::move(sizes), executorch::aten::ScalarType::Float);
}
