"""Small-network architecture search on handwritten digits: accuracy vs parameters vs latency.

Each evaluation builds an MLP or a CNN from the configuration, trains it with Adam for a few
epochs and reports its validation accuracy, its parameter count and its inference latency. Two
datasets, both offline:

- ``digits`` (default): scikit-learn's 1,797 8x8 digits. An evaluation takes about a second on
  one CPU core for typical configurations (the widest, deepest CNN for 10 epochs takes longer).
- ``mnist``: the vendored MNIST test split (10,000 28x28 digits, ``data/mnist_test``), read from
  its IDX files with numpy. Wide CNNs at 28x28 are slow on a CPU; use a GPU or a small budget.

Each dataset is split once (stratified, fixed by ``data_seed``) into train (60 %), validation
(20 %) and test (20 %) parts, so every evaluation of a run is scored on the same validation
examples; ``accuracy`` is validation accuracy and the test accuracy is kept in the metadata for
reporting the final set. The evaluation ``seed`` sets the weight initialisation and batch order.

Measures: ``log10_params`` and ``depth``. Size is the axis people trade against accuracy; depth
is the axis they argue about. At equal size, a deep narrow network and a shallow wide one land in
different cells, so the map shows, for each size, whether depth or width buys more accuracy.
``params`` is cheap (counted on the built module, untrained, through ``cheap_values``).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qd.checks import check_device, check_int, check_number
from qd.problem import Evaluation, Measure, Objective, Problem, Resources
from qd.space import Categorical, Config, Float, Int, Space

DATA_DIR = Path(__file__).parent / "data" / "mnist_test"
THREADS_ENV = "QD_TORCH_THREADS"
DATASETS = ("digits", "mnist")
NUM_CLASSES = 10
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train, validation, test

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
NORMS = ("none", "batch", "layer")


@dataclass(frozen=True)
class Split:
    """One part of a dataset as tensors: images ``(n, 1, side, side)`` float32, labels ``(n,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) into a uint8 array of its declared shape."""
    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes; the low byte is the number of dimensions
        raise ValueError(f"{path}: IDX magic {magic:#x} is not an unsigned-byte array")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: header declares shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 ``(n, side, side)`` in [0, 1] and labels as int64 ``(n,)``."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    if name == "mnist":
        images = read_idx(DATA_DIR / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(DATA_DIR / "t10k-labels-idx1-ubyte.gz")
        return (images / 255.0).astype(np.float32), labels.astype(np.int64)
    raise ValueError(f"arch option dataset={name!r} is not allowed; allowed: {list(DATASETS)}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


def load_user_dataset(path_value: str, label_column: str = "label", image_size: int = 28) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A dataset given by path: inputs as float32, integer labels and the class names.

    - a folder of class folders of images (``cats/001.png``): images resized to ``image_size`` x
      ``image_size``, grey (one channel) when every image is, else RGB; inputs ``(n, c, h, w)`` in [0, 1].
    - an ``.npz`` with inputs under ``x`` / ``X`` / ``images`` / ``features`` and labels under ``y`` /
      ``labels`` / ``targets``: ``(n, d)`` rows, ``(n, h, w)`` or ``(n, h, w, c)`` / ``(n, c, h, w)`` images
      (uint8 scaled to [0, 1]).
    - a table (CSV, TSV, JSON Lines, Parquet) with ``label_column``; every other column is a numeric feature.
    """
    from problems._data import DataError, class_index, existing_path, read_table, require_column

    path = existing_path("arch", "dataset", path_value, "an image folder, an .npz file or a CSV table (or 'digits' / 'mnist')")
    if path.is_dir():
        from PIL import Image

        folders = sorted(p for p in path.iterdir() if p.is_dir())
        files = [(f, d.name) for d in folders for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"arch option dataset={path_value!r} holds no images in class folders; expected "
                            f"FOLDER/CLASS/IMAGE with suffixes {list(IMAGE_SUFFIXES)}")
        classes = class_index([c for _, c in files], "arch", "dataset", "(class folders)", path_value)
        images = [Image.open(f) for f, _ in files]
        mode = "L" if all(im.mode in ("L", "1", "I;16") for im in images) else "RGB"
        x = np.stack([np.asarray(im.convert(mode).resize((image_size, image_size)), dtype=np.float32) / 255.0
                      for im in images])
        x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
        index = {c: i for i, c in enumerate(classes)}
        return x, np.array([index[c] for _, c in files], dtype=np.int64), classes
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            x_key = next((k for k in ("x", "X", "images", "features") if k in arrays), None)
            y_key = next((k for k in ("y", "labels", "targets") if k in arrays), None)
            if x_key is None or y_key is None:
                raise DataError(f"arch option dataset={path_value!r}: arrays {sorted(arrays)}; expected inputs under "
                                f"x, X, images or features and labels under y, labels or targets")
            x, raw = arrays[x_key], arrays[y_key]
        if len(x) != len(raw) or x.ndim not in (2, 3, 4):
            raise DataError(f"arch option dataset={path_value!r}: inputs of shape {x.shape} and {len(raw)} labels; expected "
                            f"(n, d), (n, h, w) or (n, h, w, c) inputs and n labels")
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        labels = [str(v) for v in raw.tolist()]
    else:
        frame = read_table(path_value, "arch", "dataset")["all"]
        require_column(frame, "arch", "label_column", label_column, path_value)
        features = frame.drop(columns=[label_column])
        bad = [str(c) for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
        if bad or features.shape[1] == 0:
            raise DataError(f"arch option dataset={path_value!r}: columns {bad} are not numeric; expected numeric feature "
                            f"columns besides label_column={label_column!r}")
        x, labels = features.to_numpy(dtype=np.float32), [str(v) for v in frame[label_column].tolist()]
    classes = class_index(labels, "arch", "label_column", label_column, path_value)
    try:
        order = sorted(classes, key=float)  # numeric labels in numeric order
    except ValueError:
        order = classes
    index = {c: i for i, c in enumerate(order)}
    return x, np.array([index[c] for c in labels], dtype=np.int64), order


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, validation and test parts, each with every class in proportion."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    bounds = np.cumsum(SPLIT_FRACTIONS)[:-1]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        for part, chunk in zip(parts, np.split(rows, (bounds * len(rows)).round().astype(int))):
            part.append(chunk)
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    return train, val, test


def _norm(kind: str, width: int, conv: bool) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width)
    if kind == "layer":
        # GroupNorm with one group normalises over (channels, height, width): LayerNorm for feature maps.
        return nn.GroupNorm(1, width) if conv else nn.LayerNorm(width)
    return nn.Identity()


def build_network(config: Mapping[str, Any], side: int | tuple[int, ...], num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """The network a (validated) configuration describes.

    ``side``: an int for ``side`` x ``side`` one-channel images, or the input shape: ``(channels,
    height, width)`` for images, ``(features,)`` for tabular rows (MLP only).

    MLP: ``depth`` x [Linear(width), norm, activation, dropout], then Linear(num_classes).
    CNN: ``depth`` x [Conv(width, kernel_size, same padding), norm, activation, 2x2 max-pool while
    the map is at least 2x2, dropout], then global average pooling and Linear(num_classes), so the
    head's size does not depend on the input size.
    """
    shape = (1, side, side) if isinstance(side, int) else tuple(side)
    depth, width, activation = config["depth"], config["width"], ACTIVATIONS[config["activation"]]
    layers: list[nn.Module] = []
    if config["family"] == "mlp":
        layers.append(nn.Flatten())
        features = math.prod(shape)
        for _ in range(depth):
            layers += [nn.Linear(features, width), _norm(config["norm"], width, conv=False), activation(),
                       nn.Dropout(config["dropout"])]
            features = width
        layers.append(nn.Linear(features, num_classes))
    else:
        if len(shape) != 3:
            raise ValueError(f"a CNN needs image inputs (channels, height, width), not shape {shape}")
        kernel, channels, size = config["kernel_size"], shape[0], min(shape[1:])
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel, padding=kernel // 2),
                       _norm(config["norm"], width, conv=True), activation()]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers.append(nn.Dropout(config["dropout"]))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def count_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


class ArchProblem(Problem):
    """Train small MLPs/CNNs on handwritten digits or your images/arrays/table: accuracy vs parameter count vs inference latency."""

    def __init__(
        self,
        dataset: str = "digits",
        label_column: str = "label",
        image_size: int = 28,
        batch_size: int = 64,
        latency_batch: int = 256,
        device: str = "cpu",
        gpus_per_eval: float = 0.25,
        data_seed: int = 0,
    ):
        """Options:

        - ``dataset``: "digits" (scikit-learn 8x8, fast on a CPU), "mnist" (vendored 28x28 test split),
          or a path: a folder of class folders of images, an ``.npz`` of inputs and labels, or a table
          (CSV, TSV, JSON Lines, Parquet) of numeric features with ``label_column`` (MLPs only: the
          space has no CNN family for rows). See ``load_user_dataset``.
        - ``label_column``: the label column of a table. ``image_size``: the side images of a
          folder are resized to.
        - ``batch_size``: training batch size.
        - ``latency_batch``: images per timed inference batch (``latency_ms`` is per batch).
        - ``device``: "cpu" (default: these networks are too small to gain from a GPU on digits),
          "auto" (cuda when available), "cuda" or "cuda:N".
        - ``gpus_per_eval``: the GPU share one evaluation declares when it will run on a GPU.
        - ``data_seed``: fixes the train/validation/test split.
        """
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"arch option dataset={dataset!r} is not allowed; allowed: {list(DATASETS)} or a path")
        for name, value in (("batch_size", batch_size), ("latency_batch", latency_batch), ("image_size", image_size)):
            check_int(value, name, "arch", low=1)
        check_device(device, "device", "arch")
        check_number(gpus_per_eval, "gpus_per_eval", "arch", low=0, low_open=True, high=1)
        check_int(data_seed, "data_seed", "arch")
        self.dataset, self.batch_size, self.latency_batch = dataset, batch_size, latency_batch
        self.label_column, self.image_size = label_column, image_size
        self.device_option, self.data_seed = device, data_seed
        self._splits: dict[str, Split] = {}
        if dataset in DATASETS:
            self.side: int | tuple[int, ...] = 8 if dataset == "digits" else 28
            self.num_classes, families = NUM_CLASSES, ("mlp", "cnn")
        else:  # read and checked now, before any evaluation; kept out of pickles
            x, _, classes = self._user_data()
            self.side, self.num_classes = tuple(x.shape[1:]), len(classes)
            from problems._data import absolute

            self.dataset = absolute(dataset)
            families = ("mlp", "cnn") if x.ndim == 4 else ("mlp",)

        self.space = Space([
            Categorical("family", families),
            Int("depth", 1, 4),
            Int("width", 8, 256, log=True),
            *([Categorical("kernel_size", (3, 5), active_if={"family": ["cnn"]})] if "cnn" in families else []),
            Categorical("activation", tuple(ACTIVATIONS)),
            Categorical("norm", NORMS),
            Float("dropout", 0.0, 0.5),
            Float("lr", 1e-4, 3e-2, log=True),
            Int("epochs", 1, 10),
        ])
        self.fidelity = "epochs"  # more epochs: dearer and more faithful
        self.objectives = (  # scales and bounds: the units of hypervolumes and plots (qd.scaling)
            Objective("accuracy", "maximize", bounds=(0.0, 1.0)),
            Objective("params", "minimize", cheap=True, scale="log"),
            Objective("latency_ms", "minimize", scale="log"),
        )
        # 10^2..10^7 covers both built-in datasets: the smallest CNN has 170 parameters, the largest ~4.9M.
        low, high = 2.0, 7.0
        if dataset not in DATASETS:  # the extremes of the space for this input shape
            sizes = [count_params(build_network(dict(family=f, depth=d, width=w, kernel_size=k, activation="relu",
                                                     norm=n, dropout=0.0), self.side, self.num_classes))
                     for f in families for d, w, k, n in ((1, 8, 3, "none"), (4, 256, 5, "batch"), (4, 256, 5, "layer"))]
            low, high = math.floor(math.log10(min(sizes)) * 10) / 10, math.ceil(math.log10(max(sizes)) * 10) / 10
        self.measures = (Measure("log10_params", low, high), Measure("depth", 1, 4, integer=True))
        will_use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.resources = Resources(cpus=1, gpus=float(gpus_per_eval) if will_use_cuda else 0.0, memory_mb=3000)

    # The loaded splits stay out of pickles sent to workers; each worker loads them once.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_splits"] = {}
        return state

    # --- objectives ------------------------------------------------------------------------
    def build(self, config: Config) -> nn.Sequential:
        """The untrained network of a configuration (validated here)."""
        return build_network(self.space.validate(config), self.side, self.num_classes)

    def cheap_values(self, config: Config) -> dict[str, float]:
        """The parameter count, from the untrained network (no training)."""
        return {"params": float(count_params(self.build(config)))}

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Train the network on the train split with ``seed``; accuracy and latency on the validation
        split, test accuracy in the metadata."""
        config = self.space.validate(config)
        self._set_threads()
        device = self._device()
        train, val, test = self._split("train"), self._split("val"), self._split("test")

        started = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = build_network(config, self.side, self.num_classes).to(device)
            final_loss = self._train(model, config, train, device, np.random.default_rng(seed))
        train_time_s = time.perf_counter() - started

        accuracy = self._accuracy(model, val, device)
        params = count_params(model)
        latency_ms = self._latency_ms(model, val, device)
        return Evaluation(
            values={"accuracy": accuracy, "params": float(params), "latency_ms": latency_ms},
            measures=[math.log10(params), float(config["depth"])],
            metadata={
                "test_accuracy": self._accuracy(model, test, device),
                "train_time_s": train_time_s,
                "final_train_loss": final_loss,
                "device": str(device),
                "dataset": self.dataset,
                "n_train": len(train),
                "n_val": len(val),
            },
        )

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _set_threads() -> None:
        threads = os.environ.get(THREADS_ENV, "1")
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"environment variable {THREADS_ENV}={threads!r} is not allowed; allowed: an integer >= 1")
        torch.set_num_threads(int(threads))

    def _device(self) -> torch.device:
        if self.device_option == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"arch option device={self.device_option!r} but no CUDA device is available")
        return device

    def _user_data(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return load_user_dataset(self.dataset, self.label_column, self.image_size)

    def _split(self, name: str) -> Split:
        if not self._splits:
            if self.dataset in DATASETS:
                images, labels = load_dataset(self.dataset)
                images = images[:, None]  # one channel
            else:
                images, labels, _ = self._user_data()
            rows = dict(zip(("train", "val", "test"), stratified_split(labels, self.data_seed)))
            # Standardise with the training part's statistics only (per feature for tabular rows).
            axis = 0 if images.ndim == 2 else None
            mean, std = images[rows["train"]].mean(axis=axis), images[rows["train"]].std(axis=axis)
            std = np.where(std > 0, std, 1.0)
            for part, index in rows.items():
                x = torch.from_numpy(((images[index] - mean) / std).astype(np.float32))
                self._splits[part] = Split(x.contiguous(), torch.from_numpy(labels[index]))
        return self._splits[name]

    def _train(self, model: nn.Module, config: Config, train: Split, device: torch.device,
               rng: np.random.Generator) -> float:
        """Adam on cross-entropy for ``epochs`` passes; returns the mean loss of the last epoch."""
        optimiser = torch.optim.Adam(model.parameters(), lr=config["lr"])
        images, labels = train.images.to(device), train.labels.to(device)
        model.train()
        epoch_loss = float("nan")
        for _ in range(config["epochs"]):
            order = torch.from_numpy(rng.permutation(len(train))).to(device)
            total, batches = 0.0, 0
            for start in range(0, len(train), self.batch_size):
                rows = order[start : start + self.batch_size]
                if len(rows) < 2 and config["norm"] == "batch":
                    continue  # BatchNorm cannot train on a batch of one
                loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total, batches = total + loss.item(), batches + 1
            epoch_loss = total / max(batches, 1)
        return epoch_loss

    @staticmethod
    @torch.inference_mode()
    def _accuracy(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> float:
        model.eval()
        correct = 0
        for start in range(0, len(split), batch_size):
            logits = model(split.images[start : start + batch_size].to(device))
            correct += int((logits.argmax(dim=1).cpu() == split.labels[start : start + batch_size]).sum())
        return correct / len(split)

    @torch.inference_mode()
    def _latency_ms(self, model: nn.Module, split: Split, device: torch.device, repeats: int = 7) -> float:
        """Median wall time of one forward pass over ``latency_batch`` images, after two warm-up passes."""
        model.eval()
        rows = torch.arange(self.latency_batch) % len(split)
        batch = split.images[rows].to(device)
        times = []
        for i in range(repeats + 2):
            _sync(device)
            started = time.perf_counter()
            model(batch)
            _sync(device)
            if i >= 2:
                times.append((time.perf_counter() - started) * 1000.0)
        return float(np.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
