"""`sslbench run --method M` for every baseline: pre-train (1 step, tiny preset) -> fine-tune -> evaluate through
the one shared protocol, with the method's weights loaded by the fine-tuning model (matched tensors recorded)."""
import json

import pytest

from sslbench.cli import main

FAST = ["--set", "method.pretrain.steps=1", "--set", "method.pretrain.log_every=1",
        "--set", "task.finetune.max_steps=2", "--set", "task.finetune.roi=[64,32,32]",
        "--set", "task.finetune.num_samples=1", "--set", "task.finetune.val_every=0",
        "--set", "task.evaluate.overlap=0.0", "--set", "task.finetune.warmup_steps=1",
        "--set", "task.preprocess.spacing=[6,6,6]"]   # 6 mm voxels: the final evaluation is a few windows


@pytest.mark.parametrize("method", ["mg", "transvw", "simsiam", "pcrlv1", "pcrlv2", "mae", "swinunetr-ssl"])
def test_run_pretrains_then_finetunes_from_the_method_weights(method, phantom_home, tmp_path, capsys):
    assert main(["run", "--method", method, "--task", "phantom-btcv", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "PHANTOM" in out
    pre = json.loads(next((tmp_path / "pretrain" / method).rglob("metrics.json")).read_text())
    assert pre["method"] == method and pre["steps"] == 1
    fin = json.loads(next((tmp_path / "finetune" / "phantom-btcv" / method).rglob("metrics.json")).read_text())
    load = fin["init"]["load"]
    assert fin["init"]["source"] == "pretrain" and load["matched"] > 0 and load["unexpected"] == 0
    assert 0.0 <= fin["mean_dice"] <= 1.0
