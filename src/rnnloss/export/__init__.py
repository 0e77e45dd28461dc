"""The export wing: artifacts from a config, their parity with eager mode, the atomic install, --verify.

``rnnloss-export`` (and ``export/export.py``) run :func:`main`; the registry of artifacts is
:mod:`rnnloss.export.artifacts`. Importing this package does not import torch.
"""
from .cli import main

__all__ = ["main"]
