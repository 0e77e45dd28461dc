// Shared by the programs train_ctrnn and eval_loss (not installed).
#pragma once

#include <iostream>
#include <string>

namespace cli {

// Print "PROGRAM: WHY" as one line on stderr and return `status`. A TorchScript error carries its
// script traceback first and the Python-level message last; the last line is the reason.
inline int fail(const char* program, int status, std::string why) {
  while (!why.empty() && (why.back() == '\n' || why.back() == ' ')) why.pop_back();
  auto nl = why.rfind('\n');
  if (nl != std::string::npos) why = why.substr(nl + 1);
  std::cerr << program << ": " << why << "\n";
  return status;
}

}  // namespace cli
