"""The GPU path: the singular-value autograd function under CUDA and autocast, one AMP training step of each
few-shot architecture with SVF, test.py on CUDA against the CPU, and device/dtype kept by resolver and merge.

Every test here carries the ``cuda`` marker (``pytest -m cuda`` selects them) and is skipped, with the
reason, on a machine without CUDA. ``sh tools/device_check.sh`` runs them on a GPU machine.

Tolerances are relative errors ``‖a − b‖ / ‖b‖`` against a float64 reference on the same device:
float32 with TF32 off 1e-5; float16 autocast 1e-2; bfloat16 autocast 6e-2 (8 mantissa bits, and the
reference rounds nothing). The test.py comparison turns TF32 off in the subprocess
(``NVIDIA_TF32_OVERRIDE=0``) and allows 0.1 mIoU points: the few pixels whose two logits tie within
float32 rounding may flip.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import svf
from model import build_model
from conftest import random_episode, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)"),
              pytest.mark.filterwarnings("ignore:.*randomly initialised")]

DTYPES = {"float32": (None, 1e-5), "float16": (torch.float16, 1e-2), "bfloat16": (torch.bfloat16, 6e-2)}


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact float32 on the GPU: TF32 (on by default for cuDNN convolutions) rounds inputs to 10 bits."""
    if not CUDA:
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _layers():
    """Layers whose trainable-S path differs: strided/padded/biased conv, grouped conv, reflect padding, Linear."""
    torch.manual_seed(0)
    return {
        "conv3x3": (nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True), (2, 16, 20, 20)),
        "grouped": (nn.Conv2d(16, 24, 3, padding=2, dilation=2, groups=4, bias=False), (2, 16, 12, 12)),
        "reflect": (nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), (2, 8, 10, 10)),
        "linear": (nn.Linear(32, 48), (4, 7, 32)),
    }


def _reference(layer, x):
    """The plain factored form ``U((V ⋆ x) · S) + b`` in float64 with autograd on x and S."""
    V, U = layer._factors()
    V64, U64 = [copy.deepcopy(m).double() for m in (V, U)]
    s = layer.vector_S.detach().double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    y = U64(V64(x) * s)
    return x, s, y


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("kind", ["conv3x3", "grouped", "reflect", "linear"])
def test_singular_value_autograd_on_cuda(kind, dtype_name):
    autocast_dtype, tol = DTYPES[dtype_name]
    plain, shape = _layers()[kind]
    layer = svf.resolver(nn.Sequential(plain.cuda()))[0]
    svf.mark_only_singular_values_as_trainable(layer)
    assert layer.vector_S.requires_grad and not any(
        p.requires_grad for n, p in layer.named_parameters() if "vector_S" not in n)
    torch.manual_seed(1)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        y = layer(x)
    if autocast_dtype is not None:
        assert y.dtype == autocast_dtype  # the fast path computes in the autocast dtype, as nn.Conv2d does
    g = torch.randn(y.shape, device="cuda")
    y.float().backward(g)
    xr, sr, yr = _reference(layer, x)
    yr.backward(g.double())
    assert rel(y, yr) < tol
    assert rel(x.grad, xr.grad) < tol
    assert layer.vector_S.grad.dtype == layer.vector_S.dtype and layer.vector_S.grad.device.type == "cuda"
    assert rel(layer.vector_S.grad, sr.grad) < tol


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_folded_batchnorm_on_cuda(dtype_name):
    """svf.fold_batchnorm on the GPU, under each autocast dtype: output, input and S-gradients as the unfolded
    backbone's (both against the float64 unfolded model), no BatchNorm statistic moved."""
    from model import build_backbone
    autocast_dtype, tol = DTYPES[dtype_name]
    torch.manual_seed(0)
    plain = build_backbone("resnet18_deep", "torchvision")
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2.0)
    ref = svf.apply_paper_freezing(svf.resolver(plain)).cuda().train()
    net = copy.deepcopy(ref)
    assert len(svf.fold_batchnorm(net)) == 23
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 41, 41, device="cuda")
    results = []
    for model, dtype in ((net, autocast_dtype), (copy.deepcopy(ref).double(), None)):
        xi = x.to(torch.float64 if dtype is None and model is not net else torch.float32).requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            y = model(xi)[-1]
        y.float().sum().backward()
        results.append((y, xi.grad, torch.cat([m.vector_S.grad.flatten() for m in model.modules()
                                               if isinstance(m, svf.SVDLayer) and m.vector_S.grad is not None])))
    (y, gx, gs), (yr, gxr, gsr) = results
    assert rel(y, yr) < tol and rel(gx, gxr) < tol and rel(gs, gsr) < tol
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items() if "running" in k)


def test_merged_weight_cache_follows_an_optimizer_step_on_cuda():
    plain, shape = _layers()["conv3x3"]
    layer = svf.resolver(nn.Sequential(plain.cuda()))[0]
    svf.mark_only_singular_values_as_trainable(layer)
    x = torch.randn(shape, device="cuda")
    with torch.no_grad():
        before = layer(x)                                  # one conv with the cached merged weight
        assert rel(before, plain(x)) < 1e-5
    opt = torch.optim.SGD([layer.vector_S], lr=0.5)
    layer(x).square().sum().backward()                   # the trainable-S path
    opt.step()
    with torch.no_grad():
        after = layer(x)
        expected = layer.to_plain()(x)                   # the plain layer with U·diag(S)·Vᵀ of the new S
    assert rel(after, before) > 1e-3, "the step did not change the output: the merged-weight cache is stale"
    assert rel(after, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_resolver_and_merge_keep_device_and_dtype(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).cuda().to(dtype).eval()
    resolved = svf.resolver(net)
    merged = svf.merge(resolved)
    for model in (resolved, merged):
        tensors = list(model.parameters()) + list(model.buffers())
        assert {t.device.type for t in tensors} == {"cuda"}
        assert {t.dtype for t in tensors if t.is_floating_point()} == {dtype}
    assert {type(m) for m in merged.modules()} == {type(m) for m in net.modules()}
    x = torch.randn(2, 3, 6, 6, device="cuda", dtype=dtype)
    with torch.no_grad():
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel(resolved(x), net(x)) < tol and rel(merged(x), net(x)) < tol


def _trainable_backbone_names(model):
    return {n for n, p in model.backbone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["baseline", "pfenet", "bam"])
def test_amp_training_step_with_svf(arch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch=arch, svf=True)).cuda().train()
    tuned = _trainable_backbone_names(model)
    assert tuned and all("vector_S" in n and n.split(".")[0] in ("layer2", "layer3", "layer4") for n in tuned)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    q, s, sm, qm = [t.cuda() for t in random_episode(batch=2, size=41)]
    extra = {"class_id": torch.tensor([6, 7], device="cuda")} if arch == "bam" else {}

    def step(scaler):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            _, loss = model(q, s, sm, qm, **extra)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    # an overflowing scale: the step must be skipped (nothing moves) and the scale lowered
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    overflow = torch.amp.GradScaler("cuda", init_scale=2.0 ** 50)
    step(overflow)
    assert overflow.get_scale() < 2.0 ** 50
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    scaler = torch.amp.GradScaler("cuda")
    step(scaler)
    with_grad = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert with_grad == tuned, "gradients outside the paper's trainable set (layer2-4 vector_S)"
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("vector_S" in n for n in moved) and any(not n.startswith("backbone.") for n in moved)


def _run(args, env):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_test_py_same_miou_on_cuda_and_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore",
           "NVIDIA_TF32_OVERRIDE": "0"}
    data, lists = str(tmp_path / "data"), str(tmp_path / "lists")
    _run(["-m", "dataset.synthetic", "--out", data, "--num-train", "40", "--num-val", "30", "--size", "64"], env)
    _run(["-m", "dataset.make_lists", "pascal", "--data-root", data, "--list-dir", lists,
          "--min-class-pixels", "16", "--workers", "0"], env)
    common = ["test.py", "--config", "config/demo_split0.yaml", "--untrained", f"data_root={data}",
              f"list_dir={lists}", "min_class_pixels=16", "test_size=64", "workers=0", "reduce_dim=16",
              "pretrained=null", "base_learner=null", "test_episodes=20", "test_seeds=[1,2]", "amp=false"]
    results = {}
    for device, visible in (("cpu", ""), ("cuda", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))):
        out_json = str(tmp_path / f"{device}.json")
        _run(common + [f"exp_dir={tmp_path / device}", "--out", out_json],
                   {**env, "CUDA_VISIBLE_DEVICES": visible})
        with open(out_json) as fh:
            results[device] = json.load(fh)
        assert results[device]["device"] == device
    cpu, gpu = results["cpu"], results["cuda"]
    assert [r["episodes"] for r in gpu["per_seed"]] == [r["episodes"] for r in cpu["per_seed"]] == [20, 20]
    assert abs(gpu["miou"] - cpu["miou"]) < 0.1, (gpu["miou"], cpu["miou"])
    assert abs(gpu["fbiou"] - cpu["fbiou"]) < 0.1, (gpu["fbiou"], cpu["fbiou"])
    for c in cpu["class_iou"]:
        assert abs(gpu["class_iou"][c] - cpu["class_iou"][c]) < 0.2, c


# --- adapters across devices, and small updates of S with CUDA's optimizer kernels --------------------------------

@pytest.fixture(scope="module")
def plain_and_tuned():
    """The demo backbone (resnet18_deep, on the CPU) and a copy resolved with the paper's freezing and its S moved
    off the SVD values; tests copy them before changing anything."""
    from model import build_backbone
    torch.manual_seed(0)
    plain = build_backbone("resnet18_deep", "torchvision").eval()
    tuned = svf.apply_paper_freezing(svf.resolver(copy.deepcopy(plain))).eval()
    with torch.no_grad():
        for p in svf.singular_value_parameters(tuned).values():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    return plain, tuned


@pytest.mark.parametrize("into", ["plain", "resolved"])
def test_adapter_saved_on_cpu_loads_on_gpu(into, plain_and_tuned, tmp_path):
    """svf.save_adapter on the CPU, svf.load_adapter on the GPU: into the plain model (resolved there, its SVD on the
    GPU, the base-weight fingerprints checked against GPU tensors) or into a model resolved on the GPU; the singular
    values arrive bit for bit and the GPU model computes what the CPU one does."""
    plain, tuned = plain_and_tuned
    path = str(tmp_path / "s.pt")
    svf.save_adapter(tuned, path)
    target = copy.deepcopy(plain).cuda()
    if into == "resolved":
        target = svf.resolver(target)
    loaded = svf.load_adapter(target, path).eval()
    assert (loaded is target) == (into == "resolved")
    saved, got = svf.singular_value_parameters(tuned), svf.singular_value_parameters(loaded)
    assert set(saved) == set(got) and {p.device.type for p in got.values()} == {"cuda"}
    assert all(torch.equal(saved[k], got[k].cpu()) for k in saved)
    x = torch.randn(2, 3, 41, 41)
    with torch.no_grad():
        assert rel(loaded(x.cuda())[-1].cpu(), tuned(x)[-1]) < 1e-5


def test_adapter_saved_on_gpu_loads_on_cpu_and_refuses_other_weights_there(plain_and_tuned, tmp_path):
    """The other way round, and the fingerprint check still names the layer whose base weights differ."""
    plain, tuned = plain_and_tuned
    path = str(tmp_path / "s.pt")
    on_gpu = copy.deepcopy(tuned).cuda()
    svf.save_adapter(on_gpu, path)
    loaded = svf.load_adapter(copy.deepcopy(plain), path).eval()
    x = torch.randn(2, 3, 41, 41)
    with torch.no_grad():
        assert rel(loaded(x)[-1], on_gpu(x.cuda())[-1].cpu()) < 1e-5
    other = copy.deepcopy(plain).cuda()
    with torch.no_grad():
        other.layer3[0].conv1.weight.add_(1e-3)
    with pytest.raises(ValueError, match="layer3.0.conv1"):
        svf.load_adapter(other, path)


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_keep_small_updates_with_cuda_optimizer_kernels(opt_name, kernel):
    """svf.keep_small_updates under CUDA's multi-tensor (foreach) and fused optimizer kernels: updates of S 1/12 of
    float32's spacing accumulate (plain float32 rounds every one away), as the float64 reference computes them."""
    n, lr = 50, 1.0
    make = {"SGD": lambda ps, **kw: torch.optim.SGD(ps, lr=lr, momentum=0.9, **kw),
            "Adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-8, **kw)}[opt_name]
    finals = {}
    for keep in (False, True):
        torch.manual_seed(0)  # the same layer both times
        layer = svf.resolver(nn.Sequential(nn.Conv2d(8, 8, 3))).cuda()[0]
        s0 = layer.vector_S.detach().clone()
        opt = make([layer.vector_S], **{kernel: True})
        if keep:
            svf.keep_small_updates(opt, layer)
        for _ in range(n):
            layer.vector_S.grad = 1e-9 * s0.abs() if opt_name == "SGD" else torch.ones_like(s0)
            opt.step()
        finals[keep] = layer.vector_S.detach().double()
    ref = s0.double().clone().requires_grad_(True)
    ref_opt = make([ref])
    for _ in range(n):
        ref.grad = (1e-9 * s0.abs() if opt_name == "SGD" else torch.ones_like(s0)).double()
        ref_opt.step()
    if opt_name == "SGD":  # momentum: steps of up to ~5e-8 at |S| ~ 1, below half the spacing at first
        assert torch.equal(finals[False], s0.double())
    moved = (ref.detach() - s0.double()).abs()
    assert ((finals[True] - ref.detach()).abs() <= 0.6 * torch.finfo(torch.float32).eps * s0.double().abs()).all()
    assert (moved > torch.finfo(torch.float32).eps * s0.double().abs()).all()


# --- added by other issues (keep each with its issue number) ---------------------------------------------------
