"""The supervised controls (sslbench/methods/supervised.py): crops, flips, loss, handover, the protocol's
labelled corpus and the "@task" corpus of supervised-task."""
from __future__ import annotations

import json

import pytest
import torch

from methodkit import check_handover, closes_gap, fixed_batch_logs, tiny_config
from sslbench import recipes
from sslbench.bench import phantom_volumes
from sslbench.cli import main
from sslbench.errors import RecipeError
from sslbench.methods.supervised import Supervised, labelled_crops, random_flips


def labelled(n: int, size, seed: int = 0) -> torch.Tensor:
    """Phantom volumes with a 3-class label derived from their intensities: [n, 2, *size]."""
    img = phantom_volumes(n, size, "cpu", seed=seed)
    lab = (img > 0.45).float() + (img > 0.65).float()
    return torch.cat([img, lab], dim=1)


def test_crops_are_exact_voxels_of_image_and_label():
    x = torch.arange(2 * 2 * 6 * 5 * 4, dtype=torch.float32).view(2, 2, 6, 5, 4)
    x[:, 1] = torch.arange(6).view(1, 6, 1, 1).expand(2, 6, 5, 4).float()       # label = x index
    torch.manual_seed(0)
    img, lab = labelled_crops(x, (4, 5, 4))                   # y and z: the full extent, x: 3 positions
    assert img.shape == (2, 1, 4, 5, 4) and lab.dtype == torch.int64
    for i in range(2):
        start = int(lab[i, 0, 0, 0, 0])
        assert torch.equal(img[i, 0], x[i, 0, start:start + 4])
        assert torch.equal(lab[i, 0], x[i, 1, start:start + 4].long())


def test_flips_move_image_and_label_together():
    img = torch.rand(3, 1, 4, 4, 4)
    lab = (img > 0.5).long()
    same_i, same_l = random_flips(img, lab, 0.0)
    assert torch.equal(same_i, img) and torch.equal(same_l, lab)
    all_i, all_l = random_flips(img, lab, 1.0)
    assert torch.equal(all_i, img.flip(2, 3, 4)) and torch.equal(all_l, lab.flip(2, 3, 4))
    torch.manual_seed(3)
    some_i, some_l = random_flips(img, lab, 0.5)
    assert torch.equal((some_i > 0.5).long(), some_l)          # whichever axes were drawn, the pair agrees


def test_num_classes_is_required_and_the_crop_checked():
    params, model_cfg = tiny_config("supervised")
    with pytest.raises(RecipeError, match="num_classes"):
        Supervised(params, model_cfg)
    with pytest.raises(RecipeError, match=r"method\.params\.crop.*multiples of 32"):
        Supervised({**params, "num_classes": 3, "crop": [48, 32, 32]}, model_cfg)
    with pytest.raises(RecipeError, match="model.name"):
        Supervised({**params, "num_classes": 3}, {**model_cfg, "name": "unetr"})


@pytest.mark.parametrize("family", ["swinunetr", "unet3d"])
def test_loss_falls_on_a_fixed_batch_and_handover(family):
    params, model_cfg = tiny_config("supervised", {"num_classes": 3, "flip_prob": 0.0},
                                    {"name": family})
    torch.manual_seed(0)
    model = Supervised(params, model_cfg)
    vols = labelled(2, model.input_size(params))
    logs = fixed_batch_logs(model, vols, 12, lr=3e-3)
    losses = [e["loss"] for e in logs]
    # DiceCE: floor 0. Closed 0.386 (swinunetr) / 0.321-0.323 (unet3d) under ATEN_CPU_CAPABILITY default and
    # avx2 x 1 and 2 threads (2026-12-02); the bound is about half of that (methodkit.closes_gap)
    assert closes_gap(losses, floor=0.0, fraction=0.15, window=3), losses
    report = check_handover(model, model_cfg, out_channels=5)                     # another head: not handed over
    assert any(k.startswith(("decoder1.", "up_tr64.")) for k in report.matched)
    assert not any(k.startswith(("out.", "out_tr.")) for k in model.backbone_state_dict())


def test_task_corpus_resolves_to_the_fine_tuning_task():
    cfg = recipes.resolve("supervised-task", "phantom-mmwhs", preset="tiny")
    assert cfg["corpus"]["name"] == "phantom-mmwhs" and cfg["task"]["name"] == "phantom-mmwhs"
    with pytest.raises(RecipeError, match="@task"):
        recipes.resolve("supervised-task", None, preset="tiny")
    assert recipes.resolve("supervised-task", None, preset="tiny", corpus="phantom-btcv")["corpus"]["name"] == "phantom-btcv"


def test_an_image_corpus_is_refused_before_any_work(phantom_home, tmp_path, capsys):
    assert main(["pretrain", "--method", "supervised", "--preset", "tiny", "--corpus", "phantom-corpus",
                 "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "phantom-corpus.yaml" in err and "label maps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "pretrain").exists()


def test_run_supervised_task_end_to_end(phantom_home, tmp_path):
    """The trivial control through the CLI: pre-trains on phantom MM-WHS's training split (labels), hands
    encoder + decoder to the fine-tuning of the same task, PHANTOM throughout."""
    assert main(["run", "--method", "supervised-task", "--task", "phantom-mmwhs", "--preset", "tiny",
                 "--out", str(tmp_path), "--set", "method.pretrain.steps=2", "--set", "task.finetune.max_steps=2",
                 "--set", "task.finetune.val_every=2", "--set", "task.finetune.labeled_cases=2",
                 "--set", "task.preprocess.spacing=[6,6,6]"]) == 0     # 6 mm voxels: fewer evaluation windows
    pre = next((tmp_path / "pretrain" / "supervised-task" / "phantom-mmwhs").glob("*/metrics.json"))
    metrics = json.loads(pre.read_text())
    task = recipes.load_task("phantom-mmwhs")
    assert metrics["labelled"] and metrics["phantom"]
    from sslbench.data import layouts
    from sslbench.data.locate import locate_data

    path, _ = locate_data(task, None)
    assert metrics["volumes"] == len(layouts.read_datalist(task, path)["train"])     # the training split only
    state = torch.load(pre.parent / "checkpoints" / "backbone.pt", weights_only=True)
    assert any(k.startswith("decoder1.") for k in state) and not any(k.startswith("out.") for k in state)
    ft = next((tmp_path / "finetune" / "phantom-mmwhs" / "supervised-task").glob("*/metrics.json"))
    result = json.loads(ft.read_text())
    assert result["phantom"] is True and result["method"] == "supervised-task"
    assert result["init"]["load"]["matched"] == len(state)          # encoder + decoder, all loaded
