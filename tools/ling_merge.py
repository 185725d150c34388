#!/usr/bin/env python3
"""Thin CLI: same as the `ling-merge` console script (see megatron_ling.merge.cli)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_ling.merge.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
