// ctrnn_run PROGRAM.pte IN OUT: the CTRNN's forward (ctrnn.pte of rnnloss-export) in ExecuTorch's C++ runtime.
// IN holds one tensor named x; OUT gets the tensors output and states (the tensor file format: common.h).
// x is checked against the program's contract before anything runs (exit 2, one line).
#include <cstring>

#include "common.h"

static const char* const USAGE =
    "usage: ctrnn_run PROGRAM.pte IN OUT\n"
    "  Runs the CTRNN forward of PROGRAM.pte (ctrnn.pte of rnnloss-export) on the tensor x in IN and writes\n"
    "  the tensors output and states to OUT. IN and OUT are tensor files: named float32 tensors, each\n"
    "  int32 name_length, name, int32 ndim, int64 sizes[ndim], float32 data (little endian, row-major).\n"
    "  x is (time, batch, n_in), or (batch, time, n_in) for a batch_first model, with time the program's\n"
    "  time_steps and batch 1..max_batch; anything else is refused before running.\n"
    "Exit status: 0 done, 2 refused (usage, input files, shapes), 1 the runtime failed.\n";

int main(int argc, char** argv) {
  return run_main("ctrnn_run", [&] {
    std::vector<std::string> args;
    for (int i = 1; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
        std::fputs(USAGE, stdout);
        return;
      }
      args.emplace_back(argv[i]);
    }
    if (args.size() != 3) throw Refused("expected PROGRAM.pte IN OUT (see --help)");
    const std::string &path = args[0], &in = args[1], &out = args[2];

    Module module(path, Module::LoadMode::File);
    const Contract contract = contract_of(module, path);
    if (contract.inputs.size() != 1)
      throw Refused(path + "'s forward takes " + std::to_string(contract.inputs.size()) +
                    " inputs; ctrnn_run runs a model program (ctrnn.pte)");
    Tensors tensors = read_tensors(in);
    Tensor& x = *take(tensors, {"x"}, in)[0];
    contract.check("x", x, contract.inputs[0][2], "n_in");

    auto input = as_input(x);
    auto outputs = execute(module, "forward", {*input});
    if (outputs.size() != 2 || !outputs[0].isTensor() || !outputs[1].isTensor())
      throw std::runtime_error("forward did not answer (output, states)");
    write_tensors(out, {named("output", outputs[0].toTensor()), named("states", outputs[1].toTensor())});
  });
}
