"""Every recipe in examples/ validates (ling-train --check, mock data) at the size its header names."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from megatron_ling.models.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


def header_size(path: str) -> int:
    m = re.search(r"^# size: (\d+) nodes x (\d+) GPUs$", open(path).read(), re.M)
    assert m, f"{path}: header needs a '# size: N nodes x G GPUs' line"
    return int(m.group(1)) * int(m.group(2))


def test_every_example_is_tested():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_validates_at_its_named_size(path, tmp_path):
    world = header_size(path)
    # cluster paths of the example replaced by local ones: mock data, the same model's config.json
    hf = tmp_path / "hf"
    hf.mkdir()
    get_preset("ling-mini-2.0").save_hf_config(str(hf / "config.json"))
    (tmp_path / "resume").mkdir()
    text = open(path).read()
    if re.search(r"^  format: chat", text, re.M):  # chat data cannot be mocked: a small real chat prefix
        from megatron_ling.data.chat import preprocess_chat
        from tests.support import sft as S

        tok = S.make_chat_tokenizer(str(tmp_path / "tok"))
        S.write_conversations(str(tmp_path / "chats.jsonl"), 8, seed=0)
        prefix = preprocess_chat([str(tmp_path / "chats.jsonl")], str(tmp_path / "chats"), tok, 256,
                                 progress=False).prefix
        over = [f"run_dir={tmp_path / 'run'}", f"data.paths=[{prefix}]", f"data.tokenizer={tok}"]
    else:
        over = [f"run_dir={tmp_path / 'run'}", "data.mock=true", "data.paths=null", "data.tokenizer=null"]
    if "hf_config:" in text:
        over.append(f"model.hf_config={hf}")
    if re.search(r"^  resume: /", text, re.M):
        over.append(f"checkpoint.resume={tmp_path / 'resume'}")
    r = subprocess.run([sys.executable, "-m", "megatron_ling.training.cli", "--config", path, "--check",
                        "--nproc-per-node", str(world), *over], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"recipe OK for world size {world}" in r.stdout
