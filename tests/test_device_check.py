"""tools/device_check.sh on a machine without CUDA: one clear line and a non-zero exit, nothing run or written."""
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_device_check_refuses_without_cuda(tmp_path):
    out = subprocess.run(["sh", "tools/device_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(tmp_path / "out")})
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.count("\n") == 1
    assert "needs a CUDA GPU" in out.stderr and "GPU machine" in out.stderr
    assert not (tmp_path / "out").exists()
