"""A run's folder, checkpoints, signals and messages: nothing lost, nothing false (CPU, no downloads)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import contragan as cg
from test_contragan import HERE, SCRIPT, TINY, one_line_error, run_main, sample


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start_cli(*args, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, SCRIPT, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)


@pytest.mark.parametrize("sig,launcher", [("SIGTERM", None), ("SIGHUP", None), ("SIGTERM", TORCHRUN)],
                         ids=["SIGTERM", "SIGHUP", "torchrun-SIGTERM"])
def test_sigterm_and_sighup_save_and_exit_like_ctrl_c(tmp_path, capsys, sig, launcher):
    # SIGTERM: how SLURM, Kubernetes and `timeout` stop a job (torchrun passes it on to every rank).
    # SIGHUP: the terminal closed, so the output is gone too (here: a closed pipe); the run still saves.
    run, signum = tmp_path / "run", getattr(signal, sig)
    proc = start_cli(*TINY, "--steps", "100000", "--eval-every", "100000", "--run-dir", run,
                     launcher=launcher or (sys.executable,))
    assert next(line for line in proc.stdout if line.startswith("step ")).startswith("step 1/")
    if sig == "SIGHUP":
        proc.stdout.close()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    if sig == "SIGTERM":
        out = proc.stdout.read()
        assert f"by SIGTERM: saved {run}/last.pt" in out and "(exit status 143)" in out
    assert launcher or proc.returncode == 128 + signum and err == "", err   # torchrun adds its own report
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] >= 1 and len(state["rng"]) == (2 if launcher else 1) and not (run / "run.lock").exists()
    assert run_main(capsys, "--resume", run, "--steps", state["step"] + 1).returncode == 0


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    proc = start_cli(*TINY, "--steps", "1", "--run-dir", tmp_path / "run")
    time.sleep(1.0)                                            # inside `import torch` (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "interrupted", err


def test_an_earlier_checkpoint_branches_and_never_rolls_a_run_back(tmp_path, capsys):
    run, new = tmp_path / "run", tmp_path / "new"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    (run / "best.pt").write_bytes((run / "last.pt").read_bytes())   # best.pt at step 1, last.pt later
    assert cg.main(["--resume", str(run), "--steps", "2"]) == 0
    before = {f: (run / f).read_bytes() for f in ("last.pt", "best.pt", "metrics.jsonl")}
    line = one_line_error(run_main(capsys, "--resume", run / "best.pt", "--steps", "3"))
    assert "--run-dir NEW" in line and f"--resume {run}" in line
    assert {f: (run / f).read_bytes() for f in before} == before and not (run / "run.lock").exists()
    assert cg.main(["--resume", str(run / "best.pt"), "--run-dir", str(new), "--steps", "3"]) == 0
    assert torch.load(new / "last.pt", weights_only=False)["step"] == 3
    assert [json.loads(x)["step"] for x in (new / "metrics.jsonl").read_text().splitlines()] == [2, 3, 3]
    assert {f: (run / f).read_bytes() for f in before} == before


def test_resume_of_last_pt_in_its_folder_continues_there(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    monkeypatch.chdir(run)                                     # `--resume last.pt` from inside the run folder
    assert cg.main(["--resume", "last.pt", "--steps", "2"]) == 0
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 2 and os.listdir(run).count("runs") == 0


def test_flipped_bytes_are_refused_by_resume_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    good = (run / "last.pt").read_bytes()
    data, middle = bytearray(good), len(good) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (run / "last.pt").write_bytes(data)
    for args, main in ((["--resume", run, "--steps", "2"], cg.main), ([run, "--out-dir", tmp_path / "f"], sample.main)):
        assert "is corrupt" in one_line_error(run_main(capsys, *args, main=main))
    assert (run / "last.pt").read_bytes() == data and not (tmp_path / "f").exists()
    legacy = tmp_path / "legacy.pt"                            # written before checksums: read as it is
    legacy.write_bytes(good[:-len(cg.SEAL) - 64])
    assert cg.load_checkpoint(str(legacy))[0]["step"] == 1


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    before = (run / "last.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"\0" * 1000)                                  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    line = one_line_error(run_main(capsys, "--resume", run, "--steps", "2"))
    assert "No space left on device" in line and f"the previous {run}/last.pt is intact" in line
    assert (run / "last.pt").read_bytes() == before and sorted(os.listdir(run)) == [
        "config.json", "last.pt", "metrics.jsonl", "samples"]  # no last.pt.tmp, no run.lock
    real_open = open                                           # full before the checkpoint: metrics.jsonl

    def full_open(file, mode="r", *args, **kwargs):
        if "a" in mode and str(file).startswith(str(run)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    line = one_line_error(run_main(capsys, "--resume", run, "--steps", "2"))
    assert f"No space left on device: {run}/metrics.jsonl; {run}/last.pt is intact" in line
    assert (run / "last.pt").read_bytes() == before and not (run / "run.lock").exists()


def test_a_blow_up_names_what_is_true_and_the_way_on(tmp_path, capsys):
    # --lr-g 1e30: step 1's weights are ~1e30 but finite (saved), step 2 overflows: that checkpoint is
    # not "good", and resuming it cannot help unless the learning rate can change.
    huge = tmp_path / "huge"
    line = one_line_error(run_main(capsys, *TINY, "--lr-g", "1e30", "--steps", "3", "--eval-every", "1",
                                   "--run-dir", huge))
    assert "(step 1), the last checkpoint with finite weights, is intact" in line and "good" not in line
    assert "lower --lr-g / --lr-d" in line
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    r = run_main(capsys, "--resume", run, "--steps", "2", "--lr-g", "1e-5", "--lr-d", "3e-5")
    assert r.returncode == 0 and "--lr-g 0.0002 -> 1e-05, --lr-d 0.0002 -> 3e-05" in r.stdout
    state = torch.load(run / "last.pt", weights_only=False)    # the optimisers use them, not the loaded rate
    assert [g["lr"] for g in state["opt_G"]["param_groups"]] == [1e-5] * len(state["opt_G"]["param_groups"])
    assert {g["lr"] for g in state["opt_D"]["param_groups"]} == {3e-5} and state["config"]["lr_g"] == 1e-5


@pytest.mark.parametrize("args,expected", [
    (["--lr-g", "0"], "--lr-g must be > 0 and finite"),        # Adam with lr 0 trains nothing, silently
    (["--lr-d", "0"], "--lr-d must be > 0 and finite"),
    (["--adam-eps", "0"], "--adam-eps must be > 0 and finite"),  # 0/0 at step 1: "non-finite", no flag named
    (["--collapse-gap", "nan"], "--collapse-gap must be >= 0 and finite"),  # NaN: never warns
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2**63)"),  # torch's own error was a traceback
])
def test_flags_refused_up_front(args, expected, tmp_path, capsys):
    r = run_main(capsys, *TINY, "--steps", "1", "--run-dir", tmp_path / "r", *args)
    assert expected in one_line_error(r) and not (tmp_path / "r").exists()


def test_sync_bn_in_one_process_says_it_changes_nothing(tmp_path, capsys):
    r = run_main(capsys, *TINY, "--sync-bn", "--steps", "1", "--run-dir", tmp_path / "run")
    assert r.returncode == 0 and "--sync-bn changes nothing in one process" in r.stdout


def test_checkpoints_of_other_versions_and_empty_resume_are_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cg.main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    state = torch.load(run / "last.pt", weights_only=False)
    for name, change, expected in [
            ("newer", lambda c: c["config"].update(new_flag=1), "from a newer contragan.py: it has --new-flag"),
            ("older", lambda c: c.pop("data"), "not a checkpoint of this contragan.py version (no data)"),
            ("odd", lambda c: c.update(config="x"), "version (no config)")]:
        other = {**state, "config": dict(state["config"])}
        change(other)
        torch.save(other, tmp_path / f"{name}.pt")
        assert expected in one_line_error(run_main(capsys, "--resume", tmp_path / f"{name}.pt", "--steps", "2"))
    monkeypatch.chdir(tmp_path)                                # `--resume $UNSET`: never a fresh run
    assert "no checkpoint at ''" in one_line_error(run_main(capsys, *TINY, "--resume", "", "--steps", "1"))
    assert not (tmp_path / "runs").exists()
