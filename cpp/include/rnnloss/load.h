// rnnloss::load — the model and loss of an export folder, without TorchScript.
//
// The export writes `rnnloss_native.pt` (Python: rnnloss.export.native.save_native): torch.save of a
// dict of plain values and tensors — the model's options, the loss's λ and active set, and the
// model's state_dict. load() rebuilds the CTRNN and RNNLoss from it (on the CPU, in the saved dtype).
// It checks the declared sizes against the stored tensors before it allocates anything, and the λ
// as every writer of λ does (c10::ValueError, one line naming the file); keys it does not know, such
// as the export's "metadata", are ignored.
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
