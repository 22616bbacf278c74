"""The adapter convention shared by svf and lrcc: a file that carries its options and a fingerprint of the
base weights, loading without repeated options, refusals that name the layer, the deprecated names, and
each of the two packages working when its folder is copied alone."""
import ast
import filecmp
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lrcc
import svf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """3x3, 1x1, grouped and linear layers, one block to exclude, and an attention layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.side = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.side(self.block(self.stem(x)))
        tokens = x.flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def svd_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, svf.SVDLayer))


def perturb(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------------------------ svf

@pytest.mark.parametrize("options", [
    {},
    {"global_low_rank_ratio": 0.5, "customized_layers_low_rank_ratio": {"stem": 1.0, "attn": 0.75},
     "excluded_layers": ["side"], "skip_1x1": True},
    {"skip_3x3": True, "excluded_layers": ["head"]},
])
def test_svf_adapter_carries_its_resolver_options(options, tmp_path):
    tuned = svf.resolver(make_net(), **options)
    perturb(svf.singular_value_parameters(tuned).values())
    path = str(tmp_path / "s.pt")
    svf.save_adapter(tuned, path)
    assert not [p for p in tmp_path.iterdir() if p.name != "s.pt"]  # atomic: no temp file left
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == "svf-adapter" and saved["fingerprint_scheme"] == "sha256-float64/1"
    # the saved options rebuild exactly the same SVD layers with the same ranks
    rebuilt = svf.resolver(make_net(), **saved["resolver_options"])
    assert svd_names(rebuilt) == svd_names(tuned)
    assert {k: p.shape for k, p in svf.singular_value_parameters(rebuilt).items()} == \
        {k: p.shape for k, p in svf.singular_value_parameters(tuned).items()}
    x = torch.randn(2, 3, 6, 6)
    restored = svf.load_adapter(make_net(), path)  # the plain pretrained model: no option repeated
    into_resolved = svf.load_adapter(rebuilt, path)  # a resolved copy: loaded in place
    assert into_resolved is rebuilt
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x)) and torch.equal(into_resolved(x), tuned(x))


def test_svf_resolver_options_read_back_the_call():
    tuned = svf.resolver(make_net(), global_low_rank_ratio=0.5, customized_layers_low_rank_ratio={"stem": 1.0},
                         excluded_layers=["side"], skip_1x1=True)
    assert svf.resolver_options(tuned) == {
        "global_low_rank_ratio": 0.5, "skip_1x1": True, "skip_3x3": False, "excluded_layers": ["side"],
        "customized_layers_low_rank_ratio": {"stem": 1.0}}
    pieces = make_net()  # resolved in pieces: what is left plain is named by its widest subtree
    pieces.block = svf.resolver(pieces.block)
    assert svf.resolver_options(pieces) == {
        "global_low_rank_ratio": 1.0, "skip_1x1": False, "skip_3x3": False,
        "excluded_layers": ["attn", "head", "side", "stem"], "customized_layers_low_rank_ratio": {}}


def test_svf_refuses_changed_base_weights_naming_the_layer(tmp_path, monkeypatch):
    import svf.adapter
    path = str(tmp_path / "s.pt")
    svf.save_adapter(svf.resolver(make_net()), path)
    other = make_net()
    with torch.no_grad():
        other.block[2].weight[0, 0, 0, 0] += 1e-6  # one value of one layer
    with monkeypatch.context() as m:  # a plain model with other weights is refused before any SVD runs
        m.setattr(svf.adapter, "resolver", lambda *a, **k: pytest.fail("resolved a model with other weights"))
        with pytest.raises(ValueError, match=r"layer 'block\.2': the pretrained weight differs .*\(1 of 8 layers"):
            svf.load_adapter(other, path)
    with pytest.raises(ValueError, match=r"layer 'block\.2'"):
        svf.load_adapter(svf.resolver(other), path)
    attention = make_net()
    with torch.no_grad():
        attention.attn.in_proj_weight[5, 3] += 1e-6  # a projection that is a bare Parameter of the plain model
    with pytest.raises(ValueError, match=r"layer 'attn\.in_proj'"):
        svf.load_adapter(attention, path)
    assert isinstance(svf.load_adapter(other, path, check_fingerprint=False), Net)  # the user's explicit choice


def test_fingerprint_is_the_same_for_the_same_values_in_any_dtype():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3).bfloat16()
    fp = svf.weight_fingerprint(w, None)
    assert fp == svf.weight_fingerprint(w.float(), None) == svf.weight_fingerprint(w.double(), None)
    assert fp == lrcc.weight_fingerprint(w, None)  # one scheme for both packages
    assert fp != svf.weight_fingerprint(w.reshape(8, 36), None)  # the shape counts
    assert fp != svf.weight_fingerprint(w, torch.zeros(8))  # the bias counts
    changed = w.clone()
    changed[3, 2, 1, 0] = torch.nextafter(changed[3, 2, 1, 0], torch.tensor(9.0, dtype=torch.bfloat16))  # 1 ulp
    assert not torch.equal(changed, w)
    assert svf.weight_fingerprint(changed, None) != fp
    # singular values tuned on float32 weights load into the same model resolved in float64
    tuned = svf.resolver(make_net())
    perturb(svf.singular_value_parameters(tuned).values())
    restored = svf.load_state_dict(svf.resolver(make_net().double()), svf.state_dict(tuned))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(restored(x.double()).float(), tuned(x), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_svf_adapter_from_cpu_loads_into_a_model_resolved_on_gpu(tmp_path):
    tuned = svf.resolver(make_net())
    perturb(svf.singular_value_parameters(tuned).values())
    path = str(tmp_path / "s.pt")
    svf.save_adapter(tuned, path)
    on_gpu = svf.load_adapter(make_net().cuda(), path)  # resolved on the GPU (its SVD runs there)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(on_gpu(x.cuda()).cpu(), tuned(x), atol=1e-4)


def test_svf_old_format_is_refused_with_what_to_do(tmp_path):
    tuned = svf.resolver(make_net())
    old = {"format": "svf.singular_values/1",
           "singular_values": svf.state_dict(tuned)["singular_values"], "fingerprints": {}}
    path = str(tmp_path / "old.pt")
    torch.save(old, path)
    with pytest.raises(ValueError, match="older svf.*check_fingerprint=False"):
        svf.load_adapter(svf.resolver(make_net()), path)
    perturb(svf.singular_value_parameters(tuned).values())
    old["singular_values"] = svf.state_dict(tuned)["singular_values"]
    torch.save(old, path)
    restored = svf.load_adapter(svf.resolver(make_net()), path, check_fingerprint=False)
    assert all(torch.equal(a, b) for a, b in zip(svf.singular_value_parameters(restored).values(),
                                                 svf.singular_value_parameters(tuned).values()))
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a svf-adapter file"):
        svf.load_adapter(make_net(), path)


# ------------------------------------------------------------------------------------------------ lrcc

def convert(net, mode, **kw):
    return lrcc.model_convert_conv(net, mode, compress_step=3, verbose=False, ignore_op_name=["side"], **kw)


def tune(model):
    perturb([p for n, p in model.named_parameters() if p.requires_grad and ("lora" in n or "sparse" in n)])


@pytest.mark.parametrize("mode", ["tune_U_S", "lora_mode"])
def test_lrcc_adapter_carries_its_options(mode, tmp_path):
    kw = {"lora_alpha": 4} if mode == "lora_mode" else {"lambda_s": 0.05}
    tuned = convert(make_net(), mode, r=2, **kw)
    tune(tuned)
    path = str(tmp_path / "a.pt")
    lrcc.save_adapter(tuned, path)
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 2 and saved["fingerprint_scheme"] == "sha256-float64/1"
    assert {k: saved["options"][k] for k in ("mode", "r", "ignore_op_name")} == \
        {"mode": mode, "r": 2, "ignore_op_name": ["side"]}
    restored = lrcc.load_adapter(make_net(), path, merge=False)  # the plain pretrained model: no option repeated
    layers = {n: (m.mode, m.rank, m.scaling) for n, m in restored.named_modules() if isinstance(m, lrcc.LowRankConv2d)}
    assert layers == {n: (m.mode, m.rank, m.scaling) for n, m in tuned.named_modules()
                      if isinstance(m, lrcc.LowRankConv2d)}
    assert restored.stem.convert_options == saved["options"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x))
    resaved = str(tmp_path / "b.pt")  # what was loaded saves the same adapter again
    lrcc.save_adapter(restored, resaved)
    again = torch.load(resaved, weights_only=True)
    assert again["options"] == saved["options"] and again["layers"] == saved["layers"]
    assert all(torch.equal(again["state"][k], v) for k, v in saved["state"].items())


def test_lrcc_refuses_changed_base_weights_naming_the_layer(tmp_path):
    path = str(tmp_path / "a.pt")
    lrcc.save_adapter(convert(make_net(), "lora_mode"), path)
    other = make_net()
    with torch.no_grad():
        other.block[0].weight[1, 1, 1, 1] += 1e-6
    with pytest.raises(ValueError, match=r"layer 'block\.0': the pretrained weight differs .*\(1 of 3 layers"):
        lrcc.load_adapter(other, path)
    with pytest.raises(ValueError, match=r"layer 'block\.0'"):
        lrcc.load_adapter(convert(other, "lora_mode"), path)


def test_lrcc_version_1_files_still_load(tmp_path):
    from lrcc.adapter import _raw_sha256
    tuned = convert(make_net(), "tune_U_S")
    tune(tuned)
    v1 = lrcc.state_dict(tuned)
    modules = dict(tuned.named_modules())
    v1 = {"format": "lrcc-adapter", "version": 1, "state": v1["state"],
          "layers": {n: {**{k: v for k, v in o.items() if k != "base_fingerprint"},
                         "base_sha256": _raw_sha256(modules[n].weight)} for n, o in v1["layers"].items()}}
    path = str(tmp_path / "v1.pt")
    torch.save(v1, path)
    restored = lrcc.load_lora_state_dict(convert(make_net(), "tune_U_S"), path)  # the old name still works
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x))
    other = make_net(seed=4)
    with pytest.raises(ValueError, match="pretrained weight differs"):
        lrcc.load_adapter(other, path)


def test_deprecated_path_alias_still_caches_with_a_warning(tmp_path):
    cache = str(tmp_path / "dna.pt")
    with pytest.warns(DeprecationWarning, match="cache_path"):
        old = convert(make_net(), "tune_U_S", path=cache)
    assert os.path.exists(cache)
    new = convert(make_net(), "tune_U_S", cache_path=cache)
    assert torch.equal(old.stem.lora_B, new.stem.lora_B)
    with pytest.raises(TypeError, match="both cache_path and"), pytest.warns(DeprecationWarning):
        convert(make_net(), "tune_U_S", cache_path=cache, path=cache)


def test_svf_lrcc_is_a_deprecated_alias_of_lrcc():
    sys.modules.pop("svf.lrcc", None)  # a fresh import, as old user code does it
    if "lrcc" in vars(svf):
        delattr(svf, "lrcc")
    with pytest.warns(DeprecationWarning, match="import lrcc"):
        from svf import lrcc as old
    assert old is lrcc


# ------------------------------------------------------------------------------------------------ folders

def test_the_shared_module_is_the_same_file_in_both_packages():
    assert filecmp.cmp(os.path.join(REPO, "svf", "common.py"), os.path.join(REPO, "lrcc", "common.py"), shallow=False)


def _imports(folder):
    roots = set()
    for name in os.listdir(folder):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(folder, name)).read())):
                if isinstance(node, ast.Import):
                    roots |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots.add(node.module.split(".")[0])
    return roots


NET = "def net():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))\n"
ALONE = {
    "svf": ("m = svf.resolver(net(), skip_1x1=True)\n"
            "svf.save_adapter(m, 'a.pt')\n"
            "assert svf.resolver_options(svf.load_adapter(net(), 'a.pt'))['skip_1x1']\n"
            "try:\n    from svf import lrcc\nexcept ImportError as e:\n    print('no lrcc:', e)\n"),
    "lrcc": ("m = lrcc.model_convert_conv(net(), 'tune_all', r=2, compress_step=2, cache_path='c.pt', verbose=False)\n"
             "lrcc.save_adapter(m, 'a.pt')\n"
             "assert isinstance(lrcc.load_adapter(net(), 'a.pt', merge=False)[0], lrcc.LowRankConv2d)\n"
             "print('ok')\n"),
}


@pytest.mark.parametrize("package", ["svf", "lrcc"])
def test_each_package_works_copied_alone(package, tmp_path):
    """A temp folder holding only a copy of one package: it imports torch and the stdlib alone, the other
    package cannot be found, and the adapter round trip runs."""
    shutil.copytree(os.path.join(REPO, package), tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert _imports(tmp_path / package) <= {"torch"} | set(sys.stdlib_module_names)
    other = {"svf": "lrcc", "lrcc": "svf"}[package]
    code = (f"import sys, importlib.util\nsys.path.insert(0, sys.argv[1])\nimport torch, {package}\n"
            f"assert {package}.__file__.startswith(sys.argv[1]), {package}.__file__\n"
            f"assert importlib.util.find_spec('{other}') is None and '{other}' not in sys.modules\n"
            + NET + ALONE[package])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if package == "svf":
        assert "no lrcc: svf.lrcc: the lrcc package is not importable" in out.stdout
    else:
        assert out.stdout.strip() == "ok"
