"""The environment variables the extension reads, set once at import.

Set before the extension is loaded, so before it starts any thread: candle's
element-wise work stays on the calling thread (its own spinning pool would
fight rayon's on a few cores), and candle sizes its matrix products from the
number of rayon threads (else it reads the CPU topology from /proc on every
product). Values the user set are kept. The Rust engine itself never changes
the environment, which is unsafe while other threads may read it.
"""

from __future__ import annotations

import os


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


os.environ.setdefault("CANDLE_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", str(_cpus()))
