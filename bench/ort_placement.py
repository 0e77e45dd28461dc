#!/usr/bin/env python3
"""Which execution provider ran each node of an exported rnn_loss.onnx (ONNX Runtime's profile).

A session asked for CUDAExecutionProvider may still run nodes on the CPU (ORT places shape
arithmetic there, and any operator its CUDA provider lacks). This prints, from one profiled run on
the export's example shape, how many nodes each provider ran and the operator types on the CPU, so
a parity row labelled CUDA is known to have computed on the GPU. Usage:

    python bench/ort_placement.py EXPORT_DIR [--provider CUDAExecutionProvider]
"""
import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads the CUDA libraries first, as the export does)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    args = parser.parse_args()
    import numpy as np
    import onnxruntime as ort
    path = args.export_dir / "rnn_loss.onnx"
    with tempfile.TemporaryDirectory() as d:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(d) / "profile")
        session = ort.InferenceSession(str(path), options, providers=[args.provider])
        print("session providers", session.get_providers())
        n_hid = session.get_inputs()[2].shape[-1]
        rng = np.random.default_rng(0)
        feeds = {"pred": rng.standard_normal((20, 6, 2), dtype=np.float32),
                 "label": rng.standard_normal((20, 6, 2), dtype=np.float32),
                 "states": rng.random((20, 6, n_hid), dtype=np.float32)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = {}
    for e in events:
        a = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in a:
            nodes[e["name"].removesuffix("_kernel_time")] = (a["provider"], a.get("op_name", "?"))
    by_provider = collections.Counter(p for p, _ in nodes.values())
    print("nodes run per provider:", dict(by_provider))
    cpu_ops = collections.Counter(op for p, op in nodes.values() if p == "CPUExecutionProvider")
    print("operator types on CPUExecutionProvider:", dict(cpu_ops))
    return 0 if by_provider.get(args.provider, 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
