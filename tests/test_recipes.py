"""Recipe loading, presets, overrides and validation errors (one line naming file, key, expectation)."""
import pytest
import yaml

from sslbench import recipes
from sslbench.errors import RecipeError


def test_every_recipe_validates():
    for name in recipes.list_recipes("methods"):
        m = recipes.load_method(name)
        assert m["name"] == name and m["status"] in recipes.STATUSES
    for name in recipes.list_recipes("benchmarks"):
        t = recipes.load_task(name)
        assert t["name"] == name
    assert {"voco", "scratch", "mg", "transvw", "simsiam", "pcrlv1", "pcrlv2", "mae", "swinunetr-ssl"} <= set(
        recipes.list_recipes("methods"))
    assert {"btcv", "msd-spleen", "mmwhs", "lits", "brats21", "ccccii", "chestxray14", "flare23", "amos22"} <= set(
        recipes.list_recipes("benchmarks"))


def test_presets_and_overrides_resolve():
    cfg = recipes.resolve("scratch", "phantom-btcv")
    assert cfg["run"]["preset"] == "tiny"           # phantom tasks default to the CPU preset
    assert cfg["model"]["feature_size"] == 12
    assert cfg["task"]["finetune"]["roi"] == [64, 64, 32]
    assert cfg["task"]["classes"][6] == "liver"     # inherited from btcv through 'extends'
    paper = recipes.resolve("scratch", "btcv", preset="paper")
    assert paper["model"]["feature_size"] == 48 and paper["task"]["finetune"]["roi"] == [96, 96, 96]
    assert paper["task"]["finetune"]["epochs"] == 3000 and paper["task"]["finetune"]["lr"] == 3e-4
    cfg = recipes.resolve("voco", "phantom-mmwhs", overrides=["method.params.lambda=0.5", "task.finetune.lr=1e-3",
                                                                "task.finetune.roi=32"])
    assert cfg["method"]["params"]["lambda"] == 0.5
    assert cfg["task"]["finetune"]["lr"] == pytest.approx(1e-3)          # YAML reads 1e-3 as a string: coerced
    assert cfg["task"]["finetune"]["roi"] == [32, 32, 32]
    assert cfg["corpus"]["name"] == "phantom-corpus"                      # a pre-training method gets its corpus
    assert cfg["task"]["data"]["label_map"][205] == 1


def test_protocol_hash_tracks_protocol_not_paths():
    a = recipes.resolve("scratch", "phantom-btcv")
    b = recipes.resolve("scratch", "phantom-btcv", overrides=["run.out=/elsewhere", "run.device=cpu",
                                                               "run.attention=sdpa"])   # same function
    c = recipes.resolve("scratch", "phantom-btcv", overrides=["task.finetune.lr=0.5"])
    assert recipes.protocol_hash(a) == recipes.protocol_hash(b)
    assert recipes.protocol_hash(a) != recipes.protocol_hash(c)


@pytest.mark.parametrize("override, needle", [
    ("task.finetune.lrr=1", "unknown key 'task.finetune.lrr' (did you mean 'lr'?)"),
    ("method.params.lamda=1", "did you mean 'lambda'?"),
    ("task.finetune.lr=abc", "key 'task.finetune.lr': expected float"),
    ("model.feature_size=1.5", "key 'model.feature_size': expected int"),
    ("run.precision=fp8", "expected one of 'auto', 'fp32', 'bf16'"),
    ("run.attention=flash", "expected one of 'fused', 'sdpa', 'monai'"),
    ("nosuch=1", "unknown key 'nosuch'"),
    ("task.finetune.lr", "expected KEY=VALUE"),
])
def test_override_errors_name_the_key(override, needle):
    with pytest.raises(RecipeError) as err:
        recipes.resolve("voco", "phantom-btcv", overrides=[override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_unknown_names_suggest():
    with pytest.raises(RecipeError, match=r"unknown method 'vocoo' \(did you mean 'voco'\?\)"):
        recipes.resolve("vocoo", "btcv")
    with pytest.raises(RecipeError, match=r"unknown task 'mmwsh' \(did you mean 'mmwhs'\?\)"):
        recipes.resolve("scratch", "mmwsh")
    with pytest.raises(RecipeError, match="--preset"):
        recipes.resolve("scratch", "btcv", preset="huge")


def _write_task(tmp_path, monkeypatch, text: str, name: str = "mytask"):
    bench = tmp_path / "benchmarks"
    bench.mkdir(exist_ok=True)
    for src in recipes.recipe_dir("benchmarks").glob("*.yaml"):
        (bench / src.name).write_text(src.read_text())
    (bench / f"{name}.yaml").write_text(text)
    real = recipes.recipe_dir
    monkeypatch.setattr(recipes, "recipe_dir", lambda kind: bench if kind == "benchmarks" else real(kind))
    return bench / f"{name}.yaml"


def test_bad_recipe_files_name_file_and_key(tmp_path, monkeypatch):
    base = yaml.safe_load((recipes.recipe_dir("benchmarks") / "btcv.yaml").read_text())
    base["name"] = "mytask"
    bad = dict(base, finetune=dict(base["finetune"], epochz=3))
    path = _write_task(tmp_path, monkeypatch, yaml.safe_dump(bad))
    with pytest.raises(RecipeError) as err:
        recipes.load_task("mytask")
    assert str(path) in str(err.value) and "unknown key 'finetune.epochz' (did you mean 'epochs'?)" in str(err.value)

    bad = dict(base, preprocess=dict(base["preprocess"], spacing=[1.5, 1.5]))
    _write_task(tmp_path, monkeypatch, yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="key 'preprocess.spacing': expected 3 values"):
        recipes.load_task("mytask")

    bad = dict(base, kind="segmentaton")
    _write_task(tmp_path, monkeypatch, yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="did you mean 'segmentation'"):
        recipes.load_task("mytask")

    bad = dict(base, presets={"tiny": {"finetune.roii": [32, 32, 32]}})
    path = _write_task(tmp_path, monkeypatch, yaml.safe_dump(bad))
    with pytest.raises(RecipeError) as err:
        recipes.resolve("scratch", "mytask", preset="tiny")
    assert "preset 'tiny'" in str(err.value) and "did you mean 'roi'" in str(err.value)

    _write_task(tmp_path, monkeypatch, "name: mytask\n  bad: [indent\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipes.load_task("mytask")


def test_recipes_resolve_from_an_installed_wheel(tmp_path):
    """Build the wheel, unpack it alone (no repository folders beside it) and find every recipe kind."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(recipes.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(repo),
                          "-w", str(tmp_path / "whl")], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp_path / "whl").glob("*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sslbench.recipes as r; assert 'site' in r.__file__; "
            "print(len(r.list_recipes('methods')), len(r.list_recipes('benchmarks')), "
            "len(r.list_recipes('leaderboards')), r.load_task('phantom-btcv')['classes'][6])")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    n_methods, n_tasks, n_boards, liver = res.stdout.split()
    assert int(n_methods) >= 9 and int(n_tasks) >= 20 and int(n_boards) >= 1 and liver == "liver"


def test_pretrain_sampler_is_hashed_only_when_it_is_epoch():
    """method.pretrain.sampler at its default (step, the draw of every run before the key) leaves the protocol hash
    as it was; epoch is another protocol; a bad value is one line naming the key."""
    def cfg(*overrides):
        return recipes.split_config(recipes.resolve("voco", None, overrides=list(overrides)), "corpus")

    base = cfg()
    assert base["method"]["pretrain"]["sampler"] == "step"
    without = {**base, "method": {**base["method"], "pretrain": {
        k: v for k, v in base["method"]["pretrain"].items() if k != "sampler"}}}
    assert recipes.protocol_hash(base) == recipes.protocol_hash(without) == \
        recipes.protocol_hash(cfg("method.pretrain.sampler=step"))
    assert recipes.protocol_hash(cfg("method.pretrain.sampler=epoch")) != recipes.protocol_hash(base)
    with pytest.raises(RecipeError) as err:
        cfg("method.pretrain.sampler=epochs")
    assert "method.pretrain.sampler" in str(err.value) and "'step', 'epoch'" in str(err.value)


@pytest.mark.parametrize("spec, value, says", [
    (recipes.S(str, nonempty=True), "  ", "expected a non-empty string, got '  '"),
    (recipes.S(float, finite=True), float("inf"), "expected a finite number, got inf"),
    (recipes.S(float, finite=True), "1.5", "expected a finite number, got '1.5'"),
    (recipes.S(int, minimum=1), 0, "expected an integer >= 1, got 0"),
    (recipes.S(float, minimum=0, maximum=100), 100.5, "expected a number in 0-100, got 100.5"),
    (recipes.S(float, minimum=0), float("nan"), "expected a number >= 0, got nan"),
    (recipes.Spec(items=recipes.STR, nonempty=True), [], "expected a non-empty list of a string, got []"),
    (recipes.Spec(free=True, values=recipes.S(str, nonempty=True)), {"a": "x", "b": ""},
     "key 'k.b': expected a non-empty string, got ''"),
    (recipes.S(str, expect="a run key (quoted)"), 12, "expected a run key (quoted), got 12"),
])
def test_spec_value_rules_give_one_line_naming_the_key(spec, value, says):
    with pytest.raises(RecipeError) as err:
        recipes.check(value, spec, "f.yaml", "k")
    assert str(err.value).startswith("f.yaml: key 'k") and says in str(err.value) and "\n" not in str(err.value)


def test_spec_value_rules_accept_what_fits_and_default_specs_stay_lenient():
    for spec, value in [(recipes.S(str, nonempty=True), "x"), (recipes.S(float, finite=True), 3),
                        (recipes.S(int, minimum=1), 1), (recipes.S(float, minimum=0, maximum=100), 100),
                        (recipes.Spec(items=recipes.STR, nonempty=True), ["a"]),
                        (recipes.Spec(free=True, values=recipes.INT), {"a": 1}),
                        (recipes.NUM, float("nan")), (recipes.STR, ""), (recipes.Spec(items=recipes.STR), [])]:
        recipes.check(value, spec, "f.yaml", "k")     # raises nothing
    assert recipes.S(bool).describe() == "true/false" and recipes.S(int, minimum=0).describe() == "an integer >= 0"
