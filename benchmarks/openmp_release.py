"""What releasing idle OpenMP workers saves on the CSL step of ``benchmarks/transport.py``.

Fresh process pairs (see ``_fresh_pairs.py``) alternate two settings: released (splitflower's
default, ``splitflower/_openmp.py``) and kept spinning (``SPLITFLOWER_KEEP_OPENMP_SPINNING=1``
in both processes)::

    .venv/bin/python benchmarks/openmp_release.py [--pairs 6] [--steps 40]

It writes ``<out-dir>/openmp-release-<short commit>[-dirty].json``. A report, not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fresh_pairs

from splitflower._openmp import KEEP_SPINNING_ENV

SETTINGS = {"released": {}, "kept_spinning": {KEEP_SPINNING_ENV: "1"}}

if __name__ == "__main__":
    raise SystemExit(_fresh_pairs.main("openmp-release", __file__, SETTINGS))
