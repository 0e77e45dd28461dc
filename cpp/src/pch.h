// The precompiled header of every target here (RNNLOSS_PRECOMPILE_HEADERS): the libtorch headers
// the library, the programs and the test driver include, parsed once per build instead of once per
// source file (about 20 s of CPU each). Not installed; sources still include what they use.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/cuda.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/script.h>
#include <torch/serialize.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>
