"""The ``qat`` pass under ``torchrun``: two CPU processes, gloo, DistributedDataParallel.

Each rank runs the same pipeline (PTQ, then ``qat``) on the shipped digits data; the pass
joins the process group, shards the batches by rank and trains with DDP. Every rank must end
with the same weights, scales and zero points, both must have taken half the steps, and only
rank 0 writes the output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.qat import require_bridge

require_bridge()

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"

SCRIPT = '''
import json, os, sys
import numpy as np
import onnx
from graphq.pipeline import PassManager

out = sys.argv[1]
toml = """
[pipeline]
verify = "off"
[data]
batch_size = 16
[[passes]]
name = "canonicalize"
[[passes]]
name = "fold-bn"
[[passes]]
name = "insert-qdq"
[[passes]]
name = "calibrate"
method = "minmax"
[[passes]]
name = "qat"
epochs = 2
lr = 1e-4
device = "cpu"
batch_norm = BATCH_NORM
"""
toml = toml.replace("BATCH_NORM", sys.argv[4])
result = PassManager.from_text(toml).run(sys.argv[2], os.path.join(out, "files"),
                                         data=sys.argv[3])
rank = int(os.environ["RANK"])
arrays = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result.report["qat"], f)
'''


@pytest.mark.parametrize("batch_norm", ["false", "true"])
def test_two_cpu_processes_train_identically(tmp_path, batch_norm):
    """With batch_norm, each rank's running statistics differ until the end of training;
    rank 0's are broadcast before write-back, so the folded weights agree too."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(script), str(tmp_path), str(DIGITS / "digits_cnn.onnx"),
           str(DIGITS / "calib.npz"), batch_norm]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in reports)
    assert [r.get("batch_norms", 0) for r in reports] == [4 * (batch_norm == "true")] * 2
    # 256 samples in batches of 16: 16 batches, 8 per rank per epoch, 2 epochs
    assert [r["steps"] for r in reports] == [16, 16]
    assert reports[0]["epoch_loss"] != reports[1]["epoch_loss"]  # each saw its own shard
    a, b = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert np.array_equal(a[name], b[name]), name
    scales = [n for n in a.files if n.endswith("_scale")]
    assert scales
    files = {p.name for p in (tmp_path / "files").iterdir()}
    assert "report.json" in files  # written once, by rank 0
