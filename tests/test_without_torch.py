"""The core works without torch: post-training quantization runs on onnxruntime alone, and a
pipeline with the ``qat`` pass says what to install instead of failing on an import.

torch is installed for the test suite, so these run graphq in a subprocess where importing
torch (and onnx2torch) raises ImportError, as on a machine with the core install only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

BLOCK = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx2torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, _NoTorch())
from graphq import cli
code = cli.main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def _graphq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_ptq_runs_without_torch(tmp_path):
    proc = _graphq("run", str(DIGITS / "int8.toml"), str(DIGITS / "digits_cnn.onnx"),
                   "-o", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "digits_cnn.deploy.onnx").stat().st_size > 0


def test_qat_without_torch_names_the_install(tmp_path):
    listing = _graphq("passes")
    assert listing.returncode == 0 and "qat" in listing.stdout
    proc = _graphq("run", str(DIGITS / "qat.toml"), str(DIGITS / "digits_cnn.onnx"),
                   "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install torch==2.13.0" in proc.stderr
    assert "onnx2torch" in proc.stderr
    assert "calibrate" not in proc.stderr  # refused when the pipeline is read
    assert not (tmp_path / "out").exists()
