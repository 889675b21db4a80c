"""The arch problem: real (tiny) training runs on digits and MNIST, the cheap parameter count, the space's rules."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from problems.arch import DATA_DIR, ArchProblem, build_network, count_params, load_dataset, read_idx, stratified_split
from qd.registry import get_problem
from qd.space import SpaceError

MLP = {"family": "mlp", "depth": 2, "width": 64, "activation": "relu", "norm": "none", "dropout": 0.1,
       "lr": 3e-3, "epochs": 3}
CNN = {"family": "cnn", "depth": 2, "width": 16, "kernel_size": 3, "activation": "gelu", "norm": "batch",
       "dropout": 0.0, "lr": 3e-3, "epochs": 1}


@pytest.fixture(scope="module")
def problem() -> ArchProblem:
    torch.set_num_threads(1)
    return get_problem("arch")


def test_a_trained_mlp_beats_chance_by_far_and_reports_every_objective(problem):
    evaluation = problem.evaluate(MLP, seed=0)
    (accuracy, params, latency_ms), measures, constraints = problem.normalise(evaluation)
    assert accuracy > 0.5  # chance is 0.1; three epochs of this MLP reach about 0.95
    assert 0.5 < evaluation.metadata["test_accuracy"] <= 1.0
    assert params == problem.cheap_values(MLP)["params"]
    assert latency_ms > 0
    assert measures == [pytest.approx(math.log10(params)), 2.0]
    assert constraints == []
    assert evaluation.metadata["n_train"] + evaluation.metadata["n_val"] < 1797
    assert np.isfinite(evaluation.metadata["final_train_loss"])


def test_training_is_reproducible_for_a_seed(problem):
    config = dict(MLP, epochs=1)
    first, second = problem.evaluate(config, seed=3), problem.evaluate(config, seed=3)
    assert first.values["accuracy"] == second.values["accuracy"]
    assert first.metadata["final_train_loss"] == second.metadata["final_train_loss"]


def test_a_cnn_with_batch_norm_trains_on_digits(problem):
    evaluation = problem.evaluate(CNN, seed=0)
    assert 0.0 <= evaluation.values["accuracy"] <= 1.0
    assert evaluation.values["params"] == problem.cheap_values(CNN)["params"]


@pytest.mark.parametrize("family", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("depth", [1, 4])
def test_cheap_count_is_the_built_modules_count(problem, family, norm, depth):
    config = dict(MLP if family == "mlp" else CNN, norm=norm, depth=depth, width=37)
    built = sum(p.numel() for p in problem.build(config).parameters())
    assert problem.cheap_values(config) == {"params": float(built)}


def test_networks_have_the_documented_shape():
    # MLP depth 1, width 8 on 8x8 digits: Linear(64, 8) + Linear(8, 10); LayerNorm adds 2 x 8.
    mlp = dict(MLP, depth=1, width=8)
    assert count_params(build_network(mlp, side=8)) == 64 * 8 + 8 + 8 * 10 + 10
    assert count_params(build_network(dict(mlp, norm="layer"), side=8)) == 610 + 16
    # CNN: global average pooling makes the count independent of the image size.
    cnn = dict(CNN, depth=3, width=8, norm="none", kernel_size=5)
    expected = (1 * 8 * 25 + 8) + 2 * (8 * 8 * 25 + 8) + (8 * 10 + 10)
    assert count_params(build_network(cnn, side=8)) == count_params(build_network(cnn, side=28)) == expected
    for side in (8, 28):
        logits = build_network(cnn, side).eval()(torch.zeros(2, 1, side, side))
        assert logits.shape == (2, 10)


def test_vendored_mnist_reads_as_the_standard_test_set():
    images = read_idx(DATA_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = load_dataset("mnist")
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and len(y) == 10_000


def test_split_is_disjoint_complete_and_stratified():
    _, labels = load_dataset("digits")
    train, val, test = stratified_split(labels, seed=0)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(labels) == len(np.unique(everything))
    for part, fraction in ((train, 0.6), (val, 0.2), (test, 0.2)):
        share = np.bincount(labels[part], minlength=10) / np.bincount(labels, minlength=10)
        assert np.allclose(share, fraction, atol=0.02)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), stratified_split(labels, seed=0)))


def test_mnist_evaluation_runs():
    problem = get_problem("arch", dataset="mnist")
    evaluation = problem.evaluate(dict(MLP, depth=1, width=16, epochs=1), seed=0)
    assert evaluation.values["accuracy"] > 0.5
    assert evaluation.values["params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert evaluation.metadata["n_train"] == 6000 - 1  # 60 % of each class, rounded per class


@pytest.mark.parametrize(
    "config, named",
    [
        (dict(MLP, kernel_size=3), "kernel_size"),  # only active for CNNs
        (dict(MLP, width=300), "width"),
        (dict(MLP, family="rnn"), "family"),
        (dict(MLP, epochs=0), "epochs"),
        ({k: v for k, v in CNN.items() if k != "kernel_size"}, "kernel_size"),
        (dict(MLP, norm="group"), "norm"),
    ],
)
def test_invalid_configurations_are_rejected_naming_the_parameter(problem, config, named):
    with pytest.raises(SpaceError, match=named):
        problem.evaluate(config, seed=0)
    with pytest.raises(SpaceError, match=named):
        problem.cheap_values(config)


@pytest.mark.parametrize(
    "options, named",
    [({"dataset": "cifar"}, "dataset"), ({"batch_size": 0}, "batch_size"), ({"device": "tpu"}, "device"),
     ({"gpus_per_eval": 2}, "gpus_per_eval"), ({"latency_batch": 1.5}, "latency_batch")],
)
def test_invalid_options_are_rejected_naming_the_option(options, named):
    with pytest.raises(ValueError, match=named):
        get_problem("arch", **options)


def test_pickles_without_its_data_and_still_evaluates(problem):
    problem.evaluate(dict(MLP, epochs=1), seed=0)  # loads the splits
    clone = pickle.loads(pickle.dumps(problem))
    assert clone._splits == {} and len(pickle.dumps(problem)) < 10_000
    assert clone.evaluate(dict(MLP, epochs=1), seed=0).values["accuracy"] > 0.1


def test_space_round_trips_and_samples_valid_configurations(problem):
    rng = np.random.default_rng(0)
    for config in problem.space.sample(50, rng):
        assert problem.space.decode(problem.space.encode(config)) == config
        assert ("kernel_size" in config) == (config["family"] == "cnn")
    assert problem.describe()["measures"] == [{"name": "log10_params", "low": 2.0, "high": 7.0},
                                              {"name": "depth", "low": 1, "high": 4, "integer": True}]


# --- a dataset given by path --------------------------------------------------------------
def _digits_parts():
    x, y = load_dataset("digits")
    return x[:300], y[:300]


def test_npz_image_folder_and_table_by_path_train_and_count_exactly(tmp_path):
    from PIL import Image

    x, y = _digits_parts()
    np.savez(tmp_path / "digits.npz", images=(x * 255).astype(np.uint8), labels=y)
    for i, (image, label) in enumerate(zip(x[:120], y[:120])):
        (tmp_path / "folder" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).astype(np.uint8), mode="L").save(tmp_path / "folder" / f"c{label}" / f"{i}.png")
    import pandas as pd

    pd.DataFrame(x.reshape(len(x), -1)[:, :20]).add_prefix("f").assign(digit=y).to_csv(tmp_path / "rows.csv", index=False)

    cases = [({"dataset": str(tmp_path / "digits.npz")}, (1, 8, 8), 10),
             ({"dataset": str(tmp_path / "folder"), "image_size": 12}, (1, 12, 12), 10),
             ({"dataset": str(tmp_path / "rows.csv"), "label_column": "digit"}, (20,), 10)]
    for options, shape, classes in cases:
        problem = ArchProblem(**options)
        assert problem.side == shape and problem.num_classes == classes
        families = problem.space["family"].choices
        assert families == (("mlp",) if len(shape) == 1 else ("mlp", "cnn"))
        for config in problem.space.sample(5, np.random.default_rng(0)):
            assert problem.cheap_values(config)["params"] == count_params(problem.build(config))
            low, high = problem.measures[0].low, problem.measures[0].high
            assert low <= math.log10(count_params(problem.build(config))) <= high
        config = {"family": "mlp", "depth": 1, "width": 32, "activation": "relu", "norm": "none", "dropout": 0.0,
                  "lr": 3e-3, "epochs": 4}
        evaluation = problem.evaluate(config, seed=0)
        assert evaluation.values["accuracy"] > 0.3, options  # chance is 0.1


@pytest.mark.parametrize("make, options, named", [
    (None, {"dataset": "no/such.npz"}, ["dataset", "no/such.npz", "no such file"]),
    ("csv", {"label_column": "class"}, ["label_column", "'class'", "digit"]),
    ("one", {"label_column": "digit"}, ["label_column", "1 class", "at least 2"]),
    ("npz", {}, ["dataset", "expected inputs under x"]),
    ("empty", {}, ["dataset", "no images"]),
])
def test_bad_dataset_paths_fail_at_construction(tmp_path, make, options, named):
    import pandas as pd

    path = None
    if make in ("csv", "one"):
        path = tmp_path / "rows.csv"
        pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "digit": [0, 1, 0, 1] if make == "csv" else [3, 3, 3, 3]}).to_csv(path, index=False)
    elif make == "npz":
        path = tmp_path / "bad.npz"
        np.savez(path, pixels=np.zeros((4, 8, 8)), classes=np.arange(4))
    elif make == "empty":
        path = tmp_path / "images"
        (path / "cats").mkdir(parents=True)
    arguments = ({"dataset": str(path)} if path else {}) | options
    with pytest.raises(ValueError) as error:
        ArchProblem(**arguments)
    for name in named:
        assert name in str(error.value)
