"""The peft problem: real (tiny) fine-tuning runs, the analytic parameter count, the space's rules, offline loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from problems import peft as peft_problem
from problems._minilm import PATH_ENV, load_minilm, model_path
from problems.peft import (DEFAULT_CONFIG, HEAD_PARAMS, METHODS, MINILM_GEOMETRY, PeftProblem, read_split,
                           stratified_order, trainable_params)
from qd.registry import get_problem
from qd.space import SpaceError

TINY = {"train_size": 64, "val_size": 64, "max_length": 16, "min_steps": 1, "max_steps": 5}


def config_for(method: str, **overrides) -> dict:
    """DEFAULT_CONFIG adapted to ``method`` (its inactive parameters dropped), with overrides."""
    config = dict(DEFAULT_CONFIG, method=method, steps=5)
    if method != "lora":
        config.pop("dropout")
    if method == "ia3":
        config.pop("rank")
        config.pop("alpha_ratio")
    config.update(overrides)
    return config


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def problem() -> PeftProblem:
    torch.set_num_threads(1)
    return PeftProblem(**TINY)


def test_registered_under_its_name():
    problem = get_problem("peft", **TINY)
    assert isinstance(problem, PeftProblem) and problem.options == TINY


@pytest.mark.parametrize("method", METHODS)
def test_each_method_fine_tunes_and_reports_its_true_size(problem, method):
    config = config_for(method)
    evaluation = problem.evaluate(config, seed=0)
    values, measures, _ = problem.normalise(evaluation)
    accuracy, params, train_time = values
    assert 0.0 <= accuracy <= 1.0
    assert train_time > 0
    built = count_trainable(problem.build_model(config, seed=0))
    assert params == problem.cheap_values(config)["trainable_params"] == built > HEAD_PARAMS
    assert measures == [pytest.approx(np.log10(built)), 6.0]
    assert evaluation.metadata["steps"] == 5 and np.isfinite(evaluation.metadata["final_train_loss"])
    assert evaluation.metadata["peak_memory_mb"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_every_trainable_tensor_and_nothing_frozen(problem, method):
    config = config_for(method, lr=1e-2)
    trained = problem._train(config, seed=1).model
    fresh = problem.build_model(config, seed=1)
    fresh_params = dict(fresh.named_parameters())
    for name, param in trained.named_parameters():
        moved = not torch.equal(param.detach().cpu(), fresh_params[name].detach())
        assert moved == param.requires_grad, f"{name}: requires_grad={param.requires_grad} but moved={moved}"


def test_analytic_count_matches_built_models_across_the_space(problem):
    configs = problem.space.sample(25, np.random.default_rng(3))
    configs.append(config_for("lora", **{f"layer_{i}": False for i in range(6)}))  # head only
    for config in configs:
        assert trainable_params(config) == count_trainable(problem.build_model(config, seed=0)), config
    assert trainable_params(configs[-1]) == HEAD_PARAMS
    largest = config_for("loha", rank=64, targets="all")
    assert problem.measures[0].high == pytest.approx(np.log10(trainable_params(largest)))
    assert problem.measures[0].low == pytest.approx(np.log10(HEAD_PARAMS))


def test_head_only_when_no_layer_is_adapted(problem):
    config = config_for("ia3", **{f"layer_{i}": False for i in range(6)})
    evaluation = problem.evaluate(config, seed=0)
    assert evaluation.values["trainable_params"] == HEAD_PARAMS
    assert list(evaluation.measures)[1] == 0.0


def test_target_sets_and_layers_adapt_exactly_the_named_modules(problem):
    config = config_for("lora", targets="ffn", **{f"layer_{i}": i in (1, 4) for i in range(6)})
    model = problem.build_model(config, seed=0)
    adapted = {n.split("base_model.model.")[1].rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"encoder.layer.{i}.{m}" for i in (1, 4) for m in ("intermediate.dense", "output.dense")}

    # (IA)^3 scales the FFN down-projection's input, every other module's output.
    model = problem.build_model(config_for("ia3", targets="all"), seed=0)
    ia3_layers = {n.split("base_model.model.")[1]: m for n, m in model.named_modules() if hasattr(m, "is_feedforward")}
    assert ia3_layers["encoder.layer.0.output.dense"].is_feedforward
    assert not ia3_layers["encoder.layer.0.attention.output.dense"].is_feedforward
    assert not ia3_layers["encoder.layer.0.intermediate.dense"].is_feedforward


def test_model_geometry_matches_the_constants_the_count_relies_on(problem):
    _, encoder = problem._base()
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size, encoder.config.intermediate_size) == (
        peft_problem.NUM_LAYERS, peft_problem.HIDDEN, peft_problem.INTERMEDIATE)
    # What the problem read from the checkpoint (on the meta device) is the geometry the constants describe.
    assert problem.geometry == MINILM_GEOMETRY and problem.head_params == HEAD_PARAMS
    assert peft_problem.geometry_of(encoder, encoder.config) == MINILM_GEOMETRY
    assert len(json.loads((peft_problem.DATA_DIR / "categories.json").read_text())) == peft_problem.NUM_CLASSES


@pytest.mark.parametrize(
    "config, field",
    [
        (config_for("ia3", rank=8), "rank"),  # inactive for (IA)^3
        (config_for("prefix"), "method"),
        (config_for("lora", rank=0), "rank"),
        (config_for("lora", rank=65), "rank"),
        (config_for("loha", alpha_ratio=100.0), "alpha_ratio"),
        (config_for("lora", targets="dense"), "targets"),
        (config_for("lora", lr=1.0), "lr"),
        (config_for("lora", steps=6), "steps"),  # above max_steps=5
        ({k: v for k, v in config_for("lora").items() if k != "layer_3"}, "layer_3"),
    ],
)
def test_invalid_configs_are_rejected_naming_the_parameter(problem, config, field):
    with pytest.raises(SpaceError, match=field):
        problem.space.validate(config)
    with pytest.raises(SpaceError, match=field):
        problem.cheap_values(config)
    with pytest.raises(SpaceError, match=field):
        problem.trainable_params(config)
    with pytest.raises(SpaceError, match=field):
        problem.evaluate(config, seed=0)


@pytest.mark.parametrize(
    "options, field",
    [({"train_size": 0}, "train_size"), ({"train_size": 9500, "val_size": 1000}, "train_size"),
     ({"device": "tpu"}, "device"), ({"min_steps": 10, "max_steps": 5}, "max_steps"),
     ({"gpus_per_eval": 0}, "gpus_per_eval"), ({"max_length": 1}, "max_length"), ({"data_seed": -1}, "data_seed")],
)
def test_bad_options_are_rejected_naming_the_option(options, field):
    with pytest.raises(ValueError, match=field):
        PeftProblem(**options)


def test_resources_declare_a_gpu_share_only_for_gpu_runs():
    assert PeftProblem(device="cpu").resources.gpus == 0
    assert PeftProblem(device="cuda", gpus_per_eval=0.5).resources.gpus == 0.5


def test_splits_are_stratified_disjoint_and_test_is_kept_whole(problem):
    _, labels = read_split("train")
    order = stratified_order(labels, seed=0)
    assert sorted(order) == list(range(len(labels)))  # a permutation: val and train slices never overlap
    counts = np.bincount(labels[order[:1000]], minlength=77)
    expected = 1000 * np.bincount(labels, minlength=77) / len(labels)
    assert np.all(np.abs(counts - expected) <= 2)
    assert len(problem._split("val")) == 64 and len(problem._split("train")) == 64
    test = problem._split("test")
    assert len(test) == 3080 and len(torch.unique(test.labels)) == 77


def test_pickles_without_the_cached_model(problem):
    problem._base()
    blob = pickle.dumps(problem)
    assert len(blob) < 100_000
    clone = pickle.loads(blob)
    assert clone.cheap_values(config_for("lora")) == problem.cheap_values(config_for("lora"))


def test_model_path_override_and_offline_loading(tmp_path, monkeypatch):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    real_folder = model_path()
    monkeypatch.setenv(PATH_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=PATH_ENV):
        model_path()
    monkeypatch.setenv(PATH_ENV, str(real_folder))
    assert model_path() == real_folder and (real_folder / "model.safetensors").is_file()


def test_building_and_training_opens_no_network_connection_and_writes_no_cache(tmp_path):
    """In a fresh interpreter with sockets disabled and an empty Hugging Face home."""
    script = textwrap.dedent(
        """
        import os, socket
        def refuse(*args, **kwargs):
            raise AssertionError("a network connection was attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from problems.peft import PeftProblem, DEFAULT_CONFIG
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        problem = PeftProblem(train_size=8, val_size=8, max_length=8, min_steps=1, max_steps=1, batch_size=4)
        print(problem.evaluate(dict(DEFAULT_CONFIG, steps=1), seed=0).values["accuracy"])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), QD_TORCH_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0.0 <= float(done.stdout.strip().splitlines()[-1]) <= 1.0
    written = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()] if (tmp_path / "hf").exists() else []
    assert written == []


def test_shared_loader_gives_unit_sentence_embeddings():
    from problems._minilm import embed

    tokenizer, model = load_minilm("cpu")
    vectors = embed(["card not arrived", "my card has not arrived yet", "exchange rate for euros"], tokenizer, model)
    assert next(model.parameters()).dtype == torch.float32
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # paraphrases are closer than unrelated intents


@pytest.mark.slow
def test_default_lora_learns_far_above_chance_on_the_test_split():
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    problem = PeftProblem(train_size=2000, val_size=1000)
    accuracy = problem.test_accuracy(DEFAULT_CONFIG, seed=0)  # LoRA r=8 on query/value, 300 steps
    assert accuracy > 0.5, f"test accuracy {accuracy:.3f}; chance is {1 / 77:.3f}"
