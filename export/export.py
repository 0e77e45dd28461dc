#!/usr/bin/env python3
"""Export every artifact from a JSON config and print the parity table (see README).

Thin wrapper: the logic is rnnloss.export.main (also installed as ``rnnloss-export``).
"""
import sys

from rnnloss.export import main

if __name__ == "__main__":
    sys.exit(main())
