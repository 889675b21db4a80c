"""Parameter-efficient fine-tuning of a checkpoint on labelled text: metric vs trainable parameters vs cost.

Each evaluation fine-tunes a checkpoint with one peft adapter (LoRA, (IA)^3, LoHa or LoKr) on a
chosen set of modules in a chosen set of layers and scores it on a fixed validation split. By
default the checkpoint is the packaged all-MiniLM-L6-v2 and the data the vendored BANKING77 (77
intents); the options point it at a user's own checkpoint folder and data file instead:

- ``task="sequence-classification"``: a linear head on the pooled tokens (mean pooling for
  encoders, the last real token for decoders) over the classes of ``label_column``; metric
  ``accuracy`` or ``macro_f1``.
- ``task="causal-lm"``: next-token loss on ``text_column``; metric ``perplexity`` on held-out text.

The layers and the linear modules of one layer are read from the checkpoint (built on the meta
device from its config.json, so no weights are loaded for it): the space has one switch per layer
whatever the depth, and the target sets (query+value, q/k/v, q/k/v/output, feed-forward, all)
are found by module name for BERT-, Llama- and GPT-style layers.

The pipeline is split into reusable functions: ``discover_geometry`` (where adapters can go),
``PeftProblem.labelled_splits`` / ``_split`` (data loading and tokenising), ``PeftProblem.build_model``
(adapter construction), ``train_steps`` (the training loop) and ``PeftProblem.score`` (evaluation).

Trainable parameters are counted analytically (``trainable_params``), so the search gets that
objective for free through ``cheap_values``; tests check the count against the built model for
every method, on checkpoints of several depths and widths.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import resource
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from problems._data import DataError, absolute, class_index, read_table, require_column, split_size, stratified_order
from problems._minilm import load_checkpoint, mean_pool, resolve_checkpoint
from qd.checks import check_bool, check_choice, check_device, check_int, check_number, is_int
from qd.problem import Evaluation, Measure, Objective, Problem, Resources
from qd.space import Bool, Categorical, Config, Float, Int, Space

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(__file__).parent / "data" / "banking77"
THREADS_ENV = "QD_TORCH_THREADS"

TASKS = ("sequence-classification", "causal-lm")
METRICS = {"sequence-classification": ("accuracy", "macro_f1"), "causal-lm": ("perplexity",)}
PRECISIONS = ("auto", "fp32", "bf16")
POOLINGS = ("auto", "mean", "last")
METHODS = ("lora", "ia3", "loha", "lokr")
RANKED_METHODS = ("lora", "loha", "lokr")
#: Methods peft implements for transformers' Conv1D (GPT-2's fused projections) besides nn.Linear.
CONV1D_METHODS = ("lora", "ia3")
COST_OBJECTIVES = ("trainable_params", "train_time_s", "peak_memory_mb", "latency_ms")

# all-MiniLM-L6-v2 geometry (its config.json) and BANKING77's classes: the defaults, and what the
# module-level ``trainable_params`` counts for. A test checks them against the loaded model.
NUM_LAYERS = 6
HIDDEN = 384
INTERMEDIATE = 1536
NUM_CLASSES = 77
HEAD_PARAMS = HIDDEN * NUM_CLASSES + NUM_CLASSES

#: Target-module sets by name, as sets of module roles (``module_role``). Duplicate sets for a
#: model (GPT-2's fused c_attn makes qv == qkv) are dropped from its space.
TARGET_SETS: dict[str, tuple[str, ...] | None] = {
    "qv": ("q", "v", "qkv"),
    "qkv": ("q", "k", "v", "qkv"),
    "qkvo": ("q", "k", "v", "qkv", "o"),
    "ffn": ("ffn_up", "ffn_down"),
    "all": None,  # every linear module of the layer
}

_QKV, _Q, _K, _V = ({"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv"}, {"query", "q_proj", "q_lin", "q"},
                    {"key", "k_proj", "k_lin", "k"}, {"value", "v_proj", "v_lin", "v"})
_FFN_DOWN = {"down_proj", "fc2", "lin2", "wo", "c_proj", "dense_4h_to_h"}


def module_role(name: str) -> str:
    """What a linear module of a layer does, from its name inside the layer.

    q / k / v / qkv (fused) / o inside attention blocks (any other attention linear is its output
    projection); ffn_down for the feed-forward down-projection (BERT's ``output.dense``, Llama's
    ``down_proj``, GPT-2's ``mlp.c_proj``), ffn_up for the other feed-forward linears.
    """
    leaf = name.rsplit(".", 1)[-1].lower()
    if re.search(r"attn|attention", name, re.IGNORECASE) and not name.lower().startswith("mlp"):
        for role, leaves in (("qkv", _QKV), ("q", _Q), ("k", _K), ("v", _V)):
            if leaf in leaves:
                return role
        return "o"
    if name == "output.dense" or leaf in _FFN_DOWN:
        return "ffn_down"
    return "ffn_up"


@dataclass(frozen=True)
class LayerModule:
    """One adaptable module of a layer: its name inside the layer, fan-in, fan-out, role and torch type."""

    name: str
    fan_in: int
    fan_out: int
    role: str
    kind: str  # "Linear" or "Conv1D"


@dataclass(frozen=True)
class Geometry:
    """Where adapters can go in a checkpoint: its list of layers and the linear modules of one layer."""

    num_layers: int
    hidden: int
    layers_path: str  # e.g. "encoder.layer" (BERT), "layers" (Llama's base model), "model.layers" (its LM)
    modules: tuple[LayerModule, ...]
    decoder: bool

    def target_sets(self) -> dict[str, tuple[LayerModule, ...]]:
        """The named target sets this model has, each with its modules; empty and repeated sets dropped."""
        out: dict[str, tuple[LayerModule, ...]] = {}
        for name, roles in TARGET_SETS.items():
            chosen = tuple(m for m in self.modules if roles is None or m.role in roles)
            if chosen and chosen not in out.values():
                out[name] = chosen
        return out

    def methods(self) -> tuple[str, ...]:
        """The adapter methods this model supports (fewer when it has GPT-2-style Conv1D layers)."""
        conv1d = any(m.kind == "Conv1D" for m in self.modules)
        return tuple(m for m in METHODS if not conv1d or m in CONV1D_METHODS)


MINILM_GEOMETRY = Geometry(
    num_layers=NUM_LAYERS, hidden=HIDDEN, layers_path="encoder.layer", decoder=False,
    modules=tuple(LayerModule(name, fan_in, fan_out, module_role(name), "Linear") for name, fan_in, fan_out in (
        ("attention.self.query", HIDDEN, HIDDEN), ("attention.self.key", HIDDEN, HIDDEN),
        ("attention.self.value", HIDDEN, HIDDEN), ("attention.output.dense", HIDDEN, HIDDEN),
        ("intermediate.dense", HIDDEN, INTERMEDIATE), ("output.dense", INTERMEDIATE, HIDDEN))),
)

#: The hand-picked reference configuration: LoRA r=8 (alpha=16) on query and value in every layer.
DEFAULT_CONFIG: Config = {
    "method": "lora",
    "rank": 8,
    "alpha_ratio": 2.0,
    "dropout": 0.1,
    "targets": "qv",
    **{f"layer_{i}": True for i in range(NUM_LAYERS)},
    "lr": 1e-3,
    "steps": 300,
}


def _model_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if task == "causal-lm" else AutoModel


def _is_decoder(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def geometry_of(model: torch.nn.Module, config, source: str = "model") -> Geometry:
    """The geometry of a built model (any device, meta included) whose config is ``config``."""
    from transformers.pytorch_utils import Conv1D

    depth = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if getattr(config, k, None)), None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model", "dim") if getattr(config, k, None)), None)
    if not depth or not hidden:
        raise DataError(f"peft option model={source!r}: its config.json names no layer count (num_hidden_layers) or "
                        f"width (hidden_size); expected a transformer checkpoint")
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    if not lists:
        raise DataError(f"peft option model={source!r}: no list of {depth} layers found in {type(model).__name__}; "
                        f"expected a transformer with its layers in one ModuleList")
    layers_path, layers = min(lists, key=lambda item: len(item[0]))

    def linears(layer: torch.nn.Module) -> tuple[LayerModule, ...]:
        found = []
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                found.append(LayerModule(name, module.in_features, module.out_features, module_role(name), "Linear"))
            elif isinstance(module, Conv1D):  # weight is (in, out)
                found.append(LayerModule(name, module.weight.shape[0], module.weight.shape[1], module_role(name), "Conv1D"))
        return tuple(found)

    modules = linears(layers[0])
    if not modules:
        raise DataError(f"peft option model={source!r}: its layers hold no linear modules to adapt")
    for i, layer in enumerate(layers):
        if linears(layer) != modules:
            raise DataError(f"peft option model={source!r}: layer {i} differs from layer 0; expected identical layers")
    return Geometry(num_layers=int(depth), hidden=int(hidden), layers_path=layers_path, modules=modules,
                    decoder=_is_decoder(config))


def discover_geometry(path: str, task: str) -> Geometry:
    """The geometry of the checkpoint at ``path`` as ``task`` loads it, built on the meta device (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(task).from_config(config)
    return geometry_of(model, config, source=path)


def adapted_layers(config: Mapping[str, Any], num_layers: int = NUM_LAYERS) -> list[int]:
    """Indices of the layers whose modules get an adapter."""
    return [i for i in range(num_layers) if config[f"layer_{i}"]]


def target_regex(config: Mapping[str, Any], geometry: Geometry = MINILM_GEOMETRY) -> str | None:
    """A regex that peft full-matches against module names: the chosen modules of the chosen layers.

    Full names inside the layer, so BERT's "output.dense" never also catches "attention.output.dense"
    (peft's suffix matching would)."""
    layers = adapted_layers(config, geometry.num_layers)
    if not layers:
        return None
    modules = "|".join(re.escape(m.name) for m in geometry.target_sets()[config["targets"]])
    return rf"{re.escape(geometry.layers_path)}\.({'|'.join(map(str, layers))})\.({modules})"


def module_params(method: str, rank: int, module: LayerModule) -> int:
    """Trainable parameters one adapter adds to one module.

    LoRA: A (r x in) and B (out x r). LoHa: two such pairs (a Hadamard product of two low-rank
    products). (IA)^3: one scaling vector over the output features or, for the feed-forward
    down-projection, the input features. LoKr (peft's defaults): out = a*b and in = c*d factorised
    near their square roots; a full (a x c) factor and a (b x d) factor that is low-rank,
    (b x r) + (r x d), when r < max(b, d) / 2.
    """
    fan_in, fan_out = module.fan_in, module.fan_out
    if method == "lora":
        return rank * (fan_in + fan_out)
    if method == "loha":
        return 2 * rank * (fan_in + fan_out)
    if method == "ia3":
        return fan_in if module.role == "ffn_down" else fan_out
    if method == "lokr":
        from peft.tuners.lokr.layer import factorization

        in_m, in_n = factorization(fan_in, -1)
        out_l, out_k = factorization(fan_out, -1)
        second = out_k * in_n if rank >= max(out_k, in_n) / 2 else rank * (out_k + in_n)
        return out_l * in_m + second
    raise ValueError(f"unknown peft method {method!r}; allowed: {list(METHODS)}")


def trainable_params(config: Mapping[str, Any], geometry: Geometry = MINILM_GEOMETRY, head_params: int = HEAD_PARAMS) -> int:
    """Trainable parameters of the model ``config`` builds (adapters + head), without building it."""
    rank = config.get("rank", 0)
    per_layer = sum(module_params(config["method"], rank, m) for m in geometry.target_sets()[config["targets"]])
    return head_params + per_layer * len(adapted_layers(config, geometry.num_layers))


@dataclass
class Encoded:
    """One tokenised split: ids and mask padded to ``max_length``, the real length of each row, labels."""

    input_ids: torch.Tensor  # (n, max_length)
    attention_mask: torch.Tensor  # (n, max_length)
    lengths: np.ndarray  # (n,)
    labels: torch.Tensor  # (n,); zeros for causal-lm

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows as tensors on ``device``.

        On a CPU, trimmed to the longest row: compute scales with length and short texts are cheap.
        On a GPU, full width: a step this small costs its kernel launches whatever the length, and
        one shape means the untimed warm-up step covers every kernel the timed steps use.
        """
        width = int(self.lengths[rows].max()) if device.type == "cpu" else self.input_ids.shape[1]
        index = torch.as_tensor(rows)
        return (
            self.input_ids[index, :width].to(device, non_blocking=True),
            self.attention_mask[index, :width].to(device, non_blocking=True),
            self.labels[index].to(device, non_blocking=True),
        )


@dataclass
class Labelled:
    """A split of a dataset: its texts and their labels."""

    texts: list[str]
    labels: np.ndarray  # (n,) int64 indices into the problem's classes; zeros for causal-lm


def read_split(name: str) -> tuple[list[str], np.ndarray]:
    """Texts and label indices (positions in categories.json) of BANKING77's ``train`` or ``test``."""
    categories = json.loads((DATA_DIR / "categories.json").read_text())
    index = {c: i for i, c in enumerate(categories)}
    # The csv module, not line splitting: some texts hold quoted newlines.
    with open(DATA_DIR / f"{name}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], np.array([index[r["category"]] for r in rows], dtype=np.int64)


def lr_factor(step: int, steps: int) -> float:
    """The learning-rate multiplier at 0-based ``step`` of ``steps``: linear warm-up over 6% of the
    steps, then linear decay to zero at the last step."""
    warmup = max(1, round(0.06 * steps))
    return min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))


def batch_rows(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each training batch over ``n`` examples: shuffled epochs, reshuffled when the
    next batch would run past the end (so every batch has ``min(batch_size, n)`` rows)."""
    rng = np.random.default_rng(seed)
    order, position = rng.permutation(n), 0
    while True:
        if position + batch_size > len(order) and position > 0:  # a new epoch: reshuffle
            order, position = rng.permutation(n), 0
        yield order[position : position + batch_size]
        position += batch_size


class PeftProblem(Problem):
    """Fine-tune a checkpoint (default MiniLM) with LoRA / (IA)^3 / LoHa / LoKr on labelled text (default BANKING77): metric vs trainable parameters vs time."""

    def __init__(
        self,
        model: str | None = None,
        task: str = "sequence-classification",
        dataset: str | None = None,
        dataset_format: str = "auto",
        text_column: str | None = None,
        label_column: str | None = None,
        val_dataset: str | None = None,
        test_dataset: str | None = None,
        train_size: int | None = 2000,
        val_size: int | float = 1000,
        test_size: int | float = 0.2,
        metric: str = "auto",
        objectives: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        max_rank: int = 64,
        pooling: str = "auto",
        precision: str = "auto",
        max_length: int = 32,
        batch_size: int = 32,
        min_steps: int = 50,
        max_steps: int = 1000,
        device: str = "auto",
        gpus_per_eval: float = 0.25,
        data_seed: int = 0,
        population: int = 1,
        population_queue: int = 3,
        population_graphs: bool = True,
    ):
        """Options:

        - ``model``: a local Hugging Face checkpoint folder (config.json, weights, tokenizer) or a model
          name already in the local Hugging Face cache; None: the packaged all-MiniLM-L6-v2.
        - ``task``: "sequence-classification" (encoder or decoder + a linear head) or "causal-lm".
        - ``dataset``: a CSV, TSV, JSON Lines or Parquet file, or a ``save_to_disk`` folder (a
          DatasetDict's train / validation / test splits are used as such); None: the vendored
          BANKING77 (train.csv, and test.csv as the test split). ``dataset_format``: "auto" (by suffix;
          a file without one is sniffed), "csv", "tsv", "jsonl", "parquet" or "arrow".
        - ``text_column`` / ``label_column``: the columns holding the text and (classification) the
          label; default "text" / "label" ("text" / "category" for BANKING77).
        - ``val_dataset`` / ``test_dataset``: explicit validation / test files (same format rules);
          otherwise ``test_size`` then ``val_size`` rows (an integer, or a fraction in (0, 1)) are carved
          from ``dataset`` (stratified by label, fixed by ``data_seed``); ``train_size`` caps the
          training rows drawn from the rest (None: all of them). The parts never overlap.
        - ``metric``: "accuracy" or "macro_f1" (classification), "perplexity" (causal-lm); "auto":
          accuracy, or perplexity.
        - ``objectives``: which to report, from the metric and ``trainable_params`` (analytic,
          cheap), ``train_time_s``, ``peak_memory_mb`` (CUDA peak allocated during training; on a CPU
          the process's peak RSS so far) and ``latency_ms`` (median time of one forward pass over a
          validation batch of ``batch_size``); default: metric, trainable_params, train_time_s.
        - ``methods``: the adapter methods searched (default all the model supports: LoRA, (IA)^3,
          LoHa, LoKr; LoRA and (IA)^3 only for models with GPT-2's Conv1D layers). ``max_rank``: the
          largest rank.
        - ``pooling``: "mean" (encoders), "last" (last real token; decoders) or "auto".
        - ``precision``: "fp32", "bf16" (autocast) or "auto" (bf16 on a GPU, fp32 on a CPU).
        - ``max_length``: tokens kept per text. ``batch_size``: training batch size.
        - ``min_steps`` / ``max_steps``: the range of the ``steps`` parameter, the training-budget knob.
        - ``device``: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
        - ``gpus_per_eval``: the GPU share one evaluation declares when it will run on a GPU.
        - ``data_seed``: fixes which rows form the splits (the evaluation seed only drives
          initialisation, batch order and dropout).

        - ``population``: the most configurations one worker trains at once on one frozen copy of
          the model (``evaluate_population``, see ``problems.peft_population``); 1 trains one at a time.
        - ``population_queue``: with ``population`` P > 1, one worker is handed up to P x this many
          configurations at once (``max_population``); each starts as soon as one of the P that train
          at once finishes, so short trainings do not leave the batch half empty while long ones run
          on. Keep ``workers`` at least ``max_population`` per process for the queue to fill.
        - ``population_graphs``: on a GPU, capture a population's training step once as a CUDA graph
          and replay it (False: launch its kernels one by one each step; results are the same).

        Every path, column and class count is checked here, before any evaluation.
        """
        check_choice(task, "task", "peft", TASKS)
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                 ("min_steps", min_steps, 1), ("data_seed", data_seed, 0), ("max_rank", max_rank, 1),
                                 ("population", population, 1), ("population_queue", population_queue, 1)):
            check_int(value, name, "peft", low=low)
        check_int(train_size, "train_size", "peft", low=1, none=True)
        check_bool(population_graphs, "population_graphs", "peft")
        check_int(max_steps, "max_steps", "peft", low=min_steps)  # at least min_steps
        check_device(device, "device", "peft")
        check_number(gpus_per_eval, "gpus_per_eval", "peft", low=0, low_open=True, high=1)
        check_choice(precision, "precision", "peft", PRECISIONS)
        check_choice(pooling, "pooling", "peft", POOLINGS)
        self.metric = METRICS[task][0] if metric == "auto" else metric
        check_choice(self.metric, "metric", "peft", ("auto",) + METRICS[task])
        self.task = task
        self.model_path = resolve_checkpoint(model, "peft", "model")
        self.dataset, self.dataset_format = dataset, dataset_format
        self.val_dataset, self.test_dataset = val_dataset, test_dataset
        self.text_column = text_column or "text"
        self.label_column = label_column or ("category" if dataset is None else "label")
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.max_length, self.batch_size = max_length, batch_size
        self.precision, self.device_option, self.data_seed = precision, device, data_seed
        self._cache: dict[str, Any] = {}
        self.population, self.population_graphs = population, population_graphs
        self.max_population = population * population_queue if population > 1 else 1

        self.geometry = discover_geometry(self.model_path, task)
        self.pooling = ("last" if self.geometry.decoder else "mean") if pooling == "auto" else pooling
        supported = self.geometry.methods()
        self.methods = tuple(methods) if methods is not None else supported
        if not self.methods or len(set(self.methods)) != len(self.methods) or any(m not in supported for m in self.methods):
            raise ValueError(f"peft option methods={list(self.methods)!r} is not allowed; allowed: distinct names from "
                             f"{list(supported)} (what peft supports for this model)")
        # Reads and checks the data now: paths, columns and classes fail before any evaluation.
        splits, self.classes = self._load_labelled()
        self._cache["labelled"] = (splits, self.classes)
        self.dataset, self.val_dataset, self.test_dataset = map(absolute, (dataset, val_dataset, test_dataset))
        self.head_params = 0 if task == "causal-lm" else self.geometry.hidden * len(self.classes) + len(self.classes)

        ranked = [m for m in self.methods if m in RANKED_METHODS]
        switches = [Bool(f"layer_{i}") for i in range(self.geometry.num_layers)]
        targets = tuple(self.geometry.target_sets())
        params = [Categorical("method", self.methods)]
        if ranked:
            params += [Int("rank", 1, max_rank, log=True, active_if={"method": ranked}),
                       # alpha / rank: the adapter's output scale, decoupled from its rank.
                       Float("alpha_ratio", 0.25, 8.0, log=True, active_if={"method": ranked})]
        if "lora" in self.methods:
            params.append(Float("dropout", 0.0, 0.3, active_if={"method": ["lora"]}))
        self.space = Space([
            *params,
            Categorical("targets", targets),
            *switches,  # all off: only the head trains (a valid, very small model)
            Float("lr", 1e-5, 1e-2, log=True),
            Int("steps", min_steps, max_steps, log=True),
        ])
        self.fidelity = "steps"  # more steps: dearer and more faithful

        names = [self.metric, "trainable_params", "train_time_s"] if objectives is None else list(objectives)
        allowed = [self.metric, *COST_OBJECTIVES]
        if not names or len(set(names)) != len(names) or any(n not in allowed for n in names):
            raise ValueError(f"peft option objectives={names!r} is not allowed; allowed: distinct names from {allowed}")
        self.objective_list = names
        # Hypervolumes in readable units (qd.scaling): costs and perplexity span decades, scores are shares.
        self.objectives = tuple(
            Objective(n, "minimize" if n != self.metric or self.metric == "perplexity" else "maximize",
                      cheap=(n == "trainable_params"),
                      scale="linear" if n == self.metric and self.metric != "perplexity" else "log",
                      bounds=(0.0, 1.0) if n == self.metric and self.metric != "perplexity" else None)
            for n in names
        )
        largest = max(trainable_params({"method": m, "rank": max_rank, "targets": "all", **{s.name: True for s in switches}},
                                       self.geometry, self.head_params) for m in self.methods)
        self.measures = (
            Measure("log10_trainable_params", math.log10(max(self.head_params, 1)), math.log10(largest)),
            Measure("adapted_layers", 0, self.geometry.num_layers, integer=True),
        )
        will_use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.resources = Resources(cpus=1, gpus=float(gpus_per_eval) if will_use_cuda else 0.0, memory_mb=4000)

    # Lazy caches (tokenizer, base model, tokenised splits) stay out of pickles sent to workers.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # --- data ---------------------------------------------------------------------------------
    def _load_labelled(self) -> tuple[dict[str, Labelled], list[str]]:
        """The train / val / test parts and the class names, read from the options' paths."""
        if self.dataset is None and self.val_dataset is None and self.test_dataset is None:
            return self._banking77()
        if self.dataset is None:
            raise DataError("peft option dataset=None (the vendored BANKING77) cannot take val_dataset or test_dataset; "
                            "expected dataset set to your training file")
        frames = read_table(self.dataset, "peft", "dataset", self.dataset_format)
        if "all" in frames:
            pool, given = frames["all"], {}
        else:
            if "train" not in frames:
                raise DataError(f"peft option dataset={self.dataset!r} is a DatasetDict without a 'train' split; "
                                f"its splits: {sorted(frames)}")
            pool = frames["train"]
            given = {part: frames[name] for part, names in (("val", ("validation", "val", "dev")), ("test", ("test",)))
                     for name in names if name in frames}
        for part, option in (("val", "val_dataset"), ("test", "test_dataset")):
            value = getattr(self, option)
            if value is not None:
                given[part] = read_table(value, "peft", option, self.dataset_format)["all"]
        sources = {"pool": (pool, "dataset", self.dataset), **{p: (f, f"{p}_dataset", getattr(self, f"{p}_dataset") or self.dataset)
                                                                for p, f in given.items()}}
        classify = self.task == "sequence-classification"
        for frame, _, where in sources.values():
            require_column(frame, "peft", "text_column", self.text_column, where)
            if classify:
                require_column(frame, "peft", "label_column", self.label_column, where)
        classes: list[str] = []
        if classify:
            classes = class_index(pool[self.label_column].tolist(), "peft", "label_column", self.label_column, self.dataset)
            for part, frame in given.items():
                unseen = sorted({str(v) for v in frame[self.label_column]} - set(classes))
                if unseen:
                    raise DataError(f"peft option {part}_dataset={sources[part][2]!r}: labels {unseen[:5]} of column "
                                    f"{self.label_column!r} never occur in dataset {self.dataset!r}; expected its classes {classes[:10]}")
        index = {c: i for i, c in enumerate(classes)}

        def labelled(frame) -> Labelled:
            texts = [str(t) for t in frame[self.text_column].tolist()]
            labels = (np.array([index[str(v)] for v in frame[self.label_column]], dtype=np.int64) if classify
                      else np.zeros(len(texts), dtype=np.int64))
            return Labelled(texts, labels)

        whole = labelled(pool)
        order = (stratified_order(whole.labels, self.data_seed) if classify
                 else np.random.default_rng(self.data_seed).permutation(len(whole.texts)))
        parts, used = {}, 0
        for part, option in (("test", "test_size"), ("val", "val_size")):
            if part in given:
                parts[part] = labelled(given[part])
                continue
            n = split_size("peft", option, getattr(self, option), len(order))
            parts[part], used = self._take(whole, order[used : used + n]), used + n
        rest = len(order) - used
        n_train = rest if self.train_size is None else self.train_size
        if n_train > rest or rest < 1:
            raise DataError(f"peft options train_size={self.train_size}, val_size={self.val_size}, test_size={self.test_size} "
                            f"need more than the {len(order)} rows of dataset {self.dataset!r}; allowed: train_size <= "
                            f"{max(rest, 0)} with these val_size and test_size (or train_size=None for all the rest)")
        parts["train"] = self._take(whole, order[used : used + n_train])
        return parts, classes

    @staticmethod
    def _take(data: Labelled, rows: np.ndarray) -> Labelled:
        return Labelled([data.texts[i] for i in rows], data.labels[rows])

    def _banking77(self) -> tuple[dict[str, Labelled], list[str]]:
        train_rows = 10_003
        if not (is_int(self.val_size) and self.val_size >= 1):
            raise ValueError(f"peft option val_size={self.val_size!r} is not allowed; allowed: an integer >= 1 for BANKING77")
        train_size = train_rows - self.val_size if self.train_size is None else self.train_size
        if train_size + self.val_size > train_rows:
            raise ValueError(
                f"peft options train_size={self.train_size} + val_size={self.val_size} exceed the {train_rows} "
                f"examples of BANKING77's train.csv; allowed: train_size + val_size <= {train_rows}"
            )
        texts, labels = read_split("train")
        order = stratified_order(labels, self.data_seed)
        test_texts, test_labels = read_split("test")
        parts = {"val": self._take(Labelled(texts, labels), order[: self.val_size]),
                 "train": self._take(Labelled(texts, labels), order[self.val_size : self.val_size + train_size]),
                 "test": Labelled(test_texts, test_labels)}
        return parts, json.loads((DATA_DIR / "categories.json").read_text())

    def labelled_splits(self) -> dict[str, Labelled]:
        """The ``train``, ``val`` and ``test`` texts with their label indices (into ``self.classes``)."""
        if "labelled" not in self._cache:
            self._cache["labelled"] = self._load_labelled()
        return self._cache["labelled"][0]

    def _split(self, name: str) -> Encoded:
        """Tokenised ``train``, ``val`` or ``test`` rows, built once per instance."""
        if name not in self._cache:
            part = self.labelled_splits()[name]
            tokenizer, _ = self._base()
            tokens = tokenizer(part.texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
            self._cache[name] = Encoded(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                lengths=tokens["attention_mask"].sum(dim=1).numpy(),
                labels=torch.as_tensor(part.labels),
            )
        return self._cache[name]

    # --- objectives ------------------------------------------------------------------------
    def trainable_params(self, config: Config) -> int:
        """Exact trainable parameters of ``config`` (validated), counted without building it."""
        return trainable_params(self.space.validate(config), self.geometry, self.head_params)

    def cheap_values(self, config: Config) -> dict[str, float]:
        """Objectives known without training: ``trainable_params`` when it is one ({} otherwise)."""
        if "trainable_params" not in self.objective_list:
            return {}
        return {"trainable_params": float(self.trainable_params(config))}

    def default_config(self) -> Config:
        """The hand-picked reference: LoRA r=8 (alpha 16, dropout 0.1) on query+value (or the first target
        set) of every layer, lr 1e-3, 300 steps (clipped to the steps range)."""
        steps = self.space["steps"]
        targets = self.space["targets"].choices
        config = {"method": "lora", "rank": 8, "alpha_ratio": 2.0, "dropout": 0.1,
                  "targets": "qv" if "qv" in targets else targets[0],
                  **{f"layer_{i}": True for i in range(self.geometry.num_layers)},
                  "lr": 1e-3, "steps": int(min(max(300, steps.low), steps.high))}
        return self.space.validate({k: v for k, v in config.items() if k in self.space.names})

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Fine-tune ``config`` and score it on the validation split.

        Args:
            config: The adapter configuration (validated against the space).
            seed: Seeds the training.

        Returns:
            The objectives in declared order, measures (log10 trainable parameters, adapted
            layers), and metadata (train time, peak memory, ...).

        Raises:
            SpaceError: ``config`` is not in the space.
        """
        config = self.space.validate(config)
        run = self._train(config, seed)
        val = self._split("val")
        measured = {self.metric: self.score(run.model, val, run.device), "train_time_s": run.train_time_s}
        count = self.trainable_params(config)
        measured["trainable_params"] = float(count)
        metadata = run.metadata()
        measured["peak_memory_mb"] = metadata["peak_memory_mb"]
        if "latency_ms" in self.objective_list:
            measured["latency_ms"] = self._latency_ms(run.model, val, run.device)
        return Evaluation(
            values={n: measured[n] for n in self.objective_list},
            measures=[math.log10(max(count, 1)), float(len(adapted_layers(config, self.geometry.num_layers)))],
            metadata=metadata,
        )

    def evaluate_population(self, configs: Sequence[Config], seeds: Sequence[int]) -> list[Evaluation | Exception]:
        """Train the configurations together, one adapter each on one frozen base (``problems.peft_population``)."""
        from problems.peft_population import evaluate_population

        return evaluate_population(self, configs, seeds)

    def test_score(self, config: Config, seed: int) -> float:
        """Train ``config`` exactly as ``evaluate`` does and return its metric on the held-out test split."""
        config = self.space.validate(config)
        run = self._train(config, seed)
        return self.score(run.model, self._split("test"), run.device)

    test_accuracy = test_score  # the name experiments/peft_test_split.py used before other metrics

    # --- model ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device_option == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"peft option device={self.device_option!r} but no CUDA device is available")
        return device

    def _base(self):
        """(tokenizer, CPU base model), loaded once per instance; evaluations copy the model."""
        if "base" not in self._cache:
            with warnings.catch_warnings():  # e.g. a checkpoint without pooler weights: unused here
                warnings.simplefilter("ignore")
                self._cache["base"] = load_checkpoint(self.model_path, _model_class(self.task), "cpu")
        return self._cache["base"]

    def _wrap(self, base: torch.nn.Module) -> torch.nn.Module:
        if self.task == "causal-lm":
            return CausalLM(base)
        return Classifier(base, self.geometry.hidden, len(self.classes), self.pooling)

    def build_model(self, config: Config, seed: int, *, share_base: bool = False) -> torch.nn.Module:
        """The model ``config`` describes, on the CPU: a fresh copy of the checkpoint with its adapter (and,
        for classification, a new head).

        ``share_base``: the copy's frozen tensors share storage with the cached base instead of being
        copied (cheap; for reading the adapter's initial values, never for training the copy itself).
        """
        config = self.space.validate(config)
        _, base = self._base()
        torch.manual_seed(seed)
        memo = {id(t): torch.nn.Parameter(t.detach(), t.requires_grad) for t in base.parameters()} if share_base else None
        backbone = copy.deepcopy(base, memo)
        pattern = target_regex(config, self.geometry)
        if pattern is None:
            backbone.requires_grad_(False)
        else:
            import peft

            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; nothing to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                backbone = peft.get_peft_model(backbone, adapter_config(config, pattern, self.geometry))
        return self._wrap(backbone)

    def _train(self, config: Config, seed: int) -> _TrainedRun:
        _set_threads()
        device = self._device()
        train = self._split("train")
        self._split("val")  # tokenise before the clock starts
        self._warm_up(device, train)

        build_start = time.perf_counter()
        model = self.build_model(config, seed).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        build_time = time.perf_counter() - build_start
        train_time, tail = train_steps(model, train, config["lr"], config["steps"], self.batch_size, seed, device,
                                       self._bf16(device), self._loss)
        if not math.isfinite(tail):
            raise FloatingPointError(f"training diverged: mean loss of the last steps is {tail} (lr={config['lr']})")
        steps = config["steps"]
        return _TrainedRun(model, device, train_time, build_time, steps, steps * self.batch_size / len(train), tail)

    def _bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def _loss(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch: cross-entropy over the classes, or next-token cross-entropy."""
        out = model(input_ids, attention_mask)
        if self.task == "causal-lm":
            return _token_nll(out, input_ids, attention_mask).sum() / attention_mask[:, 1:].sum().clamp(min=1)
        return torch.nn.functional.cross_entropy(out.float(), labels)

    def _warm_up(self, device: torch.device, train: Encoded) -> None:
        """Run one untimed training step per process, so one-off start-up costs (on a GPU the CUDA context,
        cuBLAS handles and kernel loading: seconds) are not charged to the first evaluation's ``train_time_s``."""
        if self._cache.get("warm_device") == str(device):
            return
        cuda_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):  # leave the seeded streams as they were
            model = self._wrap(copy.deepcopy(self._base()[1])).to(device)
            input_ids, attention_mask, labels = train.batch(np.arange(min(self.batch_size, len(train))), device)
            with _autocast(device, self._bf16(device)):
                loss = self._loss(model, input_ids, attention_mask, labels)
            loss.backward()
        del model
        _sync(device)
        self._cache["warm_device"] = str(device)

    # --- evaluation -------------------------------------------------------------------------
    def score(self, model: torch.nn.Module, split: Encoded, device: torch.device, batch_size: int = 256) -> float:
        """The metric of ``model`` on ``split``: accuracy, macro-F1 or perplexity."""
        model.eval()
        by_length = np.argsort(split.lengths, kind="stable")  # batches of similar length pad little
        predictions, nll, tokens = np.empty(len(split), dtype=np.int64), 0.0, 0
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = by_length[start : start + batch_size]
                input_ids, attention_mask, _ = split.batch(rows, device)
                with _autocast(device, self._bf16(device)):
                    out = model(input_ids, attention_mask)
                if self.task == "causal-lm":
                    nll += float(_token_nll(out, input_ids, attention_mask).sum())
                    tokens += int(attention_mask[:, 1:].sum())
                else:
                    predictions[rows] = out.argmax(dim=-1).cpu().numpy()
        if self.task == "causal-lm":
            return math.exp(nll / max(tokens, 1))
        labels = split.labels.numpy()
        if self.metric == "accuracy":
            return float((predictions == labels).mean())
        return macro_f1(labels, predictions, len(self.classes))

    _accuracy = score  # the name used before other metrics

    def _latency_ms(self, model: torch.nn.Module, split: Encoded, device: torch.device, repeats: int = 5) -> float:
        """Median time of one forward pass over ``batch_size`` validation rows, after one warm-up pass."""
        model.eval()
        input_ids, attention_mask, _ = split.batch(np.arange(min(self.batch_size, len(split))), device)
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                _sync(device)
                started = time.perf_counter()
                with _autocast(device, self._bf16(device)):
                    model(input_ids, attention_mask)
                _sync(device)
                if i:
                    times.append(1000.0 * (time.perf_counter() - started))
        return float(np.median(times))


def train_steps(model: torch.nn.Module, train: Encoded, lr: float, steps: int, batch_size: int, seed: int,
                device: torch.device, bf16: bool, loss_fn) -> tuple[float, float]:
    """AdamW on ``model``'s trainable parameters for ``steps`` batches (linear warm-up over 6 % of the steps,
    then linear decay to zero); batches drawn without replacement, reshuffled each epoch.

    Args:
        loss_fn: ``(model, input_ids, attention_mask, labels) -> scalar loss``.

    Returns:
        (training seconds, mean loss of the last 10 steps).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    batches = batch_rows(len(train), batch_size, seed)
    losses: list[torch.Tensor] = []
    model.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        input_ids, attention_mask, labels = train.batch(next(batches), device)
        with _autocast(device, bf16):
            loss = loss_fn(model, input_ids, attention_mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach().float())
    _sync(device)
    return time.perf_counter() - start, torch.stack(losses[-10:]).mean().item()


def macro_f1(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over the classes present in ``labels`` or ``predictions`` of each class's F1."""
    present = np.union1d(labels, predictions)
    scores = []
    for c in present:
        tp = np.sum((predictions == c) & (labels == c))
        fp, fn = np.sum((predictions == c) & (labels != c)), np.sum((predictions != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of each next real token, zero at padding: shape (batch, length - 1)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll * attention_mask[:, 1:].to(nll.dtype)


def gpu_total(device: torch.device) -> dict[str, float]:
    """``{"gpu_total_mb": ...}`` on a GPU (what ``evaluators.packing`` packs against), else nothing."""
    if device.type != "cuda":
        return {}
    return {"gpu_total_mb": round(torch.cuda.get_device_properties(device).total_memory / 2**20, 1)}


@dataclass
class _TrainedRun:
    model: torch.nn.Module
    device: torch.device
    train_time_s: float
    build_time_s: float
    steps: int
    epochs: float
    final_loss: float

    def metadata(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak_mb, source = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_memory_allocated"
        else:  # ru_maxrss is in KiB on Linux; it is the process's peak so far, not this evaluation's alone
            peak_mb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        return {
            "device": str(self.device),
            "peak_memory_mb": round(peak_mb, 1),
            "peak_memory_source": source,
            **gpu_total(self.device),
            "build_time_s": round(self.build_time_s, 3),
            "steps": self.steps,
            "epochs": round(self.epochs, 3),
            "final_train_loss": round(self.final_loss, 4),
        }


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(b, t, h) token states -> (b, h): the mean over real tokens, or the last real token ("last").

    Args:
        hidden: the encoder's last hidden states.
        attention_mask: (b, t), 1 for real tokens (right padding).
        pooling: "mean" or "last".
    """
    if pooling == "last":  # right padding: the last real token of each row
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return mean_pool(hidden, attention_mask)


class Classifier(torch.nn.Module):
    """A backbone (possibly wrapped by peft) -> pooling (mean of the real tokens, or the last one) -> linear head."""

    def __init__(self, encoder: torch.nn.Module, hidden: int = HIDDEN, num_classes: int = NUM_CLASSES, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = torch.nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (batch, classes) from token ids and mask of shape (batch, length)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling).to(self.head.weight.dtype))


MiniLMClassifier = Classifier  # the name before other checkpoints


class CausalLM(torch.nn.Module):
    """A causal LM (possibly wrapped by peft) whose forward returns its logits, shape (batch, length, vocab)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, length, vocab) from token ids and mask of shape (batch, length)."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def adapter_config(config: Config, pattern: str, geometry: Geometry = MINILM_GEOMETRY):
    """The peft config of ``config``'s method, on the modules ``pattern`` full-matches."""
    import peft

    method, rank = config["method"], config.get("rank")
    if method == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=config["alpha_ratio"] * rank, lora_dropout=config["dropout"],
                               target_modules=pattern, bias="none",
                               fan_in_fan_out=any(m.kind == "Conv1D" for m in geometry.modules))
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=config["alpha_ratio"] * rank, target_modules=pattern)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=config["alpha_ratio"] * rank, target_modules=pattern)
    down = "|".join(re.escape(m.name) for m in geometry.modules if m.role == "ffn_down") or "$^"
    return peft.IA3Config(target_modules=pattern, fan_in_fan_out=any(m.kind == "Conv1D" for m in geometry.modules),
                          feedforward_modules=rf"{re.escape(geometry.layers_path)}\.\d+\.({down})")


def _set_threads() -> None:
    threads = os.environ.get(THREADS_ENV)
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"environment variable {THREADS_ENV}={threads!r} is not allowed; allowed: an integer >= 1")
        torch.set_num_threads(int(threads))


def _autocast(device: torch.device, bf16: bool = True):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
