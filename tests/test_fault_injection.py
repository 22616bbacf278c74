"""Fault injection: kill -9 and SIGTERM at several points of a 2-process gloo run under torchrun, each
followed by `--resume`; the final weights must equal those of an uninterrupted run, bit for bit.

The faults come from the trainer itself at exact points (engine/faults.py: the environment variable
FSS_TEST_FAULT=WHERE:EPOCH:ITERATION:SIGNAL[:RANK]), never from a guessed delay, so the test is
deterministic. One chain of runs covers every case (each run resumes what the previous one left):

  fault (signal, where, rank)                       expected
  1 SIGTERM during step 3 of epoch 1, both ranks    the step finishes, last.pth = epoch 0 + 3 steps
  2 kill -9 of rank 1 during step 6 of epoch 1      nothing saved by the dead rank; the run dies
  3 SIGTERM before validation of epoch 1, rank 0    last.pth = end of epoch 1's steps, not validated
  4 SIGTERM during the write of best.pth            the write completes, then last.pth is saved
  5 kill -9 of rank 1 before validation, epoch 2    last.pth of epoch 1 stays
  6 kill -9 during the write of last.pth, epoch 2   the old last.pth stays; an orphan temporary,
                                                    removed by the next start
  7 --resume without fault                          finishes; weights == uninterrupted run

Before the chain, a second training into the folder while another process holds its lock (engine/runlock.py):
only rank 0 takes the lock, and both ranks stop at once (no rank waits for the other), with one message.
"""
import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
ENV.pop("FSS_TEST_FAULT", None)


@pytest.fixture(scope="module")
def args(tmp_path_factory, tiny_voc):
    tmp = tmp_path_factory.mktemp("faults")
    data, lists = tiny_voc
    # 2 processes x 4 episodes per step: 7 steps per epoch, 2 epochs, no SVD (fast start)
    return tmp, ["--config", "config/demo_split0.yaml", f"data_root={data}", f"list_dir={lists}",
                 "min_class_pixels=16", "train_size=32", "test_size=40", "workers=0", "reduce_dim=8", "svf=false",
                 "pretrained=null", "base_learner=null", "epochs=2", "batch_size=8", "base_lr=0.01",
                 "val_episodes=4", "checkpoint_select=best", "val_every=1"]


def torchrun(args, exp, fault=None, resume=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "train.py", *args, f"exp_dir={exp}"] + (["--resume"] if resume else [])
    env = {**ENV, "FSS_TEST_FAULT": fault} if fault else ENV
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def progress(exp):
    ckpt = torch.load(os.path.join(exp, "last.pth"), weights_only=True)
    return ckpt["epoch"], ckpt["iteration"]


def assert_same_model(a, b):
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_kill_and_sigterm_at_every_point_then_resume_equals_uninterrupted(args):
    tmp, base = args
    reference = str(tmp / "uninterrupted")
    out = torchrun(base, reference, resume=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-8000:]  # the ranks' errors come before torchrun's report

    exp = str(tmp / "faulted")
    log = []

    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom engine.runlock import exp_dir_lock\n"
                               "with exp_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n",
                               exp], cwd=ROOT, env=ENV, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    out = torchrun(base, exp, resume=False)
    holder.stdin.close()
    holder.wait(timeout=60)
    assert out.returncode != 0 and out.stderr.count("is in use by another training") == 1, out.stderr[-4000:]
    assert f"pid {holder.pid} on host" in out.stderr and not os.path.exists(os.path.join(exp, "last.pth"))

    def faulted(fault, resume=True):
        out = torchrun(base, exp, fault, resume)
        log.append((fault, out.returncode))
        assert out.returncode != 0, f"{fault}: the fault did not stop the run\n{out.stdout[-2000:]}"
        assert "Traceback" not in out.stdout
        return out

    out = faulted("step:0:2:SIGTERM", resume=False)
    assert "interrupted: saved" in out.stdout and progress(exp) == (0, 3)
    faulted("step:0:5:SIGKILL:1")
    assert progress(exp)[0] == 0 and progress(exp)[1] >= 3
    out = faulted("validation:0:7:SIGTERM:0")
    assert "interrupted: saved" in out.stdout and progress(exp) == (0, 7)
    out = faulted("best.pth:1:0:SIGTERM")
    assert "interrupted: saved" in out.stdout and progress(exp) == (0, 7)
    assert torch.load(os.path.join(exp, "best.pth"), weights_only=True)["epoch"] == 1
    faulted("validation:1:7:SIGKILL:1")
    assert progress(exp) in ((1, 0), (1, 7))
    faulted("last.pth:2:0:SIGKILL")
    assert progress(exp)[0] == 1
    orphans = glob.glob(os.path.join(exp, ".last.pth.*"))
    assert len(orphans) == 1                                         # what kill -9 during a write leaves

    out = torchrun(base, exp)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-8000:]  # the ranks' errors come before torchrun's report
    assert f"removed {orphans[0]}" in out.stdout
    assert glob.glob(os.path.join(exp, ".*")) == []
    assert progress(exp) == (2, 0)
    assert_same_model(os.path.join(exp, "last.pth"), os.path.join(reference, "last.pth"))
    assert_same_model(os.path.join(exp, "best.pth"), os.path.join(reference, "best.pth"))
