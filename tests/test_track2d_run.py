"""Every 2D method through `sslbench run` on phantom ChestX-ray14 (tiny), and Table 4's measured PHANTOM column."""
import json

import pytest

from sslbench.report.published import load_published
from sslbench.report.runs import collect_runs
from sslbench.report.tables import build_tables
from sslbench.cli import main
from sslbench.data import layouts, phantoms
from sslbench import recipes
from sslbench.methods import REGISTRY_2D

TABLE4_ORDER = ["scratch", "mg", "transvw", "c2l", "simsiam", "pcrlv1", "pcrlv2", "voco"]


@pytest.mark.slow
def test_every_2d_method_pretrains_finetunes_and_fills_table4(phantom_home, tmp_path, capsys):
    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    runs = tmp_path / "runs"
    fast = ["--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=2",
            "--set", "task.finetune.val_every=2", "--set", "task.finetune.checkpoint_every=2",
            "--set", "task.finetune.batch_size=4"]
    pre = ["--set", "method.pretrain.steps=2", "--set", "method.pretrain.checkpoint_every=2",
           "--set", "method.pretrain.log_every=1", "--set", "method.pretrain.batch_size=4"]
    methods = ["scratch", *sorted(REGISTRY_2D)]
    for m in methods:
        assert main(["run", "--method", m, "--task", "phantom-chestxray14", "--root", str(root), "--out", str(runs),
                     *fast, *([] if m == "scratch" else pre)]) == 0, m
    capsys.readouterr()
    pretrain_split = layouts.load_datalist(recipes.load_task("phantom-chestxray14"), root).splits["pretrain"]
    for m in methods:
        ft = json.loads(next((runs / "finetune" / "phantom-chestxray14" / m).glob("*/metrics.json")).read_text())
        assert ft["metric"] == "auc" and ft["phantom"] is True
        recipe = (next((runs / "finetune" / "phantom-chestxray14" / m).glob("*/recipe.yaml"))).read_text()
        assert "name: unet2d" in recipe
        if m == "scratch":
            assert not (runs / "pretrain" / m).exists()
            continue
        pt = json.loads(next((runs / "pretrain" / m / "phantom-chestxray14").glob("*/metrics.json")).read_text())
        assert pt["volumes"] == len(pretrain_split) and pt["steps"] == 2 and pt["phantom"] is True
        assert len(pt["history"]) == 2 and all(h["loss"] == h["loss"] for h in pt["history"])   # finite
        load = ft["init"]["load"]
        assert ft["init"]["corpus"] == "phantom-chestxray14" and load["matched"] > 100 and load["missing"] == 0
    # the same command again reuses the finished pre-training and fine-tuning (same records, same keys)
    assert main(["run", "--method", "c2l", "--task", "phantom-chestxray14", "--root", str(root), "--out", str(runs),
                 *fast, *pre]) == 0
    assert "already finished" in capsys.readouterr().out
    assert len(list((runs / "pretrain" / "c2l" / "phantom-chestxray14").iterdir())) == 1

    df = collect_runs(runs)
    t4 = {t.id: t for t in build_tables(load_published(), df)}["table4"]
    assert [r.id for r in t4.rows] == TABLE4_ORDER
    assert t4.headers == ["NIH ChestX-ray", "NIH ChestX-ray (phantom)"]
    for m in TABLE4_ORDER:
        real, ph = t4.cell(m, "chestxray14"), t4.cell(m, "chestxray14@phantom")
        assert not real.groups and real.published is not None            # published only beside the real dataset
        if m in methods:
            assert ph.text().startswith("PHANTOM") and "(n=1)" in ph.text() and ph.published is None, m
        else:
            assert not ph.groups, m


@pytest.mark.slow
def test_killed_2d_pretraining_resumes_to_the_same_losses(phantom_home, tmp_path):
    """C2L (queue, pointer and key encoder in the checkpoint) killed after step 3 resumes from step 2 and ends
    with the losses of an uninterrupted run."""
    import os
    import subprocess
    import sys

    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    args = ["--set", "task.preprocess.size=[32,32]", "--set", "task.finetune.max_steps=2",
            "--set", "task.finetune.val_every=2", "--set", "task.finetune.batch_size=4",
            "--set", "method.pretrain.steps=4", "--set", "method.pretrain.checkpoint_every=2",
            "--set", "method.pretrain.log_every=1", "--set", "method.pretrain.batch_size=4"]

    def cli(out, kill=None, *extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", **({"SSLBENCH_KILL_AFTER_STEP": kill} if kill else {}))
        return subprocess.run([sys.executable, "-m", "sslbench", "run", "--method", "c2l", "--task",
                               "phantom-chestxray14", "--root", str(root), "--out", str(out), *args, *extra],
                              env=env, capture_output=True, text=True)

    assert cli(tmp_path / "a").returncode == 0
    assert cli(tmp_path / "b", "3").returncode == -9                       # killed in pre-training step 4
    resumed = cli(tmp_path / "b", None, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 2/4" in resumed.stdout
    read = lambda d: json.loads(next((d / "pretrain" / "c2l" / "phantom-chestxray14").glob("*/metrics.json"))
                                .read_text())  # noqa: E731
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], abs=1e-4)
    assert a["run_key"] == b["run_key"]


def test_a_2d_pretraining_alone_builds_the_unet2d_that_run_reuses(phantom_home, tmp_path, capsys):
    """`sslbench pretrain --corpus phantom-chestxray14` (no --task) takes the corpus task's model (PCRL's ResNet-18
    U-Net), so the pre-training it writes is the one `sslbench run --task phantom-chestxray14` then reuses."""
    root = phantoms.synth("chestxray14", tmp_path / "cx", cases=24, seed=0)
    runs = tmp_path / "runs"
    pre = ["--set", "method.pretrain.steps=2", "--set", "method.pretrain.checkpoint_every=2",
           "--set", "method.pretrain.batch_size=4"]
    assert recipes.resolve("simsiam", corpus="phantom-chestxray14")["model"]["name"] == "unet2d"
    assert main(["pretrain", "--method", "simsiam", "--corpus", "phantom-chestxray14", "--root", str(root),
                 "--out", str(runs), *pre]) == 0
    [alone] = list((runs / "pretrain" / "simsiam" / "phantom-chestxray14").iterdir())
    capsys.readouterr()
    assert main(["run", "--method", "simsiam", "--task", "phantom-chestxray14", "--root", str(root), "--out", str(runs),
                 "--set", "task.finetune.max_steps=2", "--set", "task.finetune.val_every=2", *pre]) == 0
    assert "pre-training already finished" in capsys.readouterr().out
    assert list((runs / "pretrain" / "simsiam" / "phantom-chestxray14").iterdir()) == [alone]
    ft = json.loads(next((runs / "finetune" / "phantom-chestxray14" / "simsiam").glob("*/metrics.json")).read_text())
    assert ft["init"]["load"]["missing"] == 0
    assert 0 <= ft["data_wait"] < 1          # the 2D fine-tuning records its data wait, as every loop does
