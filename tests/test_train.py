"""Tests of mbe_helpers.train: determinism, probes, divergence, the vmapped ensemble."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from mbe_helpers.errors import MBEInputError
from mbe_helpers.train import (TrainRun, build_model, choose_group_size, divergence_limit,
                               resolve_config, train, train_ensemble, train_run)
from mbe_helpers.data import load_dataset

SMALL = {"width": 16, "depth": 2, "epochs": 6, "n_train": 200, "probe_epochs": [0, 3, 6]}


pytestmark = pytest.mark.usefixtures("one_thread")


def weight_norm(model: torch.nn.Module, batch) -> float:
    """A float metric."""
    return float(sum(p.detach().norm() ** 2 for p in model.parameters()))


def logit_stats(model: torch.nn.Module, batch) -> dict:
    """A dict metric that needs gradients (as the FIM family does)."""
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {"grad_norm": torch.sqrt(sum((g ** 2).sum() for g in grads)),
            "logit_mean": model(x).mean(), "note": "ok"}


def numbers(record: dict) -> dict:
    """The numeric content of a record, without wall time."""
    return {k: v for k, v in record.items() if k not in ("seconds", "engine")}


def assert_records_close(a: dict, b: dict, rtol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, float) and isinstance(y, float):
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rtol,
                                                                     abs_tol=1e-12), key
        else:
            assert x == y, key


def test_same_seed_same_numbers_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    config = {**SMALL, "batch_size": 50, "dropout": 0.2, "seed": 3}
    first, second = train_run(config), train_run(config)
    assert numbers(first) == numbers(second)
    assert numbers(first) != numbers(train_run({**config, "seed": 4}))
    assert torch.equal(state, torch.random.get_rng_state())


def test_record_has_probe_columns_and_final_test_accuracy():
    run = TrainRun(probes=[weight_norm, logit_stats])
    record = run({**SMALL, "optimizer": "sgd", "lr": 0.1})
    for epoch in (0, 3, 6):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm",
                    "grad_norm", "logit_mean"):
            assert math.isfinite(record[f"{key}@{epoch}"])
    assert record["status"] == "ok" and record["diverged_epoch"] is None
    assert 0.0 <= record["test_acc"] <= 1.0 and record["engine"] == "sequential"
    assert record["val_loss@6"] == pytest.approx(record["val_loss"], rel=1e-6)
    assert record["weight_norm@6"] != record["weight_norm@0"] and record["note@3"] == "ok"


def test_default_probe_epochs_follow_the_study():
    assert resolve_config({"epochs": 50})["probe_epochs"] == (5, 10, 20, 50)
    assert resolve_config({"epochs": 12})["probe_epochs"] == (5, 10, 12)
    assert resolve_config({"epochs": 30, "probe_epochs": "1, 2"})["probe_epochs"] == (1, 2)
    assert resolve_config({"width": 64.0, "n_train": float("nan")})["width"] == 64


def test_diverging_run_is_recorded_not_raised():
    record = train_run({**SMALL, "optimizer": "sgd", "lr": 1e30, "momentum": 0.0})
    assert record["status"] == "diverged" and record["diverged_epoch"] in (1, 2, 3)
    assert math.isnan(record["test_acc"]) and math.isnan(record["val_loss@6"])
    assert math.isfinite(record["val_loss@0"])


def test_nan_parameters_diverge_at_the_first_probe():
    data = load_dataset("digits", n_train=100)
    model = build_model(SMALL, data)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    record = train(model, data, epochs=3, probe_epochs=[0, 3])
    assert (record["status"], record["diverged_epoch"]) == ("diverged", 0)
    assert math.isnan(record["val_loss@0"]) and math.isnan(record["train_loss@3"])


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
def test_ensemble_equals_sequential_training_in_float64(optimizer):
    configs = [{**SMALL, "dtype": "float64", "optimizer": optimizer, "lr": lr,
                "weight_decay": wd, "momentum": mom, "seed": seed, "label_noise": noise,
                "batch_size": batch, "activation": activation}
               for batch, activation in ((None, "tanh"), (64, "relu"))
               for lr, wd, mom, seed, noise in [(0.05, 0.0, 0.9, 0, 0.0), (0.01, 1e-3, 0.5, 1, 0.2),
                                                (0.002, 1e-2, 0.0, 2, 0.1)]]
    sequential = TrainRun(probes=[weight_norm], ensemble=False)
    stacked = TrainRun(probes=[weight_norm], ensemble=True)
    for group in (configs[:3], configs[3:]):
        expected = [sequential(c) for c in group]
        got = stacked.run_many(group)
        assert [r["engine"] for r in got] == ["ensemble:3"] * 3
        for a, b in zip(expected, got):
            assert_records_close(numbers(a), numbers(b))


def test_ensemble_isolates_a_diverging_member():
    configs = [{**SMALL, "dtype": "float64", "optimizer": "sgd", "momentum": 0.0, "lr": lr,
                "seed": 5} for lr in (0.1, 1e30, 0.05)]
    got = TrainRun(ensemble=True).run_many(configs)
    assert [r["status"] for r in got] == ["ok", "diverged", "ok"]
    for config, record in zip(configs, got):
        assert_records_close(numbers(train_run(config)), numbers(record))


def test_train_ensemble_leaves_the_given_models_untouched():
    data = load_dataset("digits", n_train=100, dtype=torch.float64)
    models = [build_model({**SMALL, "seed": s, "dtype": "float64"}, data) for s in range(2)]
    before = [p.clone() for p in models[0].parameters()]
    train_ensemble(models, [data, data], lr=[0.01, 0.02], weight_decay=[0, 0], seeds=[0, 1],
                   epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))
    with pytest.raises(MBEInputError, match="one dataset, lr"):
        train_ensemble(models, [data], lr=[0.01], weight_decay=[0], seeds=[0])


def test_group_size_choice_is_consistent_with_its_measurements():
    data = load_dataset("digits", n_train=200)
    model = build_model(SMALL, data)
    group, costs = choose_group_size(model, data, max_group=4, repeats=2)
    assert set(costs) <= {1, 2, 4} and 1 in costs and 2 in costs
    if group == 1:
        assert min(v for k, v in costs.items() if k > 1) >= 0.8 * costs[1]
    else:
        assert costs[group] == min(v for k, v in costs.items() if k > 1)
        assert costs[group] < 0.8 * costs[1]


def test_small_groups_skip_measuring_and_train_sequentially():
    configs = [{**SMALL, "seed": s} for s in range(3)]
    assert {r["engine"] for r in TrainRun().run_many(configs)} == {"sequential"}
    assert TrainRun().group_key({**SMALL, "dropout": 0.1}) is None
    assert TrainRun().group_key({**SMALL, "model": "resmlp"}) is None
    assert TrainRun().group_key({**SMALL, "seed": 1}) == TrainRun().group_key({**SMALL, "lr": 1.0})


@pytest.mark.parametrize("model", ["resmlp", "cnn", "vit"])
def test_other_models_train(model):
    record = train_run({**SMALL, "model": model, "epochs": 2, "probe_epochs": [2],
                        "activation": "gelu"})
    assert record["status"] == "ok" and math.isfinite(record["val_loss@2"])


def test_run_function_pickles_without_its_measurement_cache():
    run = TrainRun(probes={"wn": weight_norm}, ensemble=False)
    run._group_sizes["x"] = 4
    clone = pickle.loads(pickle.dumps(run))
    assert clone._group_sizes == {} and list(clone.probes) == ["wn"]
    record = clone({**SMALL, "epochs": 1, "probe_epochs": [1]})
    assert "wn@1" in record


@pytest.mark.parametrize("config, fragment", [
    ({"widht": 3}, r"unknown config keys \['widht'\]"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"lr": 0.0}, "'lr' must be positive"),
    ({"width": 2.5}, "'width' must be an integer"),
    ({"epochs": 5, "probe_epochs": [10]}, "must lie between 0 and epochs=5"),
    ({"lr": "fast"}, r"config key 'lr' must be a finite number \(e.g. 0.001\), got 'fast'"),
    ({"lr": float("inf")}, "config key 'lr' must be a finite number"),
    ({"momentum": [0.9]}, "config key 'momentum' must be a finite number"),
    ({"width": "wide"}, "config key 'width' must be an integer, got 'wide'"),
    ({"probe_epochs": "1, x"}, "config key 'probe_epochs' must be an integer, got 'x'"),
    ({"activation": "swish"}, "unknown activation 'swish'; choose one of tanh, relu, gelu"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of digits"),
    ({"device": "tpu"}, r"unknown device 'tpu'; use 'cpu', 'cuda' \(or 'cuda:N'\) or 'mps'"),
])
def test_bad_configs_fail_with_one_sentence(config, fragment):
    with pytest.raises(MBEInputError, match=fragment):
        train_run(config)


def test_image_models_need_an_image_dataset():
    vectors = dataclasses.replace(load_dataset("digits", n_train=50), image_shape=None,
                                  name="vectors")
    with pytest.raises(MBEInputError, match="'cnn' needs an image dataset, and vectors has none"):
        build_model({"model": "cnn"}, vectors)


def test_direct_train_call_with_minibatches():
    data = load_dataset("digits", n_train=120)
    model = build_model(SMALL, data)
    record = train(model, data, optimizer="adamw", lr=0.01, weight_decay=0.1, epochs=3,
                   batch_size=32, probe_epochs=[1, 3], probes={"wn": weight_norm})
    assert record["status"] == "ok" and "wn@3" in record and "val_acc@1" in record


def test_cuda_without_a_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MBEInputError, match="'cuda' needs a CUDA GPU and none is visible here; "
                                            "use device='cpu'"):
        train_run({**SMALL, "device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MBEInputError, match="'cuda:3' does not exist: this machine has 1 CUDA"):
        load_dataset("digits", device="cuda:3")


def test_a_blown_up_but_finite_loss_is_diverged_in_both_engines():
    configs = [{**SMALL, "dtype": "float64", "optimizer": "adam", "lr": lr, "seed": s}
               for lr, s in ((1e3, 0), (1e-2, 1), (1e3, 2))]
    sequential = [TrainRun(ensemble=False)(c) for c in configs]
    stacked = TrainRun(ensemble=True).run_many(configs)
    assert [r["status"] for r in sequential] == ["diverged", "ok", "diverged"]
    for a, b in zip(sequential, stacked):
        assert_records_close(numbers(a), numbers(b))
    assert sequential[0]["diverged_epoch"] >= 1 and math.isfinite(sequential[0]["train_loss@0"])
    assert math.isnan(sequential[0]["test_acc"]) and sequential[1]["train_loss"] < 2.3


def test_divergence_limit_is_relative_to_the_run():
    assert divergence_limit(3.0, 10) == pytest.approx(30.0)
    assert divergence_limit(0.01, 10) == pytest.approx(10 * math.log(10))  # started near-perfect
    assert divergence_limit(50.0, 10) == pytest.approx(500.0)
    assert math.isnan(divergence_limit(float("nan"), 10))


def test_labels_and_inputs_that_do_not_fit_the_model_are_one_sentence():
    data = load_dataset("digits", n_train=100)
    model = build_model(SMALL, data)
    cases = [
        ({"y_train": data.y_train + 10}, r"labels in y_train must lie between 0 and 9 \(the "
                                          r"model has 10 outputs\), got 10 to 19"),
        ({"y_val": data.y_val.int()}, r"y_val must hold integer class labels \(torch.long\)"),
        ({"x_train": data.x_train[:, :10]}, r"MLP takes 64 features per sample, got samples of "
                                             r"shape \(10,\)"),
        ({"x_train": data.x_train.double()}, "MLP has torch.float32 weights but got "
                                              r"torch.float64 inputs; convert them with x.to"),
    ]
    for change, fragment in cases:
        bad = dataclasses.replace(data, **change)
        with pytest.raises(MBEInputError, match=fragment):
            train(model, bad, epochs=1)
        with pytest.raises(MBEInputError, match=fragment):
            train_ensemble([model, model], [bad, bad], lr=[0.1, 0.1], weight_decay=[0, 0],
                           seeds=[0, 1], epochs=1)
