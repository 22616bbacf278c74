"""End-to-end test of tools/finetune_cls.py on a generated colour-classification ImageFolder."""
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from tools import finetune_cls

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture
def one_thread():
    """The CPU is shared: one thread is faster and steadier for these tiny batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root, per_class=8, size=16):
    gen = torch.Generator().manual_seed(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(-60, 61, (size, size, 3), generator=gen)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i:03d}.png")


def test_split_per_class_is_seeded_and_disjoint():
    targets = [0] * 6 + [1] * 5
    train, test = finetune_cls.split_per_class(targets, 2, seed=3)
    assert len(train) == 4 and len(test) == 7 and not set(train) & set(test)
    assert sorted(train + test) == list(range(11))
    assert (train, test) == finetune_cls.split_per_class(targets, 2, seed=3)
    with pytest.raises(ValueError, match="class 1 has 5 images"):
        finetune_cls.split_per_class(targets, 5, seed=3)


def test_finetune_tool_end_to_end(tmp_path, capsys, one_thread):
    data = tmp_path / "colours"
    make_image_folder(data)
    weights = tmp_path / "resnet18_random.pth"
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), weights)  # the torchvision format users bring
    argv = ["--data", str(data), "--weights", str(weights), "--shots", "4", "--methods", "full", "lora_mode",
            "tune_U_S", "--epochs", "8", "--image-size", "32", "--batch-size", "12", "--lr", "0.01", "--precise-bn",
            "--compress-step", "2", "--workers", "0", "--seed", "1", "--cache-dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "results.json")]
    results = finetune_cls.main(argv)
    table = capsys.readouterr().out
    assert "| full fine-tune |" in table and "| tune_U_S, r_ratio=0.25 |" in table
    for method in ("full", "lora_mode", "tune_U_S"):
        assert results[method][4] > 100 / 3 + 10, (method, results)  # chance is 33.3 %
    assert (tmp_path / "cache" / "resnet18_decomposition.pt").exists()
    again = finetune_cls.main(argv[:argv.index("--methods") + 1] + ["tune_U_S"] + argv[argv.index("--epochs"):])
    assert again["tune_U_S"][4] == results["tune_U_S"][4]  # deterministic with --seed
