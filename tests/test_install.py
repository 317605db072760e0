"""Packaging: the README's commands, CI, and coexistence with transformers / bitsandbytes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_both():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, test_cmd = commands
    assert "lowmem train" in main_job and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_lines = [line for line in ci if line.startswith("python3 -m venv")]
    assert ci_lines == [main_job, test_cmd]


def test_ci_runs_in_a_fresh_clone_with_nothing_beside_it():
    """CI runs the README's commands in a clone alone in a temp dir (committed files only), then removes the dir."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    clone = next(i for i, line in enumerate(ci) if line.startswith("git clone"))
    cd = next(i for i, line in enumerate(ci) if line.startswith("cd "))
    test = next(i for i, line in enumerate(ci) if "pytest" in line and not line.startswith("#"))
    assert clone < cd < test and '"$tmp/' in ci[clone] and '"$tmp/' in ci[cd]
    assert any(line.startswith("trap ") and "rm -rf" in line for line in ci[:clone])


def test_no_top_level_kernels_or_trainers_package():
    import lowmem

    top = Path(lowmem.__file__).resolve().parents[1]
    assert not (top / "kernels").exists() and not (top / "trainers").exists()


def test_transformers_and_pipelines_still_import_with_lowmem_on_the_path():
    code = "import lowmem, lowmem.optim; import transformers, transformers.pipelines; import bitsandbytes; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_example_trains_and_reports_state_bytes():
    code = "from lowmem.example import main; main(['--steps', '12', '--rank', '16'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"loss ([\d.]+) -> ([\d.]+).*optimizer state: ([\d,]+) bytes \(AdamW on the same model: ([\d,]+)",
                      out.stdout, re.S)
    assert match, out.stdout
    first, last = float(match.group(1)), float(match.group(2))
    ours, adamw = (int(match.group(i).replace(",", "")) for i in (3, 4))
    assert last < first - 1.0
    assert ours < 0.5 * adamw


def test_example_takes_generic_names_and_rejects_unknown_parts(capsys):
    from lowmem.example import main, rank_option, train

    assert rank_option("galore+came+8bit", 32) == {"rank": 32} == rank_option("fira_adamw", 32)
    assert rank_option("apollo_mini+came", 32) == {} == rank_option("apollo_mini", 32) == rank_option("came", 32)
    assert train("galore+came+8bit", 3, 1e-3, 32, log_every=None)["state_bytes"] > 0
    with pytest.raises(SystemExit):
        main(["--optimizer", "galore+cam"])
    assert "unknown rule 'cam'" in capsys.readouterr().err
