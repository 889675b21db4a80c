"""Parameter-efficient fine-tuning of MiniLM on BANKING77 intent detection (77 classes).

Each evaluation fine-tunes all-MiniLM-L6-v2 with one peft adapter (LoRA, (IA)^3 or LoHa) on a
chosen set of modules in a chosen set of layers, plus a linear head on the mean-pooled tokens, and
reports validation accuracy, the number of trainable parameters and the training time. The
validation split is carved from train.csv with a fixed ``data_seed``, so every evaluation of a run
is scored on the same examples; test.csv is kept for re-scoring the final set (``test_accuracy``).

Trainable parameters are counted analytically (``trainable_params``), so the search gets that
objective for free through ``cheap_values``; a test checks the count against the built model.
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from problems._minilm import load_minilm, mean_pool
from qd.problem import Evaluation, Measure, Objective, Problem, Resources
from qd.space import Bool, Categorical, Config, Float, Int, Space

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_DIR = Path(__file__).parent / "data" / "banking77"
THREADS_ENV = "QD_TORCH_THREADS"

# all-MiniLM-L6-v2 geometry (its config.json); the analytic parameter count relies on it and a test
# checks it against the loaded model.
NUM_LAYERS = 6
HIDDEN = 384
INTERMEDIATE = 1536
NUM_CLASSES = 77

METHODS = ("lora", "ia3", "loha")
RANKED_METHODS = ("lora", "loha")

#: Linear modules inside one encoder layer: (name relative to the layer, in_features, out_features).
LAYER_MODULES: dict[str, tuple[int, int]] = {
    "attention.self.query": (HIDDEN, HIDDEN),
    "attention.self.key": (HIDDEN, HIDDEN),
    "attention.self.value": (HIDDEN, HIDDEN),
    "attention.output.dense": (HIDDEN, HIDDEN),
    "intermediate.dense": (HIDDEN, INTERMEDIATE),
    "output.dense": (INTERMEDIATE, HIDDEN),
}
#: The FFN down-projection: (IA)^3 scales its input (the FFN activations) rather than its output.
FEEDFORWARD_MODULE = "output.dense"

#: Target-module sets by name. Full names relative to the layer, so "output.dense" never also
#: catches "attention.output.dense" (peft's suffix matching would).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("attention.self.query", "attention.self.value"),
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "qkvo": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "ffn": ("intermediate.dense", "output.dense"),
    "all": tuple(LAYER_MODULES),
}

HEAD_PARAMS = HIDDEN * NUM_CLASSES + NUM_CLASSES

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


def adapted_layers(config: Mapping[str, Any]) -> list[int]:
    """Indices of the encoder layers whose modules get an adapter."""
    return [i for i in range(NUM_LAYERS) if config[f"layer_{i}"]]


def target_regex(config: Mapping[str, Any]) -> str | None:
    """A regex that peft full-matches against module names: the chosen modules of the chosen layers."""
    layers = adapted_layers(config)
    if not layers:
        return None
    modules = "|".join(re.escape(m) for m in TARGET_SETS[config["targets"]])
    return rf"encoder\.layer\.({'|'.join(map(str, layers))})\.({modules})"


def trainable_params(config: Mapping[str, Any]) -> int:
    """Trainable parameters of the model ``config`` builds (adapters + head), without building it.

    LoRA adds A (r x in) and B (out x r); LoHa two such pairs (a Hadamard product of two low-rank
    products); (IA)^3 one scaling vector, over the output features or, for the FFN down-projection,
    the input features.
    """
    per_layer = 0
    for module in TARGET_SETS[config["targets"]]:
        fan_in, fan_out = LAYER_MODULES[module]
        if config["method"] == "lora":
            per_layer += config["rank"] * (fan_in + fan_out)
        elif config["method"] == "loha":
            per_layer += 2 * config["rank"] * (fan_in + fan_out)
        else:  # ia3
            per_layer += fan_in if module == FEEDFORWARD_MODULE else fan_out
    return HEAD_PARAMS + per_layer * len(adapted_layers(config))


@dataclass
class Encoded:
    """One tokenised split: ids and mask padded to ``max_length``, the real length of each row, labels."""

    input_ids: torch.Tensor  # (n, max_length)
    attention_mask: torch.Tensor  # (n, max_length)
    lengths: np.ndarray  # (n,)
    labels: torch.Tensor  # (n,)

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


def read_split(name: str) -> tuple[list[str], np.ndarray]:
    """Texts and label indices (positions in categories.json) of ``train`` or ``test``."""
    categories = json.loads((DATA_DIR / "categories.json").read_text())
    index = {c: i for i, c in enumerate(categories)}
    # The csv module, not line splitting: some texts hold quoted newlines.
    with open(DATA_DIR / f"{name}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], np.array([index[r["category"]] for r in rows], dtype=np.int64)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the examples whose every prefix keeps the class proportions.

    Each example's key is its (shuffled) rank within its class divided by the class size, so taking
    the first n rows samples every class in proportion, even when n is below the number of classes.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keys[rng.permutation(members)] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


class PeftProblem(Problem):
    """Fine-tune MiniLM with LoRA / (IA)^3 / LoHa adapters on BANKING77: accuracy vs trainable parameters vs time."""

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 1000,
        max_length: int = 32,
        batch_size: int = 32,
        min_steps: int = 50,
        max_steps: int = 1000,
        device: str = "auto",
        gpus_per_eval: float = 0.25,
        data_seed: int = 0,
    ):
        """Options:

        - ``train_size`` / ``val_size``: examples drawn (stratified, fixed by ``data_seed``) from
          train.csv's 10,003 for training and for the validation accuracy; the two never overlap.
        - ``max_length``: tokens kept per text (BANKING77 texts are short: 32 keeps almost all).
        - ``batch_size``: training batch size.
        - ``min_steps`` / ``max_steps``: the range of the ``steps`` parameter, the training-budget
          knob (a cap: lower ``max_steps`` for quick CPU runs).
        - ``device``: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
        - ``gpus_per_eval``: the GPU share one evaluation declares when it will run on a GPU.
        - ``data_seed``: fixes which rows form the training and validation sets (the evaluation
          seed only drives initialisation, batch order and dropout).
        """
        train_rows = 10_003
        for name, value, low in (("train_size", train_size, 1), ("val_size", val_size, 1),
                                 ("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                 ("min_steps", min_steps, 1), ("data_seed", data_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"peft option {name}={value!r} is not allowed; allowed: an integer >= {low}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < min_steps:
            raise ValueError(f"peft option max_steps={max_steps!r} is not allowed; allowed: an integer >= min_steps={min_steps}")
        if train_size + val_size > train_rows:
            raise ValueError(
                f"peft options train_size={train_size} + val_size={val_size} exceed the {train_rows} "
                f"examples of BANKING77's train.csv; allowed: train_size + val_size <= {train_rows}"
            )
        if not (device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(device))):
            raise ValueError(f"peft option device={device!r} is not allowed; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if isinstance(gpus_per_eval, bool) or not isinstance(gpus_per_eval, (int, float)) or not 0 < gpus_per_eval <= 1:
            raise ValueError(f"peft option gpus_per_eval={gpus_per_eval!r} is not allowed; allowed: a number in (0, 1]")
        self.train_size, self.val_size = train_size, val_size
        self.max_length, self.batch_size = max_length, batch_size
        self.device_option, self.data_seed = device, data_seed

        layer_switches = [Bool(f"layer_{i}") for i in range(NUM_LAYERS)]
        self.space = Space([
            Categorical("method", METHODS),
            Int("rank", 1, 64, log=True, active_if={"method": RANKED_METHODS}),
            # alpha / rank: the adapter's output scale, decoupled from its rank.
            Float("alpha_ratio", 0.25, 8.0, log=True, active_if={"method": RANKED_METHODS}),
            Float("dropout", 0.0, 0.3, active_if={"method": ["lora"]}),
            Categorical("targets", tuple(TARGET_SETS)),
            *layer_switches,  # all off: only the head trains (a valid, very small model)
            Float("lr", 1e-5, 1e-2, log=True),
            Int("steps", min_steps, max_steps, log=True),
        ])
        self.fidelity = "steps"  # more steps: dearer and more faithful
        self.objectives = (
            Objective("accuracy", "maximize"),
            Objective("trainable_params", "minimize", cheap=True),
            Objective("train_time_s", "minimize"),
        )
        largest = max(
            trainable_params({"method": m, "rank": 64, "targets": "all", **{s.name: True for s in layer_switches}})
            for m in METHODS
        )
        self.measures = (
            Measure("log10_trainable_params", math.log10(HEAD_PARAMS), math.log10(largest)),
            Measure("adapted_layers", 0, NUM_LAYERS, integer=True),
        )
        will_use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.resources = Resources(cpus=1, gpus=float(gpus_per_eval) if will_use_cuda else 0.0, memory_mb=4000)
        self._cache: dict[str, Any] = {}

    # Lazy caches (tokenizer, base model, tokenised splits) stay out of pickles sent to workers.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # --- objectives ------------------------------------------------------------------------
    def cheap_values(self, config: Config) -> dict[str, float]:
        return {"trainable_params": float(trainable_params(self.space.validate(config)))}

    def evaluate(self, config: Config, seed: int) -> Evaluation:
        config = self.space.validate(config)
        run = self._train(config, seed)
        accuracy = self._accuracy(run.model, self._split("val"), run.device)
        count = trainable_params(config)
        return Evaluation(
            values={"accuracy": accuracy, "trainable_params": float(count), "train_time_s": run.train_time_s},
            measures=[math.log10(count), float(len(adapted_layers(config)))],
            metadata=run.metadata(),
        )

    def test_accuracy(self, config: Config, seed: int) -> float:
        """Train ``config`` exactly as ``evaluate`` does and return its accuracy on test.csv (3,080 examples)."""
        config = self.space.validate(config)
        run = self._train(config, seed)
        return self._accuracy(run.model, self._split("test"), run.device)

    # --- data and model ---------------------------------------------------------------------
    def _device(self) -> torch.device:
        if self.device_option == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"peft option device={self.device_option!r} but no CUDA device is available")
        return device

    def _base(self):
        """(tokenizer, CPU base encoder), loaded once per instance; evaluations copy the encoder."""
        if "base" not in self._cache:
            tokenizer, encoder = load_minilm("cpu")
            self._cache["base"] = (tokenizer, encoder)
        return self._cache["base"]

    def _split(self, name: str) -> Encoded:
        """Tokenised ``train``, ``val`` or ``test`` rows, built once per instance."""
        if name not in self._cache:
            if name == "test":
                texts, labels = read_split("test")
            else:
                all_texts, all_labels = read_split("train")
                order = stratified_order(all_labels, self.data_seed)
                rows = order[: self.val_size] if name == "val" else order[self.val_size : self.val_size + self.train_size]
                texts, labels = [all_texts[i] for i in rows], all_labels[rows]
            tokenizer, _ = self._base()
            tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
            self._cache[name] = Encoded(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                lengths=tokens["attention_mask"].sum(dim=1).numpy(),
                labels=torch.as_tensor(labels),
            )
        return self._cache[name]

    def build_model(self, config: Config, seed: int) -> MiniLMClassifier:
        """The classifier ``config`` describes, on the CPU: a fresh copy of MiniLM with its adapter, and a new head."""
        config = self.space.validate(config)
        _, base = self._base()
        torch.manual_seed(seed)
        encoder = copy.deepcopy(base)
        pattern = target_regex(config)
        if pattern is None:
            encoder.requires_grad_(False)
        else:
            import peft

            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; nothing to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                encoder = peft.get_peft_model(encoder, _adapter_config(config, pattern))
        return MiniLMClassifier(encoder)

    def _train(self, config: Config, seed: int) -> _TrainedRun:
        threads = os.environ.get(THREADS_ENV)
        if threads:
            if not threads.isdigit() or int(threads) < 1:
                raise ValueError(f"environment variable {THREADS_ENV}={threads!r} is not allowed; allowed: an integer >= 1")
            torch.set_num_threads(int(threads))
        device = self._device()
        train = self._split("train")
        self._split("val")  # tokenise before the clock starts
        self._warm_up(device, train)

        build_start = time.perf_counter()
        model = self.build_model(config, seed).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.0)
        steps = config["steps"]
        warmup = max(1, round(0.06 * steps))
        # Linear warm-up, then linear decay to zero at the last step.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        build_time = time.perf_counter() - build_start

        rng = np.random.default_rng(seed)
        order, position = rng.permutation(len(train)), 0
        losses: list[float] = []
        model.train()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            if position + self.batch_size > len(order) and position > 0:  # a new epoch: reshuffle
                order, position = rng.permutation(len(train)), 0
            rows = order[position : position + self.batch_size]
            position += self.batch_size
            input_ids, attention_mask, labels = train.batch(rows, device)
            with _autocast(device):
                logits = model(input_ids, attention_mask)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        _sync(device)
        train_time = time.perf_counter() - start
        tail = torch.stack(losses[-10:]).float().mean().item()
        if not math.isfinite(tail):
            raise FloatingPointError(f"training diverged: mean loss of the last steps is {tail} (lr={config['lr']})")
        return _TrainedRun(model, device, train_time, build_time, steps, steps * self.batch_size / len(train), tail)

    def _warm_up(self, device: torch.device, train: Encoded) -> None:
        """Run one untimed training step per process, so one-off start-up costs (on a GPU the CUDA context,
        cuBLAS handles and kernel loading: seconds) are not charged to the first evaluation's ``train_time_s``."""
        if self._cache.get("warm_device") == str(device):
            return
        cuda_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):  # leave the seeded streams as they were
            model = MiniLMClassifier(copy.deepcopy(self._base()[1])).to(device)
            input_ids, attention_mask, labels = train.batch(np.arange(min(self.batch_size, len(train))), device)
            with _autocast(device):
                logits = model(input_ids, attention_mask)
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        del model
        _sync(device)
        self._cache["warm_device"] = str(device)

    @staticmethod
    def _accuracy(model: torch.nn.Module, split: Encoded, device: torch.device, batch_size: int = 256) -> float:
        model.eval()
        correct = 0
        by_length = np.argsort(split.lengths, kind="stable")  # batches of similar length pad little
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = by_length[start : start + batch_size]
                input_ids, attention_mask, labels = split.batch(rows, device)
                with _autocast(device):
                    logits = model(input_ids, attention_mask)
                correct += int((logits.argmax(dim=-1) == labels).sum())
        return correct / len(split)


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
            "build_time_s": round(self.build_time_s, 3),
            "steps": self.steps,
            "epochs": round(self.epochs, 3),
            "final_train_loss": round(self.final_loss, 4),
        }


class MiniLMClassifier(torch.nn.Module):
    """MiniLM (possibly wrapped by peft) -> mean pooling -> linear head over the 77 intents."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(HIDDEN, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


def _adapter_config(config: Config, pattern: str):
    import peft

    if config["method"] == "lora":
        return peft.LoraConfig(r=config["rank"], lora_alpha=config["alpha_ratio"] * config["rank"],
                               lora_dropout=config["dropout"], target_modules=pattern, bias="none")
    if config["method"] == "loha":
        return peft.LoHaConfig(r=config["rank"], alpha=config["alpha_ratio"] * config["rank"], target_modules=pattern)
    return peft.IA3Config(target_modules=pattern, feedforward_modules=rf"encoder\.layer\.\d+\.{re.escape(FEEDFORWARD_MODULE)}")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


