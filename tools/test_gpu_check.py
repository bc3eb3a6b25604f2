"""tools/gpu_check.sh fits its 10-minute call: the sum of its limits and graces, and a run with a python that ignores
SIGTERM (as contragan.py does while it ends a step, a compile or an evaluation), each part then killed at its limit
+ grace. The script's CPU dry run (its header) trains for real: minutes on 2 cores, so not a test here."""
import os
import re
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "gpu_check.sh")


def test_limits_and_graces_sum_to_the_header_total_inside_the_call():
    text = open(SCRIPT).read()
    names, values = re.search(r'read -r ((?:t_\w+ )+)grace \\\s+<<< "\$\{LIMITS:-([\d ]+)\}"', text).groups()
    names, limits = names.split(), [int(v) for v in values.split()]
    grace = limits.pop()
    assert len(limits) == len(names)
    total = sum(limits) + len(names) * grace
    assert total <= 570                                        # 30 s for the shell between the parts
    header = " ".join(line.lstrip("# ") for line in text.splitlines())
    assert (f"{' + '.join(map(str, limits))} = {sum(limits)} s + {len(names)} graces of {grace} s = {total} s at most, "
            "inside the 600-s call") in header                 # the header says it
    for name in names:                                         # each limit holds one part
        assert len(re.findall(rf'"\${name}"', text)) == 1, name
    for line in text.splitlines():                             # and nothing runs outside the limits
        if '"$py"' in line or "nvidia-smi" in line:
            assert line.lstrip().startswith("#") or "limited" in line, line


def test_every_part_is_killed_at_limit_plus_grace_when_sigterm_is_ignored(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\ntrap "" TERM\necho "${{1:0:20}}" >> {tmp_path / "calls"}\nsleep 60\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), LIMITS="0.3 " * 7 + "0.3", RUNS=str(tmp_path / "runs"), DEVICE="cpu")
    start = time.monotonic()
    subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], cwd=os.path.dirname(HERE), env=env, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    assert len((tmp_path / "calls").read_text().splitlines()) == 7    # every part started, and every one killed:
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count(": exit 137") == 5 and "gpu_check: done" in report   # runs and bench (SIGKILL: 128 + 9)
    assert elapsed < 7 * 0.6 + 5, elapsed
