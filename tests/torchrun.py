"""Run a test worker under ``torchrun --standalone`` (gloo on CPU), for the multi-process tests."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

TESTS = Path(__file__).parent


def torchrun(worker: str, processes: int, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=processes tests/<worker> args...`` (``worker`` may also be
    ``"-m <module>"``), one intra-op thread per process; fails with the workers' tracebacks and the end of its
    stderr, else returns the run (its output as text).

    A run whose worker was killed by a signal without any Python traceback (gloo aborting a process: seen about once
    in three full suites, never in 15 runs of that phase alone) is run once more, with a warning; a Python error, or
    the same crash twice, fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        target = ["-m", worker.removeprefix("-m ")] if worker.startswith("-m ") else [str(TESTS / worker)]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={processes}", *target, *map(str, args)],
                              env=env, timeout=timeout, capture_output=True, text=True)
        ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]  # the workers' tracebacks
        codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)]
        aborted = done.returncode != 0 and not ranks and codes and all(code < 0 for code in codes)
        if not aborted or attempt:
            break
        warnings.warn(f"{worker} {' '.join(map(str, args[1:3]))}: a worker was killed by a signal without a Python "
                      "error; running it once more", UserWarning, stacklevel=2)
    assert done.returncode == 0, "\n".join(ranks[-40:]) + "\n" + done.stderr[-1500:]
    return done
