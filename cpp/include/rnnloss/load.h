// rnnloss::load — the model and loss of an export folder, without TorchScript.
//
// The export writes `rnnloss_native.pt` (Python: rnnloss.native.save_native): torch.save of a
// dict of plain values and tensors — the model's options, the loss's λ and active set, and the
// model's state_dict. load() rebuilds the CTRNN and RNNLoss from it (on the CPU, in the saved dtype).
#pragma once

#include <rnnloss/ctrnn.h>
#include <rnnloss/loss.h>

#include <string>

namespace rnnloss {

/// The artifact's file name inside an export folder.
inline constexpr const char* kNativeArtifact = "rnnloss_native.pt";

struct Exported {
  CTRNN model;
  RNNLoss loss;  // holds `model`
};

/// `path` is an export folder (its rnnloss_native.pt is read) or the artifact file itself.
Exported load(const std::string& path);

}  // namespace rnnloss
