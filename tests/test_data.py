"""Tests of mbe_helpers.data: splits, subsets, label noise, torchvision files, bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mbe_helpers.data import DATASETS, _stratified_split, check_device, load_dataset
from mbe_helpers.errors import MBEInputError


def test_digits_split_sizes_are_fixed_across_seeds():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7, n_train=300, label_noise=0.3)
    assert a.n_train + len(a.y_val) + len(a.y_test) == 1797
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_test, b.y_test)
    assert a.image_shape == (1, 8, 8) and a.n_classes == 10 and a.in_dim == 64


def test_stratified_split_is_disjoint_complete_and_balanced():
    y = np.repeat(np.arange(4), [50, 30, 20, 100])
    parts = _stratified_split(y, 0.2, 0.1, seed=3)
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(y) == len(set(joined.tolist()))
    for c, n in zip(range(4), [50, 30, 20, 100]):
        assert (y[parts["val"]] == c).sum() == round(0.2 * n)
        assert (y[parts["test"]] == c).sum() == round(0.1 * n)
    assert np.array_equal(parts["val"], _stratified_split(y, 0.2, 0.1, seed=3)["val"])


def test_inputs_are_standardised_on_the_training_split():
    data = load_dataset("digits", dtype=torch.float64)
    varying = data.x_train.std(0) > 0
    assert data.x_train.dtype == torch.float64
    assert torch.allclose(data.x_train.mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(data.x_train.std(0, unbiased=False)[varying],
                          torch.ones(int(varying.sum()), dtype=torch.float64), atol=1e-6)


def test_training_subset_is_stratified_and_seeded():
    full = load_dataset("digits")
    sub = load_dataset("digits", seed=1, n_train=200)
    again = load_dataset("digits", seed=1, n_train=200)
    other = load_dataset("digits", seed=2, n_train=200)
    assert sub.n_train == 200 and torch.equal(sub.x_train, again.x_train)
    assert not torch.equal(sub.train_index, other.train_index)
    expected = torch.bincount(full.y_train).double() * 200 / full.n_train
    assert (torch.bincount(sub.y_train).double() - expected).abs().max() < 1.0


def test_label_noise_changes_exactly_the_fraction_to_other_classes():
    clean = load_dataset("digits", seed=4, n_train=500)
    noisy = load_dataset("digits", seed=4, n_train=500, label_noise=0.3)
    changed = clean.y_train != noisy.y_train
    assert int(changed.sum()) == 150
    assert torch.equal(changed, noisy.noisy)
    assert torch.equal(clean.x_train, noisy.x_train)
    assert torch.equal(noisy.y_train, load_dataset("digits", seed=4, n_train=500,
                                                   label_noise=0.3).y_train)
    assert not torch.equal(noisy.noisy, load_dataset("digits", seed=5, n_train=500,
                                                     label_noise=0.3).noisy)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "imagenet"}, "known datasets are digits, mnist1d"),
    ({"n_train": -3}, "n_train must be a positive integer"),
    ({"n_train": 5000}, "exceeds the"),
    ({"label_noise": 1.0}, "label_noise must lie in [0, 1)"),
    ({"label_noise": -0.1}, "label_noise must lie in [0, 1)"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to less than 1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_bad_input_is_one_clear_sentence(kwargs, fragment):
    with pytest.raises(MBEInputError) as info:
        load_dataset(**{"name": "digits", **kwargs})
    message = str(info.value)
    assert fragment in message and message.count(". ") == 0


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST ships in."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str, n_train: int = 40, n_test: int = 20) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    _fake_mnist(tmp_path, folder)
    data = load_dataset(name, data_root=tmp_path)
    assert data.image_shape == (1, 28, 28) and data.in_dim == 784
    assert (data.n_train, len(data.y_val), len(data.y_test)) == (40, 10, 10)
    assert torch.equal(torch.bincount(data.y_val), torch.ones(10, dtype=torch.long))
    assert abs(float(data.x_train.mean())) < 1e-4


def test_missing_torchvision_files_say_where_to_put_them(tmp_path):
    with pytest.raises(MBEInputError, match=r"MNIST/raw: put train-images-idx3-ubyte"):
        load_dataset("mnist", data_root=tmp_path)
    with pytest.raises(MBEInputError, match=r"cifar-10-batches-py"):
        load_dataset("cifar10", data_root=tmp_path)


def test_mnist1d_is_generated_locally():
    data = load_dataset("mnist1d", n_train=100, seed=2)
    assert data.in_dim == 40 and data.n_classes == 10 and data.image_shape is None
    assert (data.n_train, len(data.y_val), len(data.y_test)) == (100, 1000, 1000)
    assert set(DATASETS) >= {"digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"}


def test_batch_returns_a_split_and_rejects_unknown_ones():
    data = load_dataset("digits")
    x, y = data.batch("test")
    assert x is data.x_test and y is data.y_test
    with pytest.raises(MBEInputError):
        data.batch("holdout")


def test_devices_this_machine_lacks_are_one_sentence(monkeypatch):
    with pytest.raises(MBEInputError, match="unknown device 'tpu'; use 'cpu', 'cuda'"):
        load_dataset("digits", device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MBEInputError, match="'cuda' needs a CUDA GPU and none is visible"):
        load_dataset("digits", device="cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MBEInputError, match="'mps' needs Apple's MPS backend"):
        load_dataset("digits", device="mps")
    assert check_device("cpu") == torch.device("cpu")
