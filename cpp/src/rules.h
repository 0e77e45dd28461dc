// Generated from src/rnnloss/rules.py by `python -m rnnloss.rules cpp`; do not edit.
// Each message is a template: rules::format fills the {} in order (see rules.cpp).
#pragma once

namespace rnnloss::rules {

inline constexpr double kFloat32Max = 3.4028234663852886e+38;

/// The components, in the order of the components vector.
enum Term : int { kMse, kIn, kHid, kOut, kFr, kFrSd, kFrCv };
inline constexpr const char* kComponentNames[] = {"mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv"};

inline constexpr const char* kUnknownKeyword = "RNNLoss got an unexpected keyword argument {}{}; valid keywords are {}";  // TypeError, E
inline constexpr const char* kModelType = "model must be a CTRNN (or a subclass), got {}";  // TypeError, EC
inline constexpr const char* kLambdaType = "{} must be a real number (int or float), got {}";  // TypeError, E
inline constexpr const char* kLambdaValue = "{} must be finite in float32 and >= 0, got {}";  // ValueError, ESC
inline constexpr const char* kLambdaInactive = "{} is non-zero but component '{}' is inactive (its lambda was 0 at construction); build the loss with a non-zero lambda_{}";  // ValueError, ESC
inline constexpr const char* kLambdaName = "set_lambda: name must be one of {}, got '{}'";  // ValueError, ESC
inline constexpr const char* kLambdasBuffer = "lambdas must be a float64 tensor of shape [7], got dtype {} and shape {}";  // ValueError, ESC
inline constexpr const char* kLambdasValues = "lambdas must be finite in float32, >= 0, and 0 for inactive components";  // ValueError, ESC
inline constexpr const char* kSyncEagerOnly = "RNNLoss(sync_stats=True) runs eagerly only: its all-reduce of the statistics cannot be scripted or exported; build the loss with sync_stats=False for TorchScript, ONNX or torch.export";  // ValueError, ES
inline constexpr const char* kSyncNoGroup = "RNNLoss(sync_stats=True) needs torch.distributed initialised: call torch.distributed.init_process_group before the first forward";  // ValueError, E
inline constexpr const char* kNotFloat = "{} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype {}";  // TypeError, ESC
inline constexpr const char* kEmpty = "{} must not be empty, got shape {}";  // ValueError, ESCG
inline constexpr const char* kLabelShape = "pred and label must have the same shape, got pred {} and label {}";  // ValueError, ESCG
inline constexpr const char* kDevice = "{} must be on the device of {} ({}), got {}";  // ValueError, ESC
inline constexpr const char* kStatesMissing = "states is required when lambda_fr, lambda_fr_sd or lambda_fr_cv > 0, got None";  // ValueError, ESC
inline constexpr const char* kStatesLastDim = "states must have N_hid={} as its last dimension, got shape {}";  // ValueError, ESCG
inline constexpr const char* kMaskDtype = "mask must be a real tensor (floating point, integer or bool), got dtype {}";  // TypeError, ESC
inline constexpr const char* kMaskShape = "mask must have pred's shape {} or pred's shape without its last axis {}, got shape {}";  // ValueError, ESCG
inline constexpr const char* kMaskWeights = "mask must hold finite weights >= 0";  // ValueError, ESCG
inline constexpr const char* kGraphShape = "{} must have shape {}";  // ValueError, G
inline constexpr const char* kXShape = "x must have shape {} with N_in={}, got shape {}";  // ValueError, ESC
inline constexpr const char* kXDtype = "x must have the model's dtype {}, got dtype {}";  // TypeError, ESC
inline constexpr const char* kInitStateShape = "init_state must have shape [B, N_hid] = {}, got shape {}";  // ValueError, ESC
inline constexpr const char* kDims = "dims must be a sequence (N_in, N_hid, N_out) of three positive ints, got {}";  // ValueError, EC
inline constexpr const char* kPositive = "{} must be a finite number > 0, got {}";  // ValueError, EC
inline constexpr const char* kNonNegative = "{} must be a finite number >= 0, got {}";  // ValueError, EC
inline constexpr const char* kDtAboveTau = "dt must not exceed tau (alpha = dt / tau must be <= 1), got dt={}, tau={}";  // ValueError, EC
inline constexpr const char* kChoice = "{} must be one of {}, got {}";  // ValueError, EC
inline constexpr const char* kPerLayer = "{} must be one value or a sequence of three (input, hidden, readout), got {}";  // TypeError, EC
inline constexpr const char* kLayerChoice = "{} for the {} layer must be one of {}, got {}";  // ValueError, EC
inline constexpr const char* kLayerShape = "{} for the {} layer must have shape {}, got {}";  // ValueError, EC
inline constexpr const char* kLayerFinite = "{} for the {} layer must be finite";  // ValueError, EC
inline constexpr const char* kEiValues = "ei_masks for the {} layer must hold only +1, -1 and 0";  // ValueError, EC
inline constexpr const char* kPlasticityValues = "plasticity_masks for the {} layer must be >= 0 (gradient scales)";  // ValueError, EC

/// The rules raised as TypeError (c10::TypeError); every other is a ValueError.
inline constexpr const char* kTypeErrors[] = {kUnknownKeyword, kModelType, kLambdaType, kNotFloat, kMaskDtype, kXDtype, kPerLayer};

}  // namespace rnnloss::rules
