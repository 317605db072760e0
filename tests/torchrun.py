"""Run a test worker under ``torchrun --standalone`` (gloo on CPU), for the multi-process tests."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def torchrun(worker: str, processes: int, *args, timeout: int = 900) -> None:
    """``python -m torch.distributed.run --nproc_per_node=processes tests/<worker> args...``, one intra-op thread per
    process; fails with the workers' tracebacks and the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(TESTS / worker), *map(str, args)],
                          env=env, timeout=timeout, capture_output=True, text=True)
    ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]  # the workers' own tracebacks
    assert done.returncode == 0, "\n".join(ranks[-40:]) + "\n" + done.stderr[-1500:]
