"""What splitflower's glibc malloc top pad changes on the CSL step of ``benchmarks/transport.py``.

Fresh process pairs (see ``_fresh_pairs.py``) alternate two settings: splitflower's (a 64 MiB
top pad, ``splitflower/_malloc.py``) and glibc's default pad of 128 KiB, set explicitly through
``MALLOC_TOP_PAD_`` in both processes (splitflower then leaves the pad alone and still raises
the mmap and trim thresholds). The record holds each run's time and page faults per step::

    .venv/bin/python benchmarks/malloc_settings.py [--pairs 6] [--steps 40]

It writes ``<out-dir>/malloc-top-pad-<short commit>[-dirty].json``. A report, not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fresh_pairs

GLIBC_DEFAULT_TOP_PAD = str(128 * 1024)  # mallopt(3): M_TOP_PAD's default
SETTINGS = {"splitflower_top_pad": {}, "glibc_top_pad": {"MALLOC_TOP_PAD_": GLIBC_DEFAULT_TOP_PAD}}

if __name__ == "__main__":
    raise SystemExit(_fresh_pairs.main("malloc-top-pad", __file__, SETTINGS))
