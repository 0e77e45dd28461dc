// Internal: rnnloss::load's readers of a torch.save file and of the artifact's dict, also used by
// eval_loss (its INPUTS) and the parity test driver.
#pragma once

#include <rnnloss/load.h>

#include <ATen/core/ivalue.h>

#include <optional>
#include <string>
#include <vector>

namespace rnnloss {
namespace detail {

/// The bytes of `file`, or nullopt if it cannot be opened (the caller says what the file was for).
std::optional<std::vector<char>> read_bytes(const std::string& file);

/// The model and loss described by `root` (the unpickled rnnloss_native.pt); `where` names the
/// source in error messages.
Exported from_native_dict(const c10::IValue& root, const std::string& where);

/// The value torch.save wrote into `bytes` (read from `file`), via torch::pickle_load. Anything
/// else raises c10::ValueError "cannot read FILE: it ..." saying what the file is instead: torch.save's
/// legacy format, a bare pickle, not a zip archive, a sparse tensor, or the unpickler's reason.
c10::IValue unpickle(const std::vector<char>& bytes, const std::string& file);

}  // namespace detail
}  // namespace rnnloss
