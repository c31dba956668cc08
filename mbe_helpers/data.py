"""Datasets behind one call: fixed, disjoint train / validation / test splits.

``load_dataset(name, ...)`` returns a :class:`Dataset` of flat feature tensors
(images are flattened channel-first; ``image_shape`` says how to fold them
back) for five sources:

* ``digits``: UCI handwritten digits bundled with scikit-learn (offline, the default);
* ``mnist1d``: generated locally by the ``mnist1d`` package (no download);
* ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision files under ``data_root``.

All samples of a source are pooled and split once, stratified by class, from
``split_seed``; validation and test are therefore identical across the runs of
a grid.  The run ``seed`` then draws the stratified training subset
(``n_train``) and the label noise, which touches training labels only.
Inputs are standardised with statistics of the full training split (per
feature for ``digits`` and ``mnist1d``, per channel for the torchvision images).
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from mbe_helpers.errors import require_extra

require_extra("torch", "torch", "mbe_helpers.data")

import numpy as np
import torch

from mbe_helpers.errors import MBEInputError
from mbe_helpers.runtime import resolve_data_root

log = logging.getLogger(__name__)

DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")

# torchvision class name, folder under data_root, files expected there
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", "train-images-idx3-ubyte, "
                      "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "the extracted python version of CIFAR-10 "
                "(data_batch_1..5, test_batch, batches.meta)"),
}


@dataclass(frozen=True)
class Dataset:
    """Tensors of one dataset draw and what is needed to interpret them.

    Attributes
    ----------
    name : str
    x_train, y_train : Tensor
        Training inputs ``(n_train, in_dim)`` and (possibly noisy) labels.
    x_val, y_val, x_test, y_test : Tensor
        Clean validation and test splits, fixed by ``split_seed``.
    n_classes : int
    image_shape : tuple of int or None
        ``(C, H, W)`` for image sources, ``None`` for vector sources.
    train_index : Tensor
        Rows of the full training split that form ``x_train`` (sorted).
    noisy : Tensor
        Boolean mask over training rows whose label was replaced.

    Examples
    --------
    >>> data = load_dataset("digits", n_train=100)
    >>> data.in_dim, data.n_train, data.n_classes, data.image_shape
    (64, 100, 10, (1, 8, 8))
    >>> [tuple(t.shape) for t in data.batch("val")]
    [(359, 64), (359,)]
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    image_shape: tuple[int, ...] | None
    train_index: torch.Tensor
    noisy: torch.Tensor

    @property
    def in_dim(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    def batch(self, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole split ``(x, y)`` for ``split`` in train / val / test."""
        if split not in ("train", "val", "test"):
            raise MBEInputError(f"unknown split {split!r}; choose 'train', 'val' or 'test'")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")


def load_dataset(name: str = "digits", *, data_root: str | Path | None = None,
                 download: bool = False, seed: int = 0, n_train: int | None = None,
                 label_noise: float = 0.0, val_fraction: float = 0.2,
                 test_fraction: float = 0.2, split_seed: int = 0,
                 device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Dataset:
    """Load a dataset as fixed, disjoint, stratified train / validation / test tensors.

    Parameters
    ----------
    name : {"digits", "mnist1d", "mnist", "fashion-mnist", "cifar10"}
    data_root : path, optional
        Folder holding torchvision files (default: ``$MBE_DATA_ROOT``, else ``data/``;
        a relative folder is taken from the repository root, see
        :func:`mbe_helpers.runtime.resolve_data_root`).
    download : bool
        Let torchvision download missing files (needs network access).
    seed : int
        Draws the training subset and the label noise.
    n_train : int, optional
        Size of a stratified subset of the training split (default: all of it).
    label_noise : float in [0, 1)
        Fraction ``p`` of training labels replaced by a uniformly drawn
        *different* class; exactly ``round(p * n_train)`` labels change.
    val_fraction, test_fraction : float
        Shares of the pooled samples held out, per class, for validation and test.
    split_seed : int
        Fixes the three-way split (keep it constant across a grid).
    device, dtype
        Where and in which float type the inputs are returned.

    Returns
    -------
    Dataset

    Examples
    --------
    >>> data = load_dataset("digits", n_train=200, label_noise=0.1, seed=3)
    >>> tuple(data.x_train.shape), int(data.noisy.sum()), len(data.y_val), len(data.y_test)
    ((200, 64), 20, 359, 359)
    >>> torch.equal(load_dataset("digits", seed=4).x_val, data.x_val)   # fixed by split_seed
    True
    """
    _check_arguments(name, seed, n_train, label_noise, val_fraction, test_fraction)
    check_device(device)
    root = str(resolve_data_root(data_root))
    splits = _standardised_splits(name, root, download, split_seed, val_fraction, test_fraction)
    x_tr, y_tr = splits["train"]
    n_classes = splits["n_classes"]
    subset_rng, noise_rng = (np.random.default_rng(s)
                             for s in np.random.SeedSequence(seed).spawn(2))
    index = (np.arange(len(y_tr)) if n_train is None
             else _stratified_subset(y_tr, n_train, subset_rng, name))
    labels, noisy = _add_label_noise(y_tr[index], label_noise, n_classes, noise_rng)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, dtype=dtype, device=device)

    def labels_of(array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.long, device=device)

    return Dataset(
        name=name, x_train=tensor(x_tr[index]), y_train=labels_of(labels),
        x_val=tensor(splits["val"][0]), y_val=labels_of(splits["val"][1]),
        x_test=tensor(splits["test"][0]), y_test=labels_of(splits["test"][1]),
        n_classes=n_classes, image_shape=splits["image_shape"],
        train_index=torch.as_tensor(index, dtype=torch.long),
        noisy=torch.as_tensor(noisy, dtype=torch.bool))


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; one sentence when it is unknown or this machine lacks it.

    Parameters
    ----------
    device : str or torch.device
        ``cpu``, ``cuda`` / ``cuda:N`` (when that GPU is visible) or ``mps``
        (when Apple's MPS backend is available).

    Returns
    -------
    torch.device

    Raises
    ------
    MBEInputError
        For any other name, and for a GPU this machine does not have.

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("tpu")
    Traceback (most recent call last):
    ...
    mbe_helpers.errors.MBEInputError: unknown device 'tpu'; use 'cpu', 'cuda' (or 'cuda:N') or 'mps'
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise MBEInputError(f"unknown device {device!r}; use 'cpu', 'cuda' (or 'cuda:N') or 'mps'")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise MBEInputError(f"device {device!r} needs a CUDA GPU and none is visible here; "
                                "use device='cpu'")
        if (dev.index or 0) >= count:
            raise MBEInputError(f"device {device!r} does not exist: this machine has {count} CUDA "
                                f"GPU(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MBEInputError(f"device {device!r} needs Apple's MPS backend, which this machine "
                            "lacks; use device='cpu'")
    return dev


def _check_arguments(name: str, seed: int, n_train: int | None, label_noise: float,
                     val_fraction: float, test_fraction: float) -> None:
    if name not in DATASETS:
        raise MBEInputError(f"unknown dataset {name!r}; known datasets are {', '.join(DATASETS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MBEInputError(f"seed must be a non-negative integer, got {seed!r}")
    if n_train is not None and (not isinstance(n_train, (int, np.integer)) or n_train < 1):
        raise MBEInputError(f"n_train must be a positive integer or None, got {n_train!r}")
    for key, value in (("label_noise", label_noise), ("val_fraction", val_fraction),
                       ("test_fraction", test_fraction)):
        _check_number(key, value)
    if not 0.0 <= label_noise < 1.0:
        raise MBEInputError(f"label_noise must lie in [0, 1), got {label_noise!r}")
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise MBEInputError(
            f"val_fraction ({val_fraction!r}) and test_fraction ({test_fraction!r}) must be "
            "positive and sum to less than 1")


def _check_number(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MBEInputError(f"{key} must be a number, got {value!r}; pass e.g. {key}=0.1")


def _stratified_subset(y: np.ndarray, n: int, rng: np.random.Generator,
                       name: str) -> np.ndarray:
    """Indices of ``n`` rows drawn per class in proportion to the class sizes."""
    if n > len(y):
        raise MBEInputError(
            f"n_train={n} exceeds the {len(y)} samples of the {name} training split")
    classes, counts = np.unique(y, return_counts=True)
    if n < len(classes):
        raise MBEInputError(f"n_train={n} is fewer than the {len(classes)} classes of {name}, so "
                            f"some classes would have no training sample; use n_train >= "
                            f"{len(classes)}")
    quota = counts * n / len(y)
    take = np.floor(quota).astype(int)
    remainder = np.argsort(-(quota - take), kind="stable")[: n - take.sum()]
    take[remainder] += 1
    chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _add_label_noise(y: np.ndarray, fraction: float, n_classes: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``round(fraction * len(y))`` labels by a different class, uniformly."""
    labels = y.copy()
    noisy = np.zeros(len(y), dtype=bool)
    n_noisy = int(round(fraction * len(y)))
    if n_noisy:
        rows = rng.choice(len(y), size=n_noisy, replace=False)
        labels[rows] = (labels[rows] + rng.integers(1, n_classes, size=n_noisy)) % n_classes
        noisy[rows] = True
    return labels, noisy


def _stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float,
                      seed: int) -> dict[str, np.ndarray]:
    """Sorted pool indices of the train / val / test splits, stratified by class."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(val_fraction * len(rows)))
        n_test = int(round(test_fraction * len(rows)))
        parts["val"].append(rows[:n_val])
        parts["test"].append(rows[n_val:n_val + n_test])
        parts["train"].append(rows[n_val + n_test:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


@functools.lru_cache(maxsize=8)
def _standardised_splits(name: str, root: str, download: bool, split_seed: int,
                         val_fraction: float, test_fraction: float) -> dict:
    """Split the pooled samples and standardise them with training-split statistics."""
    x, y, image_shape = _raw(name, root, download)
    index = _stratified_split(y, val_fraction, test_fraction, split_seed)
    x = x.astype(np.float64)
    if name in _TORCHVISION:  # per channel
        view = x.reshape(len(x), image_shape[0], -1)
        axes: tuple[int, ...] = (0, 2)
    else:  # per feature
        view, axes = x, (0,)
    train = view[index["train"]]
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    x = ((view - mean) / std).reshape(len(x), -1).astype(np.float32)
    out = {k: (_readonly(x[v]), _readonly(y[v])) for k, v in index.items()}
    return {**out, "n_classes": int(y.max()) + 1, "image_shape": image_shape}


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def _raw(name: str, root: str, download: bool) -> tuple[np.ndarray, np.ndarray,
                                                        tuple[int, ...] | None]:
    """Pooled inputs (flat, channel-first), integer labels and the image shape."""
    if name == "digits":
        require_extra("sklearn", "torch", "the digits data set")
        from sklearn.datasets import load_digits
        bunch = load_digits()
        return bunch.data, bunch.target.astype(np.int64), (1, 8, 8)
    if name == "mnist1d":
        return (*_mnist1d(), None)
    return _torchvision(name, root, download)


def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D with its default arguments, leaving global RNG state untouched."""
    require_extra("mnist1d", "torch", "the mnist1d data set")
    from mnist1d.data import get_dataset_args, make_dataset
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def _torchvision(name: str, root: str, download: bool) -> tuple[np.ndarray, np.ndarray,
                                                                tuple[int, ...]]:
    """Read MNIST, FashionMNIST or CIFAR-10 through torchvision from ``root``."""
    require_extra("torchvision", "torch", f"the {name} data set")
    import torchvision
    class_name, folder, files = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, class_name)
    try:
        parts = [cls(root, train=train, download=download) for train in (True, False)]
    except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError
        where = Path(root) / folder
        if download:
            raise MBEInputError(
                f"could not download {name} into {where} ({exc}); without network access put "
                f"{files} there and call with download=False") from exc
        if where.is_dir() and any(where.iterdir()):
            raise MBEInputError(f"could not read {name} from {where} ({exc}); it should hold "
                                f"{files}") from exc
        raise MBEInputError(
            f"{name} files not found in {where}: put {files} there, or pass "
            "download=True when online") from exc
    images = [np.asarray(p.data) for p in parts]
    if images[0].ndim == 3:  # (N, H, W) grey images
        images = [im[:, None] for im in images]
    else:  # CIFAR: (N, H, W, C)
        images = [im.transpose(0, 3, 1, 2) for im in images]
    x = np.concatenate(images)
    y = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    shape = tuple(int(s) for s in x.shape[1:])
    return x.reshape(len(x), -1).astype(np.float32) / 255.0, y, shape
