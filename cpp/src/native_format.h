// Internal: rnnloss::load's reader of the artifact's dict, also used by the parity test driver.
#pragma once

#include <rnnloss/load.h>

#include <ATen/core/ivalue.h>

#include <string>

namespace rnnloss {
namespace detail {

/// The model and loss described by `root` (the unpickled rnnloss_native.pt); `where` names the
/// source in error messages.
Exported from_native_dict(const c10::IValue& root, const std::string& where);

}  // namespace detail
}  // namespace rnnloss
