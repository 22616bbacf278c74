"""Shared fixtures: one tiny synthetic PASCAL-layout dataset and its lists, for the end-to-end tests."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """(data_root, list_dir) of 96 train / 40 val synthetic images of 48 px, lists at min_class_pixels=16.
    Tests read them; a test that changes files works on a copy."""
    tmp = tmp_path_factory.mktemp("tiny_voc")
    data, lists = str(tmp / "data"), str(tmp / "lists")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "dataset.synthetic", "--out", data, "--num-train", "96",
                    "--num-val", "40", "--size", "48"], cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dataset.make_lists", "pascal", "--data-root", data, "--list-dir", lists,
                    "--min-class-pixels", "16", "--workers", "0"], cwd=ROOT, env=env, check=True, capture_output=True)
    return data, lists
