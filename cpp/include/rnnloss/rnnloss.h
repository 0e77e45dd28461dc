// rnnloss: the CTRNN and its composite loss in libtorch's C++ frontend (no TorchScript).
//
//   #include <rnnloss/rnnloss.h>
//   rnnloss::CTRNN model(rnnloss::CTRNNOptions(3, 64, 2).tau(100.0).dt(10.0));
//   rnnloss::RNNLoss loss(model, rnnloss::RNNLossOptions().lambda_fr(0.01));
//   auto [output, states] = model->forward(x);
//   auto [total, components] = loss->forward(output, target, states);
//
// The definitions mirror the Python package (rnnloss.CTRNN, rnnloss.RNNLoss): same options, same
// parameter names, same formulas, same error messages (thrown as c10::ValueError / c10::TypeError).
// Both are Cloneable modules (model->clone() is a deep copy) and print their options
// (std::cout << *loss).
#pragma once

#include <rnnloss/ctrnn.h>
#include <rnnloss/load.h>
#include <rnnloss/loss.h>
