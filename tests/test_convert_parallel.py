"""ling-convert --workers / multi-node ranks (issue 14): the same plan run by 1, 2, 3 worker processes
or split between "nodes" (RANK/WORLD_SIZE, Slurm array) writes byte-identical output; a failing
worker fails the command and leaves nothing; a rerun after a partial multi-node run redoes only the
units without a completion marker. Logits against the HF reference: tests/test_convert.py (the
parallel output is byte-identical to the one-process output those tests check)."""
from __future__ import annotations

import filecmp
import glob
import json
import os
import shutil

import pytest
import torch

from megatron_ling.convert import mapping as M
from megatron_ling.convert import parallel_exec as P
from megatron_ling.convert.cli import main as cli_main
from megatron_ling.convert.from_hf import from_hf
from megatron_ling.convert.hf_io import write_safetensors
from megatron_ling.convert.to_hf import to_hf
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import get_preset
from tests.support.trees import assert_identical, files

CFG = get_preset("ling-tiny", num_nextn_predict_layers=1, moe_router_enable_expert_bias=True)
SHARD = 150_000  # small shards / .distcp files: several units per direction, experts split across shards
FILE = 300_000


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random bf16 HF BailingMoeV2 directory (expert_bias fp32), several shards."""
    d = str(tmp_path_factory.mktemp("par") / "hf")
    os.makedirs(d)
    plan = [(name, shape, torch.float32 if role == "expert_bias" else torch.bfloat16)
            for unit in M.units(CFG) for role in M.layer_roles(CFG, unit) for name, shape in M.hf_names(CFG, unit, role)]
    g = torch.Generator().manual_seed(0)
    write_safetensors(d, plan, SHARD, ((n, torch.randn(s, generator=g).to(t)) for n, s, t in plan))
    CFG.save_hf_config(os.path.join(d, "config.json"))
    return d


def leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_workers_give_byte_identical_output_both_directions(hf_dir, tmp_path):
    ck = {}
    for w in (1, 2, 3):
        r = from_hf(hf_dir, str(tmp_path / f"ck{w}"), workers=w, file_size=FILE, show_progress=False)
        assert r.run.finalized and len(r.run.ran) == len(r.run.records) >= 4
        assert len(r.run.peak_rss) == min(w, len(r.run.ran))
        # worker start-up is measured (bench/convert.py reports the rate after it); one worker is this process
        assert (r.run.startup_s > 0) == (w > 1) and r.run.startup_s < r.run.seconds
        assert ("workers started in" in r.summary) == (w > 1)
        ck[w] = str(tmp_path / f"ck{w}")
    assert_identical(ck[1], ck[2])
    assert_identical(ck[1], ck[3])
    # checksums.json: the data files' CRCs are taken while writing (torch_dist._CrcFile); they
    # equal a fresh read of every file
    from megatron_ling.checkpoint import layout, manifest

    d = layout.resolve(ck[3])
    want = manifest.read_manifest(d)
    assert want and any(n.endswith(".distcp") for n in want)
    assert manifest.hash_files(d, manifest.checkpoint_files(d)) == want
    # fp8: a weight and its _scale_inv may sit in different shards
    for dtype, counts in (("bf16", (1, 2, 3)), ("fp8", (1, 3))):
        for w in counts:
            r = to_hf(ck[w], str(tmp_path / f"{dtype}{w}"), dtype=dtype, shard_size=SHARD, workers=w,
                      show_progress=False)
            assert r.run.finalized and len(r.run.ran) >= 4
        for w in counts[1:]:
            assert_identical(str(tmp_path / f"{dtype}1"), str(tmp_path / f"{dtype}{w}"))
    # the round trip reproduces the source shards (same plan, same bytes), index included
    for f in files(hf_dir):
        if f != "config.json":
            assert filecmp.cmp(os.path.join(hf_dir, f), str(tmp_path / "bf162" / f), shallow=False), f
    assert leftovers(str(tmp_path)) == []


def test_serial_crc_is_the_crc_of_the_stream_with_stored_bytes_taken_beside_the_caller(monkeypatch):
    """torch_dist._SerialCrc (the CRC of a .distcp file for checksums.json): gathered small writes,
    deferred stored-tensor bytes and in-place large writes, in any mix, give zlib's CRC of the
    whole stream; a deferred piece is taken on the helper thread (beside the kernel copy), an
    in-place one before add_now returns (the caller may reuse the buffer), and an error on the
    helper surfaces in the caller."""
    import random
    import threading
    import zlib

    from megatron_ling.convert import torch_dist

    takers = []
    real = zlib.crc32

    def spy(buf, crc=0):
        if memoryview(buf).nbytes >= 4096:
            takers.append(threading.current_thread().name)
        return real(buf, crc)

    monkeypatch.setattr(torch_dist.zlib, "crc32", spy)
    rng = random.Random(0)
    c, stream = torch_dist._SerialCrc(), bytearray()
    try:
        for _ in range(200):
            kind, data = rng.choice("sdn"), rng.randbytes(rng.choice((1, 7, 300, 5000, 70_000)))
            stream += data
            if kind == "s":
                c.add_small(memoryview(data))
            elif kind == "d":
                c.add(data)
            else:
                buf = bytearray(data)
                c.add_now(buf)
                buf[:] = bytes(len(buf))  # reused at once: must not change the CRC
        assert c.value() == real(bytes(stream))
        assert any(t.startswith("ling-crc32") for t in takers)
        assert threading.current_thread().name in takers
        c.add(object())  # not a buffer: fails on the helper thread
        with pytest.raises(TypeError):
            c.value()
    finally:
        c.close()


def test_output_files_are_handed_to_writeback_as_they_are_written(hf_dir, tmp_path, monkeypatch):
    """Write-behind (common.WriteBehind): both directions hand every output file to the disk's
    writeback in consecutive ranges while writing it (not only at the closing fsync), through the
    in-kernel copies and the user-space writes alike; where the kernel refuses the hint, writing
    goes on without it and the output is the same."""
    from megatron_ling.convert import common

    step = 32 * 1024
    monkeypatch.setattr(common, "WRITE_BEHIND_BYTES", step)
    real = common._sync_file_range()
    assert real is not None  # Linux: libc has it
    calls = []

    def record(fd, start, n, flags):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), start, n, flags))
        return real(fd, start, n, flags)

    monkeypatch.setattr(common, "_SYNC_FILE_RANGE", [record])
    ck, hf = str(tmp_path / "ck"), str(tmp_path / "hf")
    from_hf(hf_dir, ck, file_size=FILE, show_progress=False)  # bf16: in-kernel copies
    to_hf(ck, hf, dtype="fp32", shard_size=SHARD, show_progress=False)  # fp32: user-space writes
    by_file = {}
    for path, start, n, flags in calls:
        assert flags == 2 and n >= step  # SYNC_FILE_RANGE_WRITE, a step or more at a time
        by_file.setdefault(os.path.basename(path), []).append((start, n))
    for final in (ck, hf):
        data = [f for f in files(final) if f.endswith((".distcp", ".safetensors"))]
        assert len(data) >= 2
        for f in data:
            ranges = by_file.get(os.path.basename(f), [(0, 0)])  # none for a file under one step
            assert ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
            end = ranges[-1][0] + ranges[-1][1]
            assert os.path.getsize(os.path.join(final, f)) - end < step + 64 * 1024, f  # the tail: fsync's
        assert max(len(by_file.get(os.path.basename(f), [])) for f in data) >= 3
    # refused (returns -1): asked once, then never again; the output is the same
    refused = []
    monkeypatch.setattr(common, "_SYNC_FILE_RANGE", [lambda *a: refused.append(a) or -1])
    ck2 = str(tmp_path / "ck2")
    from_hf(hf_dir, ck2, file_size=FILE, show_progress=False)
    assert len(refused) == 1
    assert_identical(ck, ck2)


@pytest.mark.parametrize("module,absent", [
    ("megatron_ling.convert.from_hf", ("megatron", "torch.distributed.checkpoint")),
    ("megatron_ling.convert.to_hf", ("megatron",)),
    ("megatron_ling.merge.merge", ("megatron",)),  # package names: megatron, not megatron_ling
])
def test_a_worker_imports_only_what_its_job_needs(module, absent):
    """A worker's start-up is an interpreter importing the job's module (parallel_exec): never
    megatron; and a from-hf worker, which only writes .distcp files, not torch.distributed.checkpoint
    (~1.2 s of import, imported by torch_dist only where the reader and write_metadata use it)."""
    import subprocess
    import sys

    code = (f"import sys, megatron_ling.convert.parallel_exec, {module}; "
            f"print(sorted(m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in {absent!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_failed_worker_fails_the_command_and_leaves_nothing(hf_dir, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    from_hf(hf_dir, ck, file_size=FILE, show_progress=False)
    # corrupt one torch.save record in the last .distcp file (same size: passes the up-front checks)
    last = sorted(glob.glob(os.path.join(ck, "iter_0000000", "*.distcp")))[-1]
    with open(last, "r+b") as f:
        f.write(b"\0" * 64)
    out = str(tmp_path / "hf")
    # --no-verify-checksums: the manifest would refuse the file up front; here a worker must meet it
    rc = cli_main(["to-hf", ck, out, "--shard-size", str(SHARD), "--workers", "3", "--no-progress",
                   "--no-verify-checksums"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: checkpoint: cannot read tensor"), err
    assert not os.path.exists(out) and leftovers(str(tmp_path)) == []
    # from-hf wrote checksums.json (before its rename): by default the corrupt file is refused up front
    assert cli_main(["to-hf", ck, out, "--workers", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{os.path.basename(last)} is corrupt" in err[0], err
    assert not os.path.exists(out) and leftovers(str(tmp_path)) == []


class _DyingJob(P.Job):
    """A job whose unit 2 kills the started worker process it runs in (as the OOM killer would).
    Units go out longest first and this process's own worker takes the first: unit 2, the second
    longest, is the started worker's first."""

    def __init__(self):
        self.units = [P.Unit(f"u{i}", {0: 10, 2: 5}.get(i, 1)) for i in range(5)]
        self.parent = os.getpid()

    def describe(self):
        return {"job": "dying"}

    def run_unit(self, i, out_dir, report):
        if i == 2 and os.getpid() != self.parent:
            os._exit(9)
        with open(os.path.join(out_dir, f"u{i}"), "w") as f:
            f.write(str(i))
        return {"files": [f"u{i}"]}

    def finalize(self, out_dir, records):
        raise AssertionError("never reached")


def test_killed_worker_fails_the_command(tmp_path):
    with pytest.raises(RuntimeError, match="died with exit code 9"):
        P.execute(_DyingJob(), str(tmp_path / "out"), workers=2, show_progress=False)
    assert os.listdir(tmp_path) == []


class _PidJob(P.Job):
    """Each unit writes the pid of the worker that ran it."""

    def __init__(self, n):
        self.units = [P.Unit(f"u{i}", n - i) for i in range(n)]

    def describe(self):
        return {"job": "pids", "n": len(self.units)}

    def run_unit(self, i, out_dir, report):
        with open(os.path.join(out_dir, f"u{i}"), "w") as f:
            f.write(str(os.getpid()))
        report(1)
        return {"files": [f"u{i}"]}

    def finalize(self, out_dir, records):
        assert [r["files"] for r in records] == [[f"u{i}"] for i in range(len(self.units))]


def test_this_process_is_one_of_the_workers_and_every_worker_gets_units(tmp_path):
    """--workers N: this process (which has its imports already) and N - 1 started interpreters;
    each started worker gets a unit with the job, so all N work, and this process does not wait
    through their start-up: it converts from the start."""
    out = str(tmp_path / "out")
    r = P.execute(_PidJob(12), out, workers=3, show_progress=False)
    pids = [int(open(os.path.join(out, f"u{i}")).read()) for i in range(12)]
    assert r.finalized and sorted(r.ran) == list(range(12))
    assert len(set(pids)) == 3 and os.getpid() in pids and set(r.peak_rss) == set(pids)
    assert pids[0] == os.getpid()  # the longest unit, at once
    assert r.startup_s > 0 and leftovers(str(tmp_path)) == []


def test_partition_is_disjoint_balanced_and_deterministic():
    units = [P.Unit(str(i), c) for i, c in enumerate([5, 1, 1, 5, 3, 3, 2, 2])]
    parts = P.partition(units, 3)
    assert sorted(i for p in parts for i in p) == list(range(8))
    loads = [sum(units[i].cost for i in p) for p in parts]
    assert max(loads) - min(loads) <= 1 and parts == P.partition(units, 3)
    assert P.partition(units, 1) == [list(range(8))]


def test_rank_from_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert P.resolve_rank() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert P.resolve_rank() == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert P.resolve_rank() == (2, 4)  # RANK/WORLD_SIZE win
    assert P.resolve_rank(0, 2) == (0, 2)  # explicit arguments win
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LingConfigError, match="out of range"):
        P.resolve_rank()


def _unit_of(staging, i):
    with open(os.path.join(staging, P.UNITS, f"{i:06d}.json")) as f:
        return json.load(f)


def test_ranks_split_the_plan_and_a_rerun_redoes_only_missing_units(hf_dir, tmp_path, monkeypatch):
    ref = str(tmp_path / "ref")
    from_hf(hf_dir, ref, file_size=FILE, show_progress=False)
    out = str(tmp_path / "ck")
    staging = str(tmp_path / ".ck.staging")
    # three "nodes"; node 1 never runs (its job was killed before it started)
    r0 = from_hf(hf_dir, out, file_size=FILE, show_progress=False, rank=0, world_size=3)
    r2 = from_hf(hf_dir, out, file_size=FILE, show_progress=False, rank=2, world_size=3, workers=2)
    assert not r0.run.finalized and not r2.run.finalized and r2.run.missing > 0
    assert not os.path.exists(out) and os.path.isdir(staging)
    # node 0 was killed while writing its last unit: file half written, no marker
    lost = r0.run.ran[-1]
    name = _unit_of(staging, lost)["sizes"]
    os.remove(os.path.join(staging, P.UNITS, f"{lost:06d}.json"))
    for f in name:
        p = os.path.join(staging, P.OUT, f)
        os.truncate(p, os.path.getsize(p) // 2)
    # a different conversion may not reuse this staging dir
    with pytest.raises(LingConfigError, match="belongs to a different conversion"):
        from_hf(hf_dir, out, dtype="fp32", file_size=FILE, show_progress=False, rank=0, world_size=3)
    # rerun of the array: node 0 redoes only the lost unit; node 1 runs and, finishing last, finalizes
    again = from_hf(hf_dir, out, file_size=FILE, show_progress=False, rank=0, world_size=3)
    assert again.run.ran == [lost] and sorted(again.run.skipped + [lost]) == r0.run.ran
    assert not again.run.finalized and again.run.missing > 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    r1 = from_hf(hf_dir, out, file_size=FILE, show_progress=False)
    assert r1.run.finalized and r1.run.missing == 0
    assert sorted(r0.run.ran + r1.run.ran + r2.run.ran) == list(range(len(r1.run.records)))
    assert_identical(ref, out)
    assert leftovers(str(tmp_path)) == []
    # to-hf the same way, ranks from the environment, in reverse order
    ref_hf = str(tmp_path / "ref_hf")
    to_hf(ref, ref_hf, shard_size=SHARD, show_progress=False, rank=0, world_size=1)
    out_hf = str(tmp_path / "hf")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = to_hf(out, out_hf, shard_size=SHARD, show_progress=False)
        assert r.run.finalized == (rank == 0)
    assert_identical(ref_hf, out_hf)
    assert leftovers(str(tmp_path)) == []
    # more ranks than units: a rank with an empty share succeeds and touches nothing, also when it
    # starts after the others have published (a Slurm array task scheduled last)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    before = {p: os.path.getmtime(os.path.join(out_hf, p)) for p in os.listdir(out_hf)}
    idle = to_hf(out, out_hf, shard_size=SHARD, show_progress=False, rank=99, world_size=100)
    assert not idle.run.finalized and idle.run.ran == [] and idle.run.missing is None
    assert "this rank has no units" in P.summary("to-hf", idle.run, 0, 0, 1)
    assert {p: os.path.getmtime(os.path.join(out_hf, p)) for p in os.listdir(out_hf)} == before
    assert leftovers(str(tmp_path)) == []
    # the other ranks of such a plan still refuse an existing output
    with pytest.raises(LingConfigError, match="already exists"):
        to_hf(out, out_hf, shard_size=SHARD, show_progress=False, rank=0, world_size=100)


def test_bad_workers_and_rank_are_one_line_errors(hf_dir, tmp_path, capsys):
    for args in (["--workers", "0"], ["--rank", "2", "--world-size", "2"]):
        rc = cli_main(["from-hf", hf_dir, str(tmp_path / "x"), "--no-progress"] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert os.listdir(tmp_path) == []


def test_pack_files_keeps_to_the_size_and_joins_runs_of_one_item():
    """The one packing rule (to-hf shards, from-hf and ling-merge files): consecutive atoms fill a
    file up to the size, an atom larger than it gets a file alone, and adjacent atoms of one item
    (a run of experts) become one piece."""
    from megatron_ling.convert.common import pack_files

    items = [("embed", [9], False), ("fc1", [3, 3, 3, 3], True), ("norm", [1], False), ("head", [20], False)]
    assert pack_files(items, 7) == [([["embed", 0, 1]], 9), ([["fc1", 0, 2]], 6),
                                    ([["fc1", 2, 4], ["norm", 0, 1]], 7), ([["head", 0, 1]], 20)]
    assert pack_files(items, 100) == [([["embed", 0, 1], ["fc1", 0, 4], ["norm", 0, 1], ["head", 0, 1]], 42)]
    # parts of an item that may not split stay together, whatever the size
    assert pack_files([("qkv", [3, 3, 3], False), ("o", [2], False)], 4) == [([["qkv", 0, 3]], 9), ([["o", 0, 1]], 2)]
    # the Ling-1T from-hf plan: files keep to the default 5 GB (no MoE layer is one 26 GB unit)
    from megatron_ling.convert.from_hf import FromHFJob
    from megatron_ling.convert.hf_io import nbytes

    cfg = get_preset("ling-1t")
    size = {n: nbytes(s, torch.bfloat16) for u in M.units(cfg) for r in M.layer_roles(cfg, u) for n, s in M.hf_names(cfg, u, r)}
    files = FromHFJob._pack(cfg, True, 5 * 1024 ** 3, size)
    per_file = [sum(size[n] for u, r, lo, hi in f for n, _ in M.hf_names(cfg, u, r)[lo:hi]) for f, _ in files]
    assert per_file == [b for _, b in files]  # the planned bytes are the pieces' bytes
    assert len(files) > 300 and max(per_file) <= 5 * 1024 ** 3  # no single Ling-1T tensor is larger
    assert sum(per_file) == sum(size.values())
