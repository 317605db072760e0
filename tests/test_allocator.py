"""``lowmem.allocator``: with glibc's mmap threshold fixed, freed tensors of a quarter MiB (the size of GaLore's
projected 8-bit states) go back to the system; with glibc's own policy (after one large free has raised its threshold)
they stay resident."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc policy")

SCRIPT = """
import sys, torch
from lowmem.allocator import release_freed_memory
set_ = release_freed_memory()
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
big = torch.ones(4 << 20)  # 16 MiB from its own mapping; freeing it raises glibc's threshold to 16 MiB
del big
held = [torch.ones(1 << 16) for _ in range(800)]  # 800 x 256 KiB, half of them freed below
before = rss()
del held[::2]  # every other one: the survivors keep the freed ones' heap memory from being trimmed
print(set_, (before - rss()) / 2**20)
"""


def _freed_mib(env_policy: str) -> tuple[bool, float]:
    env = {"LOWMEM_MALLOC": env_policy, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    was_set, mib = done.stdout.split()
    return was_set == "True", float(mib)


def test_freed_tensors_go_back_to_the_system():
    was_set, freed = _freed_mib("lowmem")
    assert was_set and freed > 75  # the 100 MiB freed leave the process


def test_glibc_policy_keeps_them_which_is_what_the_fix_is_for():
    was_set, freed = _freed_mib("default")
    assert not was_set and freed < 25
