"""The pre-training optimiser's recipe keys (sslbench/protocol.py: param_groups, pretrain_optimizer):
``method.pretrain.no_decay_bias_norm`` (no weight decay on biases and 1-D normalisation weights, the rule of
the official MAE's timm ``add_weight_decay``) and ``method.pretrain.amsgrad`` (the official VoCo AdamW's);
their validation, defaults, protocol hash, and that ``protocol.pretrain`` builds its optimiser from them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sslbench import protocol, recipes
from sslbench.errors import RecipeError

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """A Linear, a LayerNorm, a BatchNorm, a [1, 1, D] token (decays under MAE's rule) and a frozen tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.bn = nn.BatchNorm1d(3)
        self.token = nn.Parameter(torch.zeros(1, 1, 3))
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_exempt_biases_and_norm_weights():
    model = Tiny()
    no_dec, dec = protocol.param_groups(model, 0.05, no_decay_bias_norm=True)
    assert no_dec["weight_decay"] == 0.0 and dec["weight_decay"] == 0.05
    assert names(model, no_dec) == {"fc.bias", "ln.weight", "ln.bias", "bn.weight", "bn.bias"}
    assert names(model, dec) == {"fc.weight", "token"}                   # frozen: in no group
    (every,) = protocol.param_groups(model, 0.05, no_decay_bias_norm=False)   # the earlier behaviour
    assert every["weight_decay"] == 0.05
    assert names(model, every) == {n for n, p in model.named_parameters() if p.requires_grad}
    # a module without 1-D tensors or biases: no empty group
    assert len(protocol.param_groups(nn.Linear(3, 3, bias=False), 0.1, True)) == 1


def test_no_decay_tensors_do_not_shrink():
    """lr 0.1, decay 0.5, zero gradients: AdamW's step is the decay alone, p <- (1 - lr wd) p on decayed tensors."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(1.0, 2.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = protocol.make_optimizer(protocol.param_groups(model, 0.5, True), 0.1, 0.5, CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for n, p in model.named_parameters():
        want = before[n] * 0.95 if n in ("fc.weight", "token") else before[n]
        torch.testing.assert_close(p.detach(), want, msg=n)


def test_keys_off_is_the_earlier_optimizer():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    old = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1, foreach=True)
    new = protocol.pretrain_optimizer(b, {"lr": 1e-2, "weight_decay": 0.1}, CPU)    # a recipe without the keys
    assert len(new.param_groups) == 1 and not new.param_groups[0]["amsgrad"]
    x = torch.randn(5, 4)
    for _ in range(3):
        for model, opt in ((a, old), (b, new)):
            opt.zero_grad()
            model.bn(model.ln(model.fc(x))).square().sum().add(model.token.sum()).backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_pretrain_optimizer_reads_the_recipe_keys():
    model = Tiny()
    opt = protocol.pretrain_optimizer(model, {"lr": 1e-3, "weight_decay": 0.05, "amsgrad": True,
                                              "no_decay_bias_norm": True}, CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert all(g["amsgrad"] for g in opt.param_groups) and all(g["lr"] == 1e-3 for g in opt.param_groups)
    model.fc(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert "max_exp_avg_sq" in opt.state[model.fc.weight]              # AMSGrad's running maximum


def test_recipe_defaults_validation_and_hash():
    for name in recipes.list_recipes("methods"):
        pt = recipes.load_method(name).get("pretrain")
        if pt is not None:   # off everywhere but MAE, whose recipe follows the official MAE's groups
            assert pt["amsgrad"] is False and pt["no_decay_bias_norm"] is (name == "mae"), name
    for bad in ("method.pretrain.amsgrad=maybe", "method.pretrain.no_decay_bias_norm=2"):
        with pytest.raises(RecipeError) as err:
            recipes.resolve("voco", overrides=[bad])
        msg = str(err.value)
        assert f"key '{bad.split('=')[0]}'" in msg and "\n" not in msg
    data = {"name": "x", "title": "x", "source": "x", "status": "available",
            "pretrain": {"corpus": "c", "amsgrad": "yes"}}
    with pytest.raises(RecipeError, match=r"methods/x\.yaml: key 'pretrain\.amsgrad': expected true/false, got 'yes'"):
        recipes.check(data, recipes.METHOD_SCHEMA, "methods/x.yaml", "")

    def without_keys(cfg):      # a recipe recorded before the keys existed
        cfg = recipes.split_config(cfg, "corpus")
        for k in ("amsgrad", "no_decay_bias_norm"):
            del cfg["method"]["pretrain"][k]
        return cfg

    voco = recipes.resolve("voco")
    h = recipes.protocol_hash(recipes.split_config(voco, "corpus"))
    assert h == recipes.protocol_hash(without_keys(voco))                 # off: the earlier runs' hash
    assert h != recipes.protocol_hash(recipes.split_config(
        recipes.resolve("voco", overrides=["method.pretrain.amsgrad=true"]), "corpus"))
    mae = recipes.resolve("mae")
    mae_off = recipes.resolve("mae", overrides=["method.pretrain.no_decay_bias_norm=false"])
    assert recipes.protocol_hash(without_keys(mae)) == recipes.protocol_hash(recipes.split_config(mae_off, "corpus"))
    assert recipes.protocol_hash(recipes.split_config(mae, "corpus")) != recipes.protocol_hash(without_keys(mae))


def test_pretrain_builds_its_optimizer_from_the_recipe(phantom_home, tmp_path, monkeypatch):
    """protocol.pretrain goes through pretrain_optimizer with the run's pretrain section; stopped right after."""
    class Built(Exception):
        pass

    seen = {}
    real = protocol.pretrain_optimizer

    def spy(method, pt, device):
        seen.update(method=method, opt=real(method, pt, device))
        raise Built

    monkeypatch.setattr(protocol.pretraining, "pretrain_optimizer", spy)   # where the pre-training looks it up
    cfg = recipes.resolve("mae", preset="tiny", overrides=["method.pretrain.amsgrad=true", f"run.out={tmp_path}",
                                                          "corpus.data.phantom_cases=2"])
    with pytest.raises(Built):
        protocol.pretrain(recipes.split_config(cfg, "corpus"))
    opt, method = seen["opt"], seen["method"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, cfg["method"]["pretrain"]["weight_decay"]]
    assert all(g["amsgrad"] for g in opt.param_groups)
    no_dec = {id(p) for p in opt.param_groups[0]["params"]}
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert (id(p) in no_dec) == (p.ndim == 1 or n.endswith(".bias")), n


def test_betas_key_reaches_adamw_and_keeps_earlier_hashes():
    model = torch.nn.Linear(3, 2)
    opt = protocol.pretrain_optimizer(model, {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95]},
                                      torch.device("cpu"))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert protocol.pretrain_optimizer(model, {"lr": 1e-3, "weight_decay": 0.0},
                                       torch.device("cpu")).param_groups[0]["betas"] == (0.9, 0.999)
    assert recipes.resolve("mae")["method"]["pretrain"]["betas"] == [0.9, 0.95]       # the official MAE's
    voco = recipes.resolve("voco")
    assert voco["method"]["pretrain"]["betas"] == [0.9, 0.999]
    old = recipes.split_config(voco, "corpus")
    del old["method"]["pretrain"]["betas"]                                          # recorded before the key
    assert recipes.protocol_hash(old) == recipes.protocol_hash(recipes.split_config(voco, "corpus"))
    other = recipes.resolve("voco", overrides=["method.pretrain.betas=[0.9,0.95]"])
    assert recipes.protocol_hash(recipes.split_config(other, "corpus")) != recipes.protocol_hash(old)
    with pytest.raises(RecipeError, match=r"methods/voco\.yaml: key 'pretrain\.betas': expected two numbers in \[0, 1\)"):
        recipes.resolve("voco", overrides=["method.pretrain.betas=[0.9,1.5]"])


class WithPredictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.predictor = nn.Linear(3, 3)


def test_sgd_step_schedule_and_fixed_predictor_lr_hand_computed():
    model = WithPredictor()
    pt = {"lr": 0.1, "weight_decay": 0.01, "warmup_steps": 0, "optimizer": "sgd", "momentum": 0.9,
          "schedule": "step", "step_every": 2, "step_gamma": 0.5, "fixed_lr": ["predictor"]}
    opt = protocol.pretrain_optimizer(model, pt, CPU)
    assert isinstance(opt, torch.optim.SGD) and [names(model, g) for g in opt.param_groups] == [
        {"encoder.weight", "encoder.bias"}, {"predictor.weight", "predictor.bias"}]
    assert [bool(g.get("fixed_lr")) for g in opt.param_groups] == [False, True]
    sched = protocol.pretrain_schedule(opt, pt, total=10)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # StepLR: 0.1 x 0.5 ** (step // 2) for the scheduled group; the predictor stays at 0.1 (--fix-pred-lr)
    flat = [lr for pair in lrs for lr in pair]
    assert flat == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.1, 0.05, 0.1, 0.025, 0.1, 0.025, 0.1])
    # one SGD step by hand: v = g + wd w (coupled L2), w <- w - lr v (momentum buffer starts at v)
    w0 = torch.tensor([[1.0, 2.0, 3.0]])
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    sgd = protocol.pretrain_optimizer(lin, {**pt, "fixed_lr": []}, CPU)
    lin(torch.ones(1, 3)).sum().backward()                 # gradient = [1, 1, 1]
    sgd.step()
    assert torch.allclose(lin.weight, w0 - 0.1 * (1.0 + 0.01 * w0))


def test_fixed_lr_with_warmup_cosine_follows_monai_for_the_other_groups():
    from monai.optimizers import WarmupCosineSchedule

    model = WithPredictor()
    pt = {"lr": 1.0, "weight_decay": 0.0, "warmup_steps": 2, "fixed_lr": ["predictor"]}
    opt = protocol.pretrain_optimizer(model, pt, CPU)
    assert isinstance(opt, torch.optim.AdamW)
    sched = protocol.pretrain_schedule(opt, pt, total=8)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = WarmupCosineSchedule(ref_opt, warmup_steps=2, t_total=8)
    for _ in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == 1.0
        opt.step(); sched.step(); ref_opt.step(); ref.step()
    plain = protocol.pretrain_optimizer(model, {**pt, "fixed_lr": []}, CPU)
    assert isinstance(protocol.pretrain_schedule(plain, {**pt, "fixed_lr": []}, 8), WarmupCosineSchedule)
    with pytest.raises(RecipeError, match=r"method\.pretrain\.fixed_lr: 'projector' names no parameters.*encoder, predictor"):
        protocol.pretrain_optimizer(model, {**pt, "fixed_lr": ["projector"]}, CPU)


def test_optimizer_keys_validate_and_keep_earlier_hashes():
    voco = recipes.resolve("voco")
    pt = voco["method"]["pretrain"]
    assert (pt["optimizer"], pt["schedule"], pt["fixed_lr"]) == ("adamw", "warmup_cosine", [])
    old = recipes.split_config(voco, "corpus")
    for k in ("optimizer", "momentum", "schedule", "step_every", "step_gamma", "fixed_lr"):
        del old["method"]["pretrain"][k]                                        # recorded before the keys
    assert recipes.protocol_hash(old) == recipes.protocol_hash(recipes.split_config(voco, "corpus"))
    sgd = recipes.resolve("simsiam", overrides=["method.pretrain.optimizer=sgd", "method.pretrain.fixed_lr=[predictor]"])
    assert recipes.protocol_hash(recipes.split_config(sgd, "corpus")) != recipes.protocol_hash(
        recipes.split_config(recipes.resolve("simsiam"), "corpus"))
    with pytest.raises(RecipeError, match=r"key 'method\.pretrain\.optimizer': expected one of 'adamw', 'sgd', got 'lamb'"):
        recipes.resolve("voco", overrides=["method.pretrain.optimizer=lamb"])
    with pytest.raises(RecipeError, match=r"key 'pretrain\.step_every': expected the steps between lr drops"):
        recipes.resolve("mg", overrides=["method.pretrain.schedule=step"])
