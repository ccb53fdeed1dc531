"""What transparent huge pages for torch's large CPU tensors change on the CSL step of
``benchmarks/transport.py``, split and in one process.

PyTorch backs its CPU allocations of 2 MiB and more with transparent huge pages when
``THP_MEM_ALLOC_ENABLE=1`` is in the environment before ``torch`` is imported, and the
kernel's THP mode is ``madvise`` or ``always`` (``/sys/kernel/mm/transparent_hugepage/enabled``;
each run records how much memory huge pages back, which shows whether they took effect).
splitflower leaves the variable unset. Fresh process pairs (see ``_fresh_pairs.py``) alternate
the two settings in both processes; each run also times the unsplit step in its client process,
in alternating blocks with the split step, and records how much of each process's memory huge
pages back::

    .venv/bin/python benchmarks/huge_pages.py [--pairs 6] [--steps 40]

It writes ``<out-dir>/huge-pages-<short commit>[-dirty].json``. A report, not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fresh_pairs

THP_ENV = "THP_MEM_ALLOC_ENABLE"
SETTINGS = {"torch_default": {}, "huge_pages": {THP_ENV: "1"}}

if __name__ == "__main__":
    raise SystemExit(_fresh_pairs.main("huge-pages", __file__, SETTINGS, one_process=True))
