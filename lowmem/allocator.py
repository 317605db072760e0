"""Give freed tensor memory back to the system on Linux (glibc), so a CPU run's resident memory follows its live
tensors.

torch's CPU tensors come from ``malloc``. glibc serves a large block with its own ``mmap`` (returned to the system
on ``free``) only above a threshold that it raises, after each such free, up to 32 MiB; below it blocks come from
heaps that keep freed memory for reuse and fragment. A training step frees and allocates tensors of every size, so
the process's resident memory drifts far above its live tensors: LLaMA-1.1B layer-wise through the Trainer on a CPU
measured 0.4 to 1.2 GiB above them, different from run to run. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``,
which also stops glibc from raising it) puts every block of ``THRESHOLD`` or more in its own mapping, and the
resident memory stays within a few tens of MiB of the live tensors (``benchmarks/RESULTS.md``).

``release_freed_memory()`` is called by lowmem's Trainer; ``LOWMEM_MALLOC=default`` keeps glibc's own policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: Blocks of this many bytes or more get their own mapping (64 KiB, half glibc's starting threshold: the 1.1B
#: GaLore 8-bit layer-wise run's many 0.25-1 MiB states and temporaries fragmented the heaps at 1 MiB, 0.05 GiB).
THRESHOLD = 1 << 16
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_done = False


def release_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (once); whether it was set. Does nothing
    (False) off Linux, on a C library without ``mallopt`` (musl), or with ``LOWMEM_MALLOC=default``."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LOWMEM_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    return _done
