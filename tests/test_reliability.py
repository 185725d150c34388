"""Issue 11: lose nothing, run nothing a file smuggles in, leave no process behind.

Real runs: `ling-train` (1 rank, tiny model, mock data) and `ling-convert` on the checkpoint it
wrote; each data-loss case asserts that nothing of the user's was deleted."""
import os
import pickle
import signal
import subprocess
import time

import pytest

from megatron_ling.checkpoint import layout
from megatron_ling.checkpoint.layout import TRACKER, iteration_dir
from tests.support.runs import ENV, ROOT, ckpts, convert, copy_run, error_lines, train, train_cmd, tree

# ----------------------------------------------------------------------------- 1-5 data loss

def test_keep_last_negative_is_refused_and_prune_keeps_the_new_save(tmp_path):
    from megatron_ling.errors import LingConfigError
    from megatron_ling.training.recipe import load_recipe

    with pytest.raises(LingConfigError, match="checkpoint.keep_last: must be >= 1"):
        load_recipe("quickstart", ["checkpoint.keep_last=-1"]).validate(2)
    root = str(tmp_path / "c")
    for it in (2, 4, 6):
        layout.write_common_state(layout.begin_save(root, it), {"iteration": it})
        layout.commit_save(root, it)
    layout.prune(root, 2, 6)
    assert layout.list_iterations(root) == [4, 6] and layout.latest_iteration(root) == 6
    with pytest.raises(LingConfigError, match="keep_last"):
        layout.prune(root, -1, 6)
    assert layout.list_iterations(root) == [4, 6]


def test_resuming_an_older_iteration_into_a_newer_dir_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = tree(run)
    p = train(run, "training.train_iters=6", "checkpoint.interval=1", "checkpoint.keep_last=1",
              f"checkpoint.resume={iteration_dir(ckpts(run), 2)}")
    assert p.returncode == 2 and len(error_lines(p)) == 1, p.stderr[-2000:]
    assert "checkpoint.dir" in error_lines(p)[0] and "iteration 4" in error_lines(p)[0]
    after = tree(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the user's deleted


def test_to_hf_output_containing_the_input_is_refused(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = tree(run)
    for out in (run, ckpts(run)):
        p = convert("to-hf", ckpts(run), out, "--force", "--no-progress")
        assert p.returncode == 2 and len(error_lines(p)) == 1 and "input" in error_lines(p)[0], p.stderr[-2000:]
    assert tree(run) == before


def test_missing_tracker_resumes_from_the_newest_complete_checkpoint(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    os.remove(os.path.join(ckpts(run), TRACKER))
    before = tree(ckpts(run))
    p = train(run, "training.train_iters=5", "checkpoint.interval=100")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "no tracker" in p.stdout and "starting at iteration 4" in p.stdout
    assert layout.list_iterations(ckpts(run)) == [2, 4, 5] and layout.latest_iteration(ckpts(run)) == 5
    assert all(os.path.getsize(os.path.join(ckpts(run), k)) == v for k, v in before.items())


def _pids_of(marker):
    """Live processes whose command line names ``marker`` (the run's unique directory)."""
    pids = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
                with open(f"/proc/{e}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                pids.append(int(e))
    return pids


def test_second_run_on_a_run_dir_is_refused_and_sigterm_to_launcher_saves_and_stops(tmp_path):
    """Items 5 and 10: a lock on RUN_DIR/.lock; the launcher forwards SIGTERM as a stop request
    (one save, exit 0, 'stopped: preempted') and leaves no process behind."""
    run = str(tmp_path / "signal_run")
    first = subprocess.Popen(train_cmd(run, "training.train_iters=100000", "checkpoint.interval=100000"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        metrics = os.path.join(run, "metrics.jsonl")
        deadline = time.time() + 400
        while not (os.path.exists(metrics) and os.path.getsize(metrics)) and first.poll() is None:
            assert time.time() < deadline, "no training step within the deadline"
            time.sleep(1)
        second = train(run, "training.train_iters=3")
        assert second.returncode == 2 and len(error_lines(second)) == 1, second.stderr[-2000:]
        assert "run_dir" in error_lines(second)[0] and "in use" in error_lines(second)[0]
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert "stopped: preempted" in out and "error:" not in err, out[-2000:] + err[-2000:]
    assert len(layout.list_iterations(ckpts(run))) == 1
    deadline = time.time() + 30
    while _pids_of(run) and time.time() < deadline:
        time.sleep(0.5)
    assert not _pids_of(run)


def test_kill_9_of_the_launcher_leaves_no_worker(tmp_path):
    run = str(tmp_path / "kill_run")
    p = subprocess.Popen(train_cmd(run, "training.train_iters=100000", "checkpoint.save=false"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 400
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
        assert p.poll() is None and time.time() < deadline
        time.sleep(1)
    p.kill()
    p.wait()
    deadline = time.time() + 60
    while _pids_of(run) and time.time() < deadline:
        time.sleep(0.5)
    left = _pids_of(run)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers left behind: {left}"


# ----------------------------------------------------------------------------- 6 security

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _craft_metadata(iter_dir, marker):
    with open(os.path.join(iter_dir, ".metadata"), "wb") as f:
        pickle.dump(_Evil(marker), f)


def test_crafted_metadata_is_refused_by_to_hf_verify_and_resume(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    hf = str(tmp_path / "hf")
    p = convert("to-hf", ckpts(run), hf, "--no-progress")  # real checkpoints still convert
    assert p.returncode == 0, p.stderr[-2000:]
    marker = str(tmp_path / "marker")
    _craft_metadata(iteration_dir(ckpts(run), 4), marker)
    for argv in (["to-hf", ckpts(run), str(tmp_path / "hf2"), "--no-progress", "--no-verify-checksums"],
                 ["verify", ckpts(run), hf, "--no-verify-checksums"],
                 ["to-hf", ckpts(run), str(tmp_path / "hf3"), "--no-progress"]):  # the manifest catches it first
        p = convert(*argv)
        assert p.returncode == 2 and len(error_lines(p)) == 1, (argv, p.stderr[-2000:])
        assert ".metadata" in error_lines(p)[0]
    p = train(run, "training.train_iters=6", "checkpoint.verify_checksums=false")
    assert p.returncode == 2 and len(error_lines(p)) == 1, p.stderr[-2000:]
    assert "refusing" in error_lines(p)[0] and ".metadata" in error_lines(p)[0]
    assert not os.path.exists(marker)
    assert layout.list_iterations(ckpts(run)) == [2, 4]


# ----------------------------------------------------------------------------- 7 NaN

def test_nan_loss_stops_the_run_without_saving_it(tmp_path):
    run = str(tmp_path / "nan_run")
    p = train(run, "training.train_iters=6", "checkpoint.interval=1", "optimizer.lr=1e30", "optimizer.clip_grad=0",
              "lr.schedule=constant")
    assert p.returncode != 0
    errs = error_lines(p)
    assert len(errs) == 1 and "training diverged" in errs[0], p.stdout[-2000:] + p.stderr[-2000:]
    bad = int(errs[0].split("at iteration ")[1].split(";")[0])
    assert all(it < bad for it in layout.list_iterations(ckpts(run)))
    if layout.list_iterations(ckpts(run)):
        assert layout.latest_iteration(ckpts(run)) == bad - 1


# ----------------------------------------------------------------------------- 11 files

def test_converter_output_respects_the_umask(trained, tmp_path):
    old = os.umask(0o022)
    try:
        p = convert("to-hf", ckpts(trained), str(tmp_path / "hf"), "--no-progress")
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr[-2000:]
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == 0o755


def test_verify_seq_len_is_bounded_by_the_model(trained, tmp_path):
    hf = str(tmp_path / "hf")
    assert convert("to-hf", ckpts(trained), hf, "--no-progress").returncode == 0
    p = convert("verify", ckpts(trained), hf, "--seq-len", "10000000000")
    assert p.returncode == 2 and len(error_lines(p)) == 1 and "--seq-len" in error_lines(p)[0], p.stderr[-2000:]


def test_preprocess_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    """A full disk (writes go to /dev/full) fails the run and the final flush; no temp file stays."""
    from megatron.core.datasets import indexed_dataset

    from megatron_ling.data.preprocess import preprocess

    real_init = indexed_dataset.IndexedDatasetBuilder.__init__

    def full_disk_init(self, *a, **k):
        real_init(self, *a, **k)
        self.data_file.close()
        self.data_file = open("/dev/full", "wb")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "__init__", full_disk_init)
    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"text": "%s"}\n' % ("word " * 2000) for _ in range(20)))
    out = tmp_path / "out" / "corpus"
    with pytest.raises(OSError):
        preprocess([str(src)], str(out), progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_missing_common_state_is_one_line(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    d = iteration_dir(ckpts(run), 4)
    if os.path.exists(os.path.join(d, "common.pt")):
        os.remove(os.path.join(d, "common.pt"))
        want = "common.pt"
    else:  # megatron-core 0.19: the common state is an object in a .distcp file; lose that file
        from megatron_ling.checkpoint.metadata import read_metadata

        md = read_metadata(d)
        want = next(info.relative_path for idx, info in md.storage_data.items() if idx.fqn.startswith("common_state"))
        os.remove(os.path.join(d, want))
    p = train(run, "training.train_iters=6", "checkpoint.verify_checksums=false")
    assert p.returncode == 2 and len(error_lines(p)) == 1, p.stderr[-2000:]
    assert want in error_lines(p)[0]
    assert layout.list_iterations(ckpts(run)) == [2, 4]
