"""What splitflower's glibc malloc settings change on the CSL step of ``benchmarks/transport.py``.

Fresh process pairs (see ``_fresh_pairs.py``; here a run per setting in each round) alternate
three settings in both processes: splitflower's (``splitflower/_malloc.py``: raised mmap and
trim thresholds, a 64 MiB top pad); glibc's default pad of 128 KiB, set through
``MALLOC_TOP_PAD_`` (splitflower then leaves the pad alone and still raises the thresholds);
and glibc's defaults for all three (``SPLITFLOWER_KEEP_MALLOC_DEFAULTS=1``). The record holds
each run's time and page faults per step::

    .venv/bin/python benchmarks/malloc_settings.py [--pairs 6] [--steps 40]

It writes ``<out-dir>/malloc-settings-<short commit>[-dirty].json`` (``malloc-top-pad-*`` before
the third setting). A report, not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fresh_pairs

from splitflower._malloc import KEEP_DEFAULTS_ENV

GLIBC_DEFAULT_TOP_PAD = str(128 * 1024)  # mallopt(3): M_TOP_PAD's default
SETTINGS = {
    "splitflower": {},
    "glibc_top_pad": {"MALLOC_TOP_PAD_": GLIBC_DEFAULT_TOP_PAD},
    "glibc_defaults": {KEEP_DEFAULTS_ENV: "1"},
}

if __name__ == "__main__":
    raise SystemExit(_fresh_pairs.main("malloc-settings", __file__, SETTINGS))
