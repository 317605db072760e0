"""Run a test worker under ``torchrun --standalone`` (gloo on CPU), for the multi-process tests."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def torchrun(worker: str, processes: int, *args, timeout: int = 900) -> None:
    """``python -m torch.distributed.run --nproc_per_node=processes tests/<worker> args...``, one intra-op thread per
    process; fails with the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(TESTS / worker), *map(str, args)],
                          env=env, timeout=timeout, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
