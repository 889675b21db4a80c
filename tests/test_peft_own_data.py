"""peft pointed at a user's checkpoint and data: any depth/width (encoders, decoders, GPT-2's Conv1D),
causal-lm, every table format, the exact parameter count against the built model, and bad input
rejected before any evaluation with the option, the value and what was expected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from problems._data import DataError
from problems._minilm import model_path
from problems.peft import METHODS, PeftProblem, module_role

ROOT = Path(__file__).resolve().parent.parent
TINY = {"train_size": 24, "val_size": 16, "test_size": 16, "max_length": 12, "batch_size": 8, "min_steps": 1, "max_steps": 3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    torch.set_num_threads(1)  # on a few shared cores more threads run slower


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_path() / name).is_file():
            shutil.copy(model_path() / name, folder / name)  # any tokenizer of the same vocabulary size will do
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Small random checkpoints of three families, saved as Hugging Face folders."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    vocab = 30522
    return {
        # 2 layers, 48 wide: another depth and width than MiniLM-L6 (6 x 384)
        "bert": _save(BertModel(BertConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=80, max_position_embeddings=64)), root / "bert"),
        # a decoder with grouped-query attention: k and v are narrower than q
        "llama": _save(LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                                                    num_attention_heads=4, num_key_value_heads=2,
                                                    max_position_embeddings=64)), root / "llama"),
        # GPT-2: fused q/k/v in transformers' Conv1D
        "gpt2": _save(GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64)), root / "gpt2"),
    }


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = {"pos": ["great", "good", "lovely", "fine"], "neg": ["awful", "bad", "poor", "grim"], "mid": ["ok", "so-so"]}
    rows = [{"sentence": " ".join(rng.choice(words[label], 3)), "y": label}
            for label in ("pos", "neg", "mid") for _ in range(30)]
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    pd.DataFrame(rows).sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return path


def configs_for(problem: PeftProblem) -> list[dict]:
    """One configuration per (method, target set), on alternating layers, plus random ones from the space."""
    out = []
    for method in problem.methods:
        for targets in problem.space["targets"].choices:
            config = {"method": method, "targets": targets, "lr": 1e-3, "steps": 1,
                      **{f"layer_{i}": i % 2 == 0 for i in range(problem.geometry.num_layers)}}
            if method != "ia3":
                config.update(rank=3, alpha_ratio=2.0)
            if method == "lora":
                config["dropout"] = 0.0
            out.append(config)
    return out + problem.space.sample(6, np.random.default_rng(1))


@pytest.mark.parametrize("family, task", [("bert", "sequence-classification"), ("llama", "sequence-classification"),
                                          ("llama", "causal-lm"), ("gpt2", "sequence-classification")])
def test_analytic_count_is_exact_for_every_method_and_model(checkpoints, table, family, task):
    options = dict(TINY, text_column="sentence") | ({"label_column": "y"} if task != "causal-lm" else {})
    problem = PeftProblem(model=str(checkpoints[family]), task=task, dataset=str(table), **options)
    depth = {"bert": 2, "llama": 3, "gpt2": 2}[family]
    assert problem.geometry.num_layers == depth
    assert problem.space.names.count("layer_0") == 1 and f"layer_{depth - 1}" in problem.space.names
    assert f"layer_{depth}" not in problem.space.names
    expected_methods = ("lora", "ia3") if family == "gpt2" else METHODS
    assert problem.methods == expected_methods
    for config in configs_for(problem):
        built = problem.build_model(config, seed=0)
        assert problem.trainable_params(config) == count_trainable(built), config
    if task == "causal-lm":
        assert problem.head_params == 0
    else:
        assert problem.head_params == problem.geometry.hidden * 3 + 3


def test_target_sets_follow_each_family_module_names(checkpoints, table):
    sets = {}
    for family in ("bert", "llama", "gpt2"):
        problem = PeftProblem(model=str(checkpoints[family]), dataset=str(table), text_column="sentence", label_column="y", **TINY)
        sets[family] = {name: [m.name for m in modules] for name, modules in problem.geometry.target_sets().items()}
    assert sets["llama"]["qv"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert sets["llama"]["ffn"] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sets["bert"]["qkvo"] == ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    assert set(sets["gpt2"]) == {"qv", "qkvo", "ffn", "all"}  # fused c_attn: qkv would repeat qv
    assert module_role("output.dense") == "ffn_down" and module_role("attention.output.dense") == "o"


def test_decoder_classifies_with_the_last_token_and_causal_lm_reports_perplexity(checkpoints, table):
    classifier = PeftProblem(model=str(checkpoints["llama"]), dataset=str(table), text_column="sentence", label_column="y",
                             metric="macro_f1", **TINY)
    assert classifier.pooling == "last" and classifier.objective_names[0] == "macro_f1"
    config = classifier.default_config()
    evaluation = classifier.evaluate(config, seed=0)
    assert 0.0 <= evaluation.values["macro_f1"] <= 1.0
    assert evaluation.values["trainable_params"] == count_trainable(classifier.build_model(config, 0))

    lm = PeftProblem(model=str(checkpoints["llama"]), task="causal-lm", dataset=str(table), text_column="sentence",
                     objectives=["perplexity", "trainable_params", "latency_ms"], **TINY)
    assert [o.direction for o in lm.objectives] == ["minimize"] * 3
    config = dict(lm.default_config(), lr=1e-2)
    values = lm.evaluate(config, seed=0).values
    assert 1.0 < values["perplexity"] < 2 * 30522 and values["latency_ms"] > 0  # a random model: about uniform
    assert lm.test_score(config, seed=0) > 1.0


def test_every_table_format_reads_the_same_examples(table, tmp_path):
    import pyarrow as pa

    frame = pd.read_csv(table)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "noext", sep="\t", index=False)  # no suffix: sniffed as TSV
    saved = tmp_path / "saved"  # the layout datasets' save_to_disk writes: Arrow IPC streams
    for split, part in (("train", frame.iloc[:60]), ("validation", frame.iloc[60:75]), ("test", frame.iloc[75:])):
        (saved / split).mkdir(parents=True)
        arrow = pa.Table.from_pandas(part.reset_index(drop=True), preserve_index=False)
        with pa.OSFile(str(saved / split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, arrow.schema) as w:
            w.write_table(arrow)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))

    common = dict(text_column="sentence", label_column="y", **TINY)
    reference = PeftProblem(dataset=str(table), **common).labelled_splits()
    for name in ("t.jsonl", "t.parquet", "t.tsv", "noext"):
        splits = PeftProblem(dataset=str(tmp_path / name), **common).labelled_splits()
        for part in ("train", "val", "test"):
            assert splits[part].texts == reference[part].texts and np.array_equal(splits[part].labels, reference[part].labels)
    splits = PeftProblem(dataset=str(saved), **dict(common, train_size=None)).labelled_splits()
    assert splits["val"].texts == frame["sentence"].iloc[60:75].tolist()  # the saved splits, as given
    assert splits["test"].texts == frame["sentence"].iloc[75:].tolist() and len(splits["train"].texts) == 60


def test_explicit_validation_and_test_files_and_disjoint_carved_splits(table, tmp_path):
    frame = pd.read_csv(table)
    frame.iloc[:20].to_csv(tmp_path / "val.csv", index=False)
    frame.iloc[20:].to_csv(tmp_path / "train.csv", index=False)
    problem = PeftProblem(dataset=str(tmp_path / "train.csv"), val_dataset=str(tmp_path / "val.csv"), text_column="sentence",
                          label_column="y", **dict(TINY, train_size=None, test_size=0.25))
    splits = problem.labelled_splits()
    assert splits["val"].texts == frame["sentence"].iloc[:20].tolist()
    assert len(splits["test"].texts) == round(0.25 * 70) and len(splits["train"].texts) == 70 - 18
    assert problem.classes == ["mid", "neg", "pos"]


@pytest.mark.parametrize("options, names", [
    ({"dataset": "no/such/file.csv"}, ["dataset", "no/such/file.csv", "no such file"]),
    ({"text_column": "body"}, ["text_column", "'body'", "sentence"]),
    ({"label_column": "stars"}, ["label_column", "'stars'", "expected one of its columns"]),
    ({"label_column": "one"}, ["label_column", "'one'", "1 class", "at least 2"]),
    ({"model": "EMPTY_FOLDER"}, ["model", "config.json"]),
    ({"model": "no-such-model-anywhere"}, ["model", "no-such-model-anywhere", "Hugging Face cache"]),
    ({"val_dataset": "UNSEEN"}, ["val_dataset", "never occur", "'zzz'"]),
    ({"train_size": 500}, ["train_size=500", "allowed: train_size <= "]),
    ({"test_size": 1.5}, ["test_size=1.5", "fraction in (0, 1)"]),
    ({"metric": "perplexity"}, ["metric", "'perplexity'", "accuracy"]),
    ({"objectives": ["accuracy", "flops"]}, ["objectives", "flops", "latency_ms"]),
    ({"methods": ["lora", "prefix"]}, ["methods", "prefix", "lokr"]),
    ({"dataset_format": "xlsx"}, ["dataset_format", "xlsx", "parquet"]),
    ({"task": "seq2seq"}, ["task", "seq2seq", "causal-lm"]),
])
def test_bad_input_fails_at_construction_naming_option_value_and_expectation(table, tmp_path, options, names):
    frame = pd.read_csv(table).assign(one="same")
    frame.to_csv(tmp_path / "with_one.csv", index=False)
    frame.assign(y="zzz").iloc[:5].to_csv(tmp_path / "unseen.csv", index=False)
    (tmp_path / "empty_model").mkdir()
    substitutions = {"EMPTY_FOLDER": str(tmp_path / "empty_model"), "UNSEEN": str(tmp_path / "unseen.csv")}
    options = {k: substitutions.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    arguments = dict(TINY, dataset=str(tmp_path / "with_one.csv"), text_column="sentence", label_column="y") | options
    with pytest.raises(ValueError) as error:
        PeftProblem(**arguments)
    for name in names:
        assert name in str(error.value)
    if options.get("dataset") or "column" in next(iter(options)):
        assert isinstance(error.value, DataError)


def _shared_data() -> Path | None:
    import os

    for candidate in (ROOT.parent / "shared" / "data", Path(os.environ.get("QD_SHARED_DATA", "/nonexistent"))):
        if (candidate / "sms_spam" / "SMSSpamCollection").is_file():
            return candidate
    return None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="the shared data folder (../shared/data beside the checkout) is absent")


@needs_shared
def test_sms_spam_by_path_splits_stratified_and_disjoint():
    problem = PeftProblem(dataset=str(SHARED / "sms_spam" / "SMSSpamCollection"), text_column="SMS", label_column="Label",
                          train_size=None, val_size=1000, test_size=0.2, metric="macro_f1")
    splits = problem.labelled_splits()
    assert problem.classes == ["ham", "spam"]
    sizes = {k: len(v.texts) for k, v in splits.items()}
    assert sizes == {"test": 1115, "val": 1000, "train": 5574 - 2115}
    for part in splits.values():  # 747 of 5,574 are spam
        assert abs(part.labels.mean() - 747 / 5574) < 0.01
