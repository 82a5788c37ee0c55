"""Task kinds are chosen from the table sslbench.tasks.KINDS and asked what differs (issue 21): no module of the
protocol or the CLI layer compares a task's kind with a kind's name, and a kind registered in the table is the one the
protocol and the CLI ask."""
import ast
from pathlib import Path

import pytest
import torch

from sslbench import recipes, tasks
from sslbench.errors import CheckpointError, RecipeError

PACKAGE = Path(__file__).resolve().parent.parent / "sslbench"


def _kind_names(node: ast.AST, names) -> list[str]:
    """The kind names a compared operand spells: a string constant, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in names else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for e in node.elts for n in _kind_names(e, names)]
    return []


def string_tests_of_kinds(source: str, names) -> list[tuple[int, str]]:
    """(line, kind name) of every comparison (==, !=, in, not in, ...) with a registered kind's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, n) for n in _kind_names(operand, names)]
    return found


def _modules():
    """The protocol package and the layer above it (cli, sweep, bench, predict, submit, demo)."""
    for folder in ("protocol", "sweep"):
        yield from sorted((PACKAGE / folder).rglob("*.py"))
    for name in ("cli", "bench", "predict", "submit", "demo"):
        yield PACKAGE / f"{name}.py"


def test_no_protocol_or_cli_module_compares_the_task_kind_with_a_kind_name():
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} compares with {name!r}"
           for path in _modules() for line, name in string_tests_of_kinds(path.read_text(), tasks.KINDS)]
    assert not bad, "ask sslbench.tasks.kind_of(...) instead:\n" + "\n".join(bad)


def test_the_scan_finds_planted_string_tests():
    planted = ('if task["kind"] == "segmentation":\n    pass\n'
               'x = task.get("kind") in ("classification", "classification2d")\n'
               'y = "corpus" != kind\n'          # not a registered kind: a recipe of no kind
               'z = family == "encoder"\n')
    assert string_tests_of_kinds(planted, tasks.KINDS) == [(1, "segmentation"), (3, "classification"),
                                                           (3, "classification2d")]


class FakeKind(tasks.TaskKind):
    """A kind registered only in this test: it records what the protocol and the CLI ask it."""

    asked: list = []
    two_d = True
    loaders = ("memory",)

    @classmethod
    def check_cases(cls, run_cfg, task, items, force):
        cls.asked.append(("check_cases", task["name"], len(items), force))

    @classmethod
    def step_input(cls, task):
        cls.asked.append(("step_input", task["name"]))
        return 1234, "encoder"

    @classmethod
    def print_results(cls, metrics, console):
        cls.asked.append(("print_results", metrics["metric"]))

    @classmethod
    def refuse_init(cls, task, state, source):
        cls.asked.append(("refuse_init", source))
        raise CheckpointError(f"{source}: refused by the fake kind")


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(tasks.KINDS, "fake", FakeKind)
    FakeKind.asked = []
    cfg = recipes.resolve("scratch", "phantom-mmwhs", preset="tiny")
    cfg["task"] = {**cfg["task"], "kind": "fake", "name": "faketask"}
    return cfg


def test_a_kind_registered_in_the_table_is_what_the_protocol_and_the_cli_ask(fake):
    from rich.console import Console

    from sslbench import cli, protocol
    from sslbench.protocol import feasibility, plan, track2d

    cfg = fake
    protocol.check_run_cases(cfg, "finetune", [{"id": "a"}, {"id": "b"}], force=True)
    est = feasibility.estimate_finetune(cfg, feasibility.Machine("cpu", 0, 8 * 2**30, 2), train_cases=4)
    assert est.voxels == 1234 and est.family == "encoder"
    assert track2d.is_2d(cfg["task"]) is True                            # the kind's two_d, not its name
    with pytest.raises(RecipeError, match="'finetune.loader': stream"):   # the kind lists no stream loader
        plan.check_finetune_loader({**cfg, "task": {**cfg["task"], "finetune": {**cfg["task"]["finetune"],
                                                                               "loader": "stream"}}})
    with pytest.raises(CheckpointError, match="refused by the fake kind"):   # a 3D pre-training of a 2D kind
        plan.refuse_pretraining_for_2d({**cfg, "method": {"name": "voco", "pretrain": {}}, "corpus": {"kind": "corpus"}})

    class Record:
        def read_recipe(self):
            return cfg

    cli._results_table(Record(), {"metric": "fake-metric"}, Console(record=True))
    assert FakeKind.asked == [("check_cases", "faketask", 2, True), ("step_input", "faketask"),
                              ("refuse_init", "method 'voco'"), ("print_results", "fake-metric")]


def test_the_2d_classification_is_a_kind_of_its_own():
    from sslbench.tasks.classification import Classification, Classification2D

    assert tasks.KINDS["classification2d"] is Classification2D and issubclass(Classification2D, Classification)
    assert Classification2D.two_d and not Classification.two_d and Classification2D.multilabel
    Classification.refuse_init({"name": "ccccii"}, None, "m")            # 3D: every backbone may initialise it
    with pytest.raises(CheckpointError, match="3D pre-trained backbone cannot initialise the 2D encoder"):
        Classification2D.refuse_init({"name": "cxr"}, {"w": torch.zeros(1, 1, 1, 1, 1)}, "m")
    Classification2D.refuse_init({"name": "cxr"}, {"w": torch.zeros(1, 1, 1, 1)}, "m")   # a 2D backbone: fine


def test_the_loss_builders_build_what_finetune_loss_names():
    from sslbench.tasks import segmentation
    from sslbench.tasks.classification import Classification, Classification2D

    seg = recipes.resolve("scratch", "phantom-mmwhs", preset="tiny")["task"]
    assert type(segmentation.make_loss(seg)).__name__ == "DiceCELoss"
    with pytest.raises(RecipeError, match="'finetune.loss': 'ce'; expected 'dicece'"):
        segmentation.make_loss({**seg, "finetune": {**seg["finetune"], "loss": "ce"}})
    cxr = recipes.resolve("scratch", "phantom-chestxray14", preset="tiny")
    kind = Classification2D(cxr, None, print)
    assert isinstance(kind.make_loss(), torch.nn.BCEWithLogitsLoss)
    ct = recipes.resolve("scratch", "phantom-ccccii", preset="tiny")
    assert isinstance(Classification(ct, None, print).make_loss(), torch.nn.CrossEntropyLoss)
    wrong = {**ct, "task": {**ct["task"], "finetune": {**ct["task"]["finetune"], "loss": "bce"}}}
    with pytest.raises(RecipeError, match="'finetune.loss': 'bce'; expected 'ce'"):
        Classification(wrong, None, print).make_loss()
