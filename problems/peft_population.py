"""Population-batched PEFT: several configurations trained at once on one frozen copy of the model.

A GPU step of one small adapter training is mostly kernel launches and Python; the arithmetic is a
few percent of the chip. Training P configurations in one pass shares all of that: each step stacks
the members' batches into one batch (member i owns rows ``i*b .. (i+1)*b``), runs the frozen encoder
once over it, and at every adapted linear layer adds each member's own adapter to that member's rows
only:

- (IA)^3, LoHa and LoKr merged into one weight per lane, ``diag(l_out) (W diag(l_in) + delta)``
  (LoHa and LoKr form each member's full weight, as peft does; (IA)^3 vectors are ones for the
  members that do not use them), so the layer is one batched product over all lanes (``MERGED``);
- LoRA through two thin batched products on its members' rows (ranks padded with zeros to the
  largest of their group, ``rank_bucket``: a zero row of ``A`` facing a zero column of ``B`` gets
  zero gradient and stays zero, so the padding changes nothing), its dropout on the adapter's input.

Each member keeps its own head, learning rate and schedule, number of steps, batch order and AdamW
state (one flat buffer for all members, with per-element step sizes). A member that has done its steps
leaves the batch (its rows stay, with step size zero); the others go on. The members' mean losses are summed into one backward pass: no
trainable tensor is shared and every row of the batch is computed independently (attention and layer
norm work within one example), so each member gets exactly the gradient it gets alone.

Everything a member's training depends on comes from the one-at-a-time path in ``problems.peft``: its
initial adapter and head (``PeftProblem.build_model`` with the same seed), its batches
(``batch_rows``) and its schedule (``lr_factor``). ``tests/test_peft_population.py`` checks on the CPU
that the trained models equal those of ``PeftProblem.evaluate`` up to floating-point tolerance (with
dropout off: with dropout on, the masks are drawn from one random stream for the whole batch, so
results are equal in distribution rather than bit for bit).

``train_time_s`` of a member is its share of the population's training time: the time between two
changes of the set of members in training, divided among the members that were training then. Peak memory is the population's.

Members whose adapters this module does not know (a peft method or option other than plain LoRA,
LoHa, LoKr and (IA)^3 on linear layers) are trained one at a time in the same process, as
is every member of a problem the batched pass does not cover (``batchable``): causal-lm, GPT-2-style
Conv1D layers, or a ``latency_ms`` objective (a latency is a lone model's).
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from problems.peft import (Encoded, _autocast, _set_threads, _sync, adapted_layers, batch_rows, gpu_total, lr_factor,
                           macro_f1, pool)
from qd.problem import Evaluation
from qd.space import Config

#: AdamW's defaults, as ``problems.peft`` uses them (weight decay 0).
BETAS, EPS = (0.9, 0.999), 1e-8
#: Rows per member in a validation forward pass: about this many rows in all.
VAL_ROWS = 4096
PEFT_PREFIX = "base_model.model."


class Unsupported(ValueError):
    """A built model with an adapter this module cannot batch (it is then trained alone)."""


# --- what one member contributes ------------------------------------------------------------------
@dataclass
class _Adapter:
    """One member's adapter at one linear layer, as built by peft: its method, tensors and scale."""

    method: str  # "lora" | "loha" | "lokr" | "ia3"
    # lora: A (r, in), B (out, r); loha: w1a (out, r), w1b (r, in), w2a, w2b; ia3: l (dim,);
    # lokr: w1 (a, c) and either w2 (b, d) or w2a (b, r), w2b (r, d), for a weight kron(w1, w2) of (a*b, c*d)
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0
    dropout: float = 0.0
    feedforward: bool = False  # ia3: scales the layer's input rather than its output

    @property
    def rank(self) -> int:
        return {"lora": lambda t: t["A"].shape[0], "loha": lambda t: t["w1b"].shape[0],
                "lokr": lambda t: t["w2b"].shape[0] if "w2b" in t else 0}.get(self.method, lambda t: 0)(self.tensors)


def read_adapters(model: torch.nn.Module) -> dict[str, _Adapter]:
    """The adapters of a model built by ``PeftProblem.build_model``, by base-module name.

    Raises:
        Unsupported: a trainable tensor that is not part of a plain LoRA, LoHa, LoKr or (IA)^3 linear
            adapter or of the head.
    """
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.loha.layer import Linear as LoHaLinear
    from peft.tuners.lokr.layer import Linear as LoKrLinear
    from peft.tuners.lora.layer import Linear as LoraLinear

    adapters: dict[str, _Adapter] = {}
    covered: set[int] = {id(p) for p in model.head.parameters()}
    for name, module in model.encoder.named_modules():
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if isinstance(module, LoraLinear):
            if module.lora_variant or any(module.lora_bias.values()) or module.merged or module.fan_in_fan_out:
                raise Unsupported(f"{key}: a LoRA variant (DoRA, bias, merged or fan-in-fan-out)")
            dropout = module.lora_dropout["default"]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            adapters[key] = _Adapter("lora", {"A": a.detach(), "B": b.detach()}, float(module.scaling["default"]),
                                     float(getattr(dropout, "p", 0.0)))
            covered |= {id(a), id(b)}
        elif isinstance(module, LoHaLinear):
            if "default" in module.hada_t1 or module.rank_dropout["default"] or module.module_dropout["default"]:
                raise Unsupported(f"{key}: a LoHa option (CP decomposition, rank or module dropout)")
            ws = {k: getattr(module, f"hada_{k[:2]}_{k[2]}")["default"] for k in ("w1a", "w1b", "w2a", "w2b")}
            adapters[key] = _Adapter("loha", {k: w.detach() for k, w in ws.items()}, float(module.scaling["default"]))
            covered |= {id(w) for w in ws.values()}
        elif isinstance(module, LoKrLinear):
            if ("default" in module.lokr_w1_a or "default" in module.lokr_t2 or module.rank_dropout["default"]
                    or module.module_dropout["default"]):
                raise Unsupported(f"{key}: a LoKr option (decomposed w1, CP decomposition, rank or module dropout)")
            ws = {"w1": module.lokr_w1["default"]}
            if "default" in module.lokr_w2:
                ws["w2"] = module.lokr_w2["default"]
            else:
                ws.update(w2a=module.lokr_w2_a["default"], w2b=module.lokr_w2_b["default"])
            adapters[key] = _Adapter("lokr", {k: w.detach() for k, w in ws.items()}, float(module.scaling["default"]))
            covered |= {id(w) for w in ws.values()}
        elif isinstance(module, IA3Linear):
            vector = module.ia3_l["default"]
            adapters[key] = _Adapter("ia3", {"l": vector.detach().flatten()}, feedforward=bool(module.is_feedforward))
            covered.add(id(vector))
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise Unsupported(f"trainable tensors outside LoRA/LoHa/LoKr/(IA)^3 linear adapters: {stray[:3]}")
    return adapters


# --- the population's parameters ------------------------------------------------------------------
class _Flat:
    """All trainable tensors of a population in one flat buffer, with their AdamW state.

    A block holds one row per member in its ``slots`` (all members, or those using one method at one
    layer); a row that a member does not train is frozen (ones for an unused (IA)^3 vector: it changes
    nothing). ``leaf(block)`` is the block as a leaf tensor whose storage and gradient are slices of the
    flat buffers, so the optimiser updates everything with a few whole-buffer operations (one leaf per
    block rather than views of one leaf: a slice's backward would fill a buffer-sized tensor of zeros
    for every block). ``owner`` names, per element, the member whose step size moves it (``slots``:
    none); a member that has done its steps gets step size zero, so its rows keep their final values.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.initial: list[tuple[torch.Tensor, list[int], list[bool]]] = []  # values (k, ...), row slots, trained
        self.leaves: list[torch.Tensor] = []

    def take(self, values: torch.Tensor, slots: Sequence[int], trained: Sequence[bool] | None = None) -> int:
        """Add a block ``values`` (k, ...) whose row j belongs to member ``slots[j]`` (and is frozen where
        ``trained[j]`` is false). Returns its id."""
        self.initial.append((values.float(), list(slots), list(trained) if trained is not None else [True] * len(slots)))
        return len(self.initial) - 1

    def finish(self, device: torch.device) -> None:
        self.data = torch.cat([v.reshape(-1) for v, _, _ in self.initial]).to(device)
        self.grad = torch.zeros_like(self.data)
        self.exp_avg = torch.zeros_like(self.data)
        self.exp_avg_sq = torch.zeros_like(self.data)
        owner = [np.repeat(np.where(trained, slots, self.slots), v[0].numel()) for v, slots, trained in self.initial]
        self.owner = torch.as_tensor(np.concatenate(owner).astype(np.int64), device=device)
        offset = 0
        for values, _, _ in self.initial:
            end = offset + values.numel()
            leaf = self.data[offset:end].view(values.shape).requires_grad_(True)
            leaf.grad = self.grad[offset:end].view(values.shape)  # backward accumulates into it in place
            self.leaves.append(leaf)
            offset = end
        self.initial = []

    def leaf(self, block: int) -> torch.Tensor:
        return self.leaves[block]


def rank_bucket(rank: int) -> int:
    """Which group of its method and layer a LoRA / LoHa / LoKr adapter joins: 0 for a full LoKr
    factor (and (IA)^3), 1 for any rank; each group is padded to its largest rank.

    A population's step is bound by its kernels, not its arithmetic: every group adds a dozen or more
    kernels forward and backward, and a step is the same kernels whatever it computes. With groups at
    every power of 4, 96 members made about 430 groups and a step of 32 lanes took 260 ms on one
    H200 (launched from Python, the GPU 32% busy); two rank sizes (up to 8, above) made 199 groups
    for 48 members, one size 137 (27% fewer kernels per step), for 1.5x the parameters and optimiser
    state (20 M values for 48 members: a few elementwise passes of a few MB each per step).
    """
    return 0 if rank <= 0 else 1


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


@dataclass
class _Group:
    """One method's adapters at one linear layer: block ids, the members with a row, their scales.

    LoRA and LoHa blocks hold rows only for the members that use the method there (their rows of the
    batch are gathered); an (IA)^3 block holds a row for every member (ones for the others: scaling by
    them changes nothing and costs one elementwise product).
    """

    method: str
    blocks: dict[str, int]
    slots: list[int]  # members with a row, in order
    scale: list[float]  # (k,); 0 for members without this adapter
    dropout: list[float]  # (k,)
    has_dropout: bool
    feedforward: bool = False

    @classmethod
    def build(cls, method: str, adapters: dict[int, _Adapter], slots: int, flat: _Flat, device: torch.device) -> _Group:
        rows = list(range(slots)) if method == "ia3" else sorted(adapters)
        trained = [s in adapters for s in rows] + [False]  # + the frozen padding row (``dummy``)
        some = next(iter(adapters.values()))
        if method == "ia3":
            dim = some.tensors["l"].shape[0]
            blocks = {"l": flat.take(torch.stack([adapters[s].tensors["l"] if s in adapters else torch.ones(dim)
                                                  for s in rows] + [torch.ones(dim)]), rows + [slots], trained)}
        else:
            rank = max(a.rank for a in adapters.values())
            names = {"lora": ["A", "B"], "loha": ["w1a", "w1b", "w2a", "w2b"]}.get(method, list(some.tensors))
            blocks = {}
            for n in names:
                first = some.tensors[n]
                if method == "lokr" and n in ("w1", "w2"):  # full factors: one shape per layer
                    shape = tuple(first.shape)
                else:  # ranked factors, zero-padded to the group's rank
                    shape = (rank, first.shape[1]) if n in ("A", "w1b", "w2b") else (first.shape[0], rank)
                stacked = torch.stack([_pad(adapters[s].tensors[n].float(), shape) for s in rows] + [torch.zeros(shape)])
                blocks[n] = flat.take(stacked, rows + [slots], trained)
        scale = [adapters[s].scale if s in adapters else 0.0 for s in rows]
        dropout = [adapters[s].dropout if s in adapters else 0.0 for s in rows]
        return cls(method, blocks, rows, scale, dropout, any(dropout), some.feedforward)

    @property
    def dummy(self) -> int:
        """The block row that pads: zeros (ones for (IA)^3), frozen, so it adds (or scales) nothing."""
        return len(self.slots)


class PopulationLinear(torch.nn.Module):
    """A frozen linear layer plus every member's adapter at it; each member's rows see only its own."""

    def __init__(self, base: torch.nn.Linear, groups: list[_Group], population: _Population):
        super().__init__()
        self.base = base
        self.groups = groups
        self._population = [population]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus each lane's adapter on its own rows (x: (lanes * batch, ..., in)).

        Every shape depends on the layout alone (lanes, and each group's ``capacity``), never on which
        members train: a group computes its capacity's rows whoever fills them (padding entries read
        the zero row and have scale 0), so one captured step serves the whole training.

        With ``MERGED`` (the default), every adapter that is a weight, (IA)^3's scaling and LoHa's
        and LoKr's full weights, goes into one weight per lane, ``W_j = diag(l_out) (W diag(l_in) +
        delta_j)``, and the layer is one batched product over all lanes: the per-group products,
        gathers and scatters of activations (a dozen kernels per group and pass, most of a mixed
        population's step) become a few passes over the lanes' weights. LoRA keeps its two thin
        products on its members' rows (its dropout acts on the input of the adapter alone).
        """
        population = self._population[0]
        x3 = x.reshape(population.lanes, -1, x.shape[-1])
        if MERGED:
            y = self._merged(x3, population)
        else:
            y = self._grouped(x3, population)
        for g in self.groups:
            if g.method == "lora":
                y = self._add(g, x3, y, population)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _merged(self, x3: torch.Tensor, population: _Population) -> torch.Tensor:
        flat, lane = population.flat, population.index
        weights = [g for g in self.groups if g.method != "lora"]
        if not weights:
            return F.linear(x3, self.base.weight, self.base.bias)
        weight = self.base.weight.float().expand(population.lanes, *self.base.weight.shape)
        bias = self.base.bias.float()[None, None, :] if self.base.bias is not None else None
        deltas, positions = [], []
        for g in weights:
            if g.method == "ia3":
                scale = flat.leaf(g.blocks["l"]).index_select(0, lane)  # (lanes, in or out); ones for the others
                if g.feedforward:
                    weight = weight * scale[:, None, :]
                else:
                    weight = weight * scale[:, :, None]
                    bias = bias * scale[:, None, :] if bias is not None else None
                continue
            pos, delta = self._delta(g, population)
            deltas.append(delta)
            positions.append(pos)
        if deltas:
            weight = weight.index_add(0, torch.cat(positions), torch.cat(deltas).to(weight.dtype))
        if bias is None:
            return torch.bmm(x3, weight.transpose(1, 2))
        return torch.baddbmm(bias.expand(population.lanes, 1, -1), x3, weight.transpose(1, 2))

    def _grouped(self, x3: torch.Tensor, population: _Population) -> torch.Tensor:
        """One product per group on its members' rows (the path before ``MERGED``; kept for comparison)."""
        flat, lane = population.flat, population.index
        for g in self.groups:
            if g.method == "ia3" and g.feedforward:
                x3 = (x3 * flat.leaf(g.blocks["l"]).index_select(0, lane)[:, None, :]).to(x3.dtype)
        y = F.linear(x3, self.base.weight, self.base.bias)
        for g in self.groups:
            if g.method == "ia3":
                if not g.feedforward:
                    y = (y * flat.leaf(g.blocks["l"]).index_select(0, lane)[:, None, :]).to(y.dtype)
            elif g.method != "lora":
                pos, delta = self._delta(g, population)
                y = y.index_add_(0, pos, torch.bmm(x3.index_select(0, pos), delta.transpose(1, 2)).to(y.dtype))
        return y

    @staticmethod
    def _weights(g: _Group, population: _Population):
        row, pos, scale, dropout = population.now[id(g)]
        flat = population.flat
        w = {k: flat.leaf(b) if row is None else flat.leaf(b).index_select(0, row) for k, b in g.blocks.items()}
        # The scale goes on the small weight tensors, not on the activations; with whole blocks, a
        # member out of lanes has scale 0 and its weights are masked out (not multiplied by 0: a
        # diverged member's NaN times 0 is NaN).
        mask = (scale != 0)[:, None, None] if row is None else None

        def scaled(t: torch.Tensor, by: torch.Tensor | None = scale) -> torch.Tensor:
            t = t if by is None else t * by[:, None, None]
            return t if mask is None else torch.where(mask, t, 0.0)

        return w, pos, dropout, scaled

    def _delta(self, g: _Group, population: _Population) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoHa or LoKr group's full weights, scaled (capacity, out, in), and their lanes (capacity,)."""
        w, pos, _, scaled = self._weights(g, population)
        if g.method == "loha":  # (w1a w1b) * (w2a w2b)
            return pos, scaled(torch.bmm(w["w1a"], w["w1b"]) * torch.bmm(w["w2a"], w["w2b"]))
        w1 = w["w1"]  # lokr: kron(w1, w2)
        w2 = w["w2"] if "w2" in w else torch.bmm(w["w2a"], w["w2b"])
        (k, a, c), (_, b, e) = w1.shape, w2.shape
        return pos, scaled(torch.einsum("kip,kjq->kijpq", w1, w2).reshape(k, a * b, c * e))

    def _add(self, g: _Group, x3: torch.Tensor, y: torch.Tensor, population: _Population) -> torch.Tensor:
        """A LoRA group's two thin products on its members' rows, added to theirs in place."""
        w, pos, dropout, scaled = self._weights(g, population)
        xs = x3.index_select(0, pos)
        if g.has_dropout and self.training:
            keep = 1.0 - dropout[:, None, None]
            xs = xs * (torch.rand_like(xs) < keep).to(xs.dtype) / keep.to(xs.dtype)
        d = torch.bmm(torch.bmm(xs, scaled(w["A"], None).transpose(1, 2)), scaled(w["B"]).transpose(1, 2))
        return y.index_add_(0, pos, d.to(y.dtype))  # in place: no copy of the layer's output per group


#: Attention kernels a population's encoder may use on a GPU (None: torch's choice). At 32 tokens
#: torch picks cuDNN's fused attention, which ran at about 1 ms a layer for 64 lanes on one H200,
#: far from the memory speed its inputs need; the memory-efficient kernel has the same inputs
#: (a padding mask, dropout) and semantics.
SDPA_BACKENDS: tuple[str, ...] | None = ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH")


def _attention(device: torch.device):
    """The ``SDPA_BACKENDS`` context on a GPU (nothing on a CPU or with None)."""
    if device.type != "cuda" or not SDPA_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in SDPA_BACKENDS])


#: Adapters that are weights (IA3, LoHa, LoKr) merged into one weight per lane and layer
#: (``PopulationLinear.forward``); False: one product per group (for comparison).
MERGED = True


# --- one population -------------------------------------------------------------------------------
@dataclass
class _Member:
    slot: int
    config: Config
    seed: int
    steps: int
    lr: float
    adapters: dict[str, _Adapter]
    head: tuple[torch.Tensor, torch.Tensor]
    train_time_s: float = 0.0
    final_loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


class _Population:
    """The members' adapters attached to a shared-storage copy of the resident frozen encoder."""

    def __init__(self, members: list[_Member], base: torch.nn.Module, device: torch.device, bf16: bool = False,
                 pooling: str = "mean"):
        self.members, self.device, self.bf16, self.pooling = members, device, bf16, pooling
        slots = len(members)
        self.flat = _Flat(slots)
        self.groups: list[_Group] = []
        sites: dict[str, list[_Group]] = {}
        for name in sorted({k for m in members for k in m.adapters}):
            by_kind: dict[tuple[str, int], dict[int, _Adapter]] = {}
            for m in members:
                if name in m.adapters:
                    adapter = m.adapters[name]
                    by_kind.setdefault((adapter.method, rank_bucket(adapter.rank)), {})[m.slot] = adapter
            sites[name] = [_Group.build(method, adapters, slots, self.flat, device)
                           for (method, _), adapters in sorted(by_kind.items())]
            self.groups += sites[name]
        everyone = list(range(slots)) + [slots]  # + a frozen zero head for idle lanes
        trained = [True] * slots + [False]
        self.head_w = self.flat.take(torch.stack([m.head[0] for m in members] + [torch.zeros_like(members[0].head[0])]),
                                     everyone, trained)
        self.head_b = self.flat.take(torch.stack([m.head[1] for m in members] + [torch.zeros_like(members[0].head[1])]),
                                     everyone, trained)
        self.flat.finish(device)
        # The encoder: module objects copied, tensors shared with the resident base.
        memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
        self.encoder = copy.deepcopy(base, memo)
        for name, groups in sites.items():
            parent, _, child = name.rpartition(".")
            owner = self.encoder.get_submodule(parent)
            setattr(owner, child, PopulationLinear(getattr(owner, child), groups, self))
        self.ranked = [g for g in self.groups if g.method != "ia3"]
        self.lanes = 0
        self._pinned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.set_lanes(list(range(slots)))

    def set_lanes(self, lanes: Sequence[int | None]) -> None:
        """Train or score member ``lanes[j]`` on the j-th block of rows of the batch (None: an idle lane,
        its rows weigh nothing in the loss and meet no adapter).

        The layout (how many lanes; per ranked group, its ``capacity``: ``capacity(g, lanes)``) fixes
        every shape; which members fill it is data in two device buffers: per lane, the member's slot
        (the dummy slot for an idle lane) and loss weight; per ranked group, the rows of the members in
        lanes, their lanes, scales and dropout rates, padded to the capacity with the dummy row, lane 0
        and scale 0. A new set of members is one copy into the same buffers (from pinned memory, with no
        wait for the queued steps), so a captured step replays on it unchanged.
        """
        count, n = len(lanes), len(self.members)
        where = {s: j for j, s in enumerate(lanes) if s is not None}
        ints = [n if s is None else s for s in lanes]
        floats = [0.0 if s is None else 1.0 for s in lanes]
        for g in self.ranked:
            if self.whole(g, count):  # every row of the block (the dummy's too), members not in lanes at scale 0
                rows = [*g.slots, None]
                ints += [where.get(s, 0) if s is not None else 0 for s in rows]
                floats += [g.scale[j] if s in where else 0.0 for j, s in enumerate(g.slots)] + [0.0]
                floats += [g.dropout[j] if s in where else 0.0 for j, s in enumerate(g.slots)] + [0.0]
                continue
            capacity = self.capacity(g, count)
            rows = [j for j, s in enumerate(g.slots) if s in where]
            pad = capacity - len(rows)
            ints += rows + [g.dummy] * pad + [where[g.slots[j]] for j in rows] + [0] * pad
            floats += [g.scale[j] for j in rows] + [0.0] * pad + [g.dropout[j] for j in rows] + [0.0] * pad
        host_i = torch.tensor(ints, dtype=torch.int64)
        host_f = torch.tensor(floats, dtype=torch.float32)
        if count != self.lanes:  # a new layout: new buffers, and views of them by group
            self.lanes = count
            self.dev_i = torch.empty_like(host_i, device=self.device)
            self.dev_f = torch.empty_like(host_f, device=self.device)
            self.index, self.weight = self.dev_i[:count], self.dev_f[:count]
            self.now: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            i = f = count
            for g in self.ranked:
                if self.whole(g, count):
                    c = len(g.slots) + 1
                    self.now[id(g)] = (None, self.dev_i[i : i + c], self.dev_f[f : f + c], self.dev_f[f + c : f + 2 * c])
                    i, f = i + c, f + 2 * c
                    continue
                c = self.capacity(g, count)
                self.now[id(g)] = (self.dev_i[i : i + c], self.dev_i[i + c : i + 2 * c],
                                   self.dev_f[f : f + c], self.dev_f[f + c : f + 2 * c])
                i, f = i + 2 * c, f + 2 * c
        if self.device.type == "cuda":
            host_i, host_f = host_i.pin_memory(), host_f.pin_memory()
            self._pinned.append((host_i, host_f))  # kept until the queued copies have read them
        self.dev_i.copy_(host_i, non_blocking=True)
        self.dev_f.copy_(host_f, non_blocking=True)

    def plan(self, lanes: int, spans: Sequence[tuple[int, int]]) -> None:
        """Size each ranked group for a training of ``lanes`` lanes in which member i trains over the
        global steps ``spans[i]`` = (first, end): its capacity is the most of its members that train
        at once, not min(lanes, its members). A population handed several members per lane would
        otherwise compute (or gather) rows for all of a method's members at every step, about three
        times those training when three members queue per lane. The next ``set_lanes`` with
        ``lanes`` lanes builds the layout anew."""
        first, end = (np.asarray(v, dtype=np.int64) for v in zip(*spans))
        times = np.unique(first)[:, None]  # the most at once is reached at some member's first step
        self._peaks = {}
        for g in self.ranked:
            a, b = first[g.slots][None, :], end[g.slots][None, :]
            self._peaks[id(g)] = max(1, int(((a <= times) & (times < b)).sum(axis=1).max()))
        self._peak_lanes, self.lanes = lanes, 0

    def capacity(self, group: _Group, lanes: int) -> int:
        """Rows a ranked group computes per step with ``lanes`` lanes: its planned peak (``plan``), else
        min(lanes, its members)."""
        if getattr(self, "_peak_lanes", None) == lanes:
            return self._peaks[id(group)]
        return min(lanes, len(group.slots))

    def whole(self, group: _Group, lanes: int) -> bool:
        """Whether ``group`` computes every row of its blocks rather than gathering its members in lanes:
        when that is no more rows than its capacity. Whole blocks take no gather forward and no
        scatter of zeros and gradient backward, which is most of a small group's kernels."""
        return len(group.slots) + 1 <= self.capacity(group, lanes)

    def release(self) -> None:
        """Drop the pinned copies' sources (after a synchronisation)."""
        self._pinned = []

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(lanes, rows per lane, classes); lane j's rows are the j-th block of the batch."""
        with _attention(self.device):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling).reshape(self.lanes, -1, hidden.shape[-1])
        w = self.flat.leaf(self.head_w).index_select(0, self.index)
        b = self.flat.leaf(self.head_b).index_select(0, self.index)
        return torch.baddbmm(b[:, None, :], pooled, w.transpose(1, 2))


def _batch(split: Encoded, rows: np.ndarray, device: torch.device, resident: dict[str, Any]):
    """``Encoded.batch`` on the CPU; on a GPU, indexed from a resident copy of the split."""
    if device.type == "cpu":
        return split.batch(rows, device)
    index = torch.as_tensor(rows).to(device)
    return tuple(t.index_select(0, index) for t in _resident(split, device, resident))


def _resident(split: Encoded, device: torch.device, resident: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    key = id(split)
    if key not in resident:
        resident[key] = tuple(t.to(device) for t in (split.input_ids, split.attention_mask, split.labels))
    return resident[key]


def lane_plan(steps: Sequence[int], lanes: int) -> tuple[list[int], list[int]]:
    """When and where each member trains when at most ``lanes`` train at once: longest first, each
    into the lane that frees first (a member that finishes hands its lane to the next at once).

    Args:
        steps: each member's number of steps, (n,).
        lanes: members trained at once (>= 1).

    Returns:
        each member's first step and its lane (in ``range(min(lanes, n))``), both (n,), in the order given.
    """
    free = [(0, lane) for lane in range(min(lanes, len(steps)))]
    starts, where = [0] * len(steps), [0] * len(steps)
    for i in sorted(range(len(steps)), key=lambda i: (-steps[i], i)):
        at, lane = heapq.heappop(free)
        starts[i], where[i] = at, lane
        heapq.heappush(free, (at + steps[i], lane))
    return starts, where


def lane_starts(steps: Sequence[int], lanes: int) -> list[int]:
    """The step at which each member starts, (n,) (``lane_plan``'s first half)."""
    return lane_plan(steps, lanes)[0]


#: Eager steps before a step is captured as a CUDA graph (they train for real: the first builds
#: cuBLAS handles and autograd state the capture must not).
GRAPH_WARMUP = 2


def _train(population: _Population, train: Encoded, batch_size: int, resident: dict[str, Any],
           lanes: int | None = None, graphs: bool = True) -> None:
    """Train every member for its steps, at most ``lanes`` at once (None: all); sets each member's
    ``train_time_s`` and ``final_loss``.

    Members train from ``lane_plan``: when one finishes, the next waiting one takes its lane (its rows
    of the batch), so the batch stays full until the last lanes drain (trained together to the end,
    the population would run for its longest member while its short members' rows sat idle: with
    steps drawn log-uniformly over 50-600, a third of the rows would do useful work).

    Every member's batches, step sizes and bias corrections are laid out in tables by global step
    and lane before the first step. On a GPU they go to the device once and a step reads its row of
    them through a step counter on the device, so a step is the same kernels whatever the step and
    whoever trains (``_Population.set_lanes``): with ``graphs``, the step (forward, backward, AdamW)
    is captured once as a CUDA graph after ``GRAPH_WARMUP`` eager steps and replayed for the rest,
    one launch instead of several thousand kernel launches from Python (the step of a population is
    bound by them, not by its arithmetic). No step waits for the device; the time of each stretch
    between two changes of the members in training is read from device events at the end.
    """
    device, members, flat = population.device, population.members, population.flat
    beta1, beta2 = BETAS
    n = len(members)
    count = min(lanes or n, n)
    starts, lane_of = lane_plan([m.steps for m in members], count)
    ends = [start + m.steps for start, m in zip(starts, members)]
    longest = max(ends)
    per = min(batch_size, len(train))
    order = np.zeros((longest, count, per), dtype=np.int64)  # rows of each lane's batch at each global step
    rates = np.zeros((longest, n + 1), dtype=np.float32)  # AdamW step sizes; the last column: frozen rows
    bias2 = np.ones((longest, n + 1), dtype=np.float32)  # sqrt(1 - beta2^t) at the member's own step t
    for m, start, lane in zip(members, starts, lane_of):
        batches = batch_rows(len(train), batch_size, m.seed)
        for step in range(m.steps):
            order[start + step, lane] = next(batches)
            rates[start + step, m.slot] = m.lr * lr_factor(step, m.steps) / (1 - beta1 ** (step + 1))
            bias2[start + step, m.slot] = math.sqrt(1 - beta2 ** (step + 1))
    changes = set(starts) | set(ends)  # steps at which the members in training change
    population.plan(count, list(zip(starts, ends)))
    on_gpu = device.type != "cpu"
    history = torch.full((longest, count), math.nan, device=device)  # each lane's loss at each step

    def update(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
               step_size: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=population.bf16, cache_enabled=False):
            logits = population.logits(input_ids, attention_mask)
        k, rows, classes = logits.shape
        losses = F.cross_entropy(logits.float().reshape(k * rows, classes), labels, reduction="none").view(k, rows).mean(1)
        flat.grad.zero_()
        (losses * population.weight).sum().backward()
        # AdamW for every member at once, as torch.optim.AdamW computes it (weight decay 0); members
        # not training now have step size zero and their gradient is set to zero (it is, but for a
        # diverged member's NaN reaching the rows that share its lane: 0 * NaN), so their values and
        # moments stay as they are.
        with torch.no_grad():
            grad = torch.where(step_size != 0, flat.grad, 0.0)
            flat.exp_avg.lerp_(grad, 1 - beta1)
            flat.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = flat.exp_avg_sq.sqrt().div_(correction).add_(EPS)
            flat.data.sub_(step_size * flat.exp_avg / denom)
        return losses.detach()

    if on_gpu:
        order_dev = torch.as_tensor(order.reshape(longest, count * per), device=device)
        rates_dev, bias2_dev = (torch.as_tensor(t, device=device) for t in (rates, bias2))
        data = _resident(train, device, resident)
        counter = torch.zeros(1, dtype=torch.int64, device=device)  # the global step, on the device

        def step_gpu() -> None:
            index = order_dev.index_select(0, counter).reshape(-1)
            input_ids, attention_mask, labels = (t.index_select(0, index) for t in data)
            step_size = rates_dev.index_select(0, counter).reshape(-1).index_select(0, flat.owner)
            correction = bias2_dev.index_select(0, counter).reshape(-1).index_select(0, flat.owner)
            history.index_copy_(0, counter, update(input_ids, attention_mask, labels, step_size, correction)[None])
            counter.add_(1)

    population.encoder.train()
    _sync(device)
    marks: list[Any] = []  # (step, time or CUDA event) at each change
    def mark(step: int) -> None:
        if on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((step, event))
        else:
            marks.append((step, time.perf_counter()))

    capture = graphs and on_gpu and longest > GRAPH_WARMUP
    graph = None
    for step in range(longest):
        if step in changes:
            mark(step)
            lanes_now: list[int | None] = [None] * count
            for m, a, b, lane in zip(members, starts, ends, lane_of):
                if a <= step < b:
                    lanes_now[lane] = m.slot
            population.set_lanes(lanes_now)
        if not on_gpu:
            input_ids, attention_mask, labels = train.batch(order[step].reshape(-1), device)
            history[step] = update(input_ids, attention_mask, labels,
                                   torch.from_numpy(rates[step]).index_select(0, flat.owner),
                                   torch.from_numpy(bias2[step]).index_select(0, flat.owner))
        elif not capture:
            step_gpu()
        elif step < GRAPH_WARMUP:  # real steps, on a side stream as capture wants
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step_gpu()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            if graph is None:  # recorded, not run: the replay below runs this step
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step_gpu()
            graph.replay()
    mark(longest)
    _sync(device)
    population.release()
    population.graph = graph  # kept with the population: its memory pool holds the step's buffers
    for (a, t0), (b, t1) in zip(marks, marks[1:]):  # each stretch's time, shared among those who trained in it
        seconds = t0.elapsed_time(t1) / 1000.0 if on_gpu else t1 - t0
        sharing = [m for m, s, e in zip(members, starts, ends) if s <= a < e]
        for m in sharing:
            m.train_time_s += seconds / len(sharing)
    tails = history.cpu()
    for m, start, lane in zip(members, starts, lane_of):
        m.final_loss = float(tails[start + max(0, m.steps - 10) : start + m.steps, lane].mean())


def _logits(population: _Population, split: Encoded, resident: dict[str, Any]) -> torch.Tensor:
    """Every member's logits on ``split``, (members, len(split), classes): each batch of rows is repeated
    once per member."""
    device, members = population.device, population.members
    population.set_lanes(list(range(len(members))))
    population.encoder.eval()
    n = len(members)
    per = max(1, min(256, VAL_ROWS // n))
    by_length = np.argsort(split.lengths, kind="stable")  # batches of similar length pad little
    out = []
    with torch.no_grad():
        for start in range(0, len(split), per):
            rows = by_length[start:start + per]
            input_ids, attention_mask, _ = _batch(split, rows, device, resident)
            with _autocast(device, population.bf16):
                out.append(population.logits(input_ids.repeat(n, 1), attention_mask.repeat(n, 1)).float())
    logits = torch.cat(out, dim=1)
    back = torch.as_tensor(np.argsort(by_length, kind="stable"), device=device)
    _sync(device)
    population.release()
    return logits.index_select(1, back)  # back in the split's order


def _members(problem: Any, configs: Sequence[Config], seeds: Sequence[int]) -> tuple[list[_Member], list[int], dict[int, Exception]]:
    """Members to train together, indices of the configurations to train alone, and failures by index."""
    members: list[_Member] = []
    alone: list[int] = []
    failed: dict[int, Exception] = {}
    for i, (config, seed) in enumerate(zip(configs, seeds, strict=True)):
        try:
            config = problem.space.validate(config)
            model = problem.build_model(config, int(seed), share_base=True)
            adapters = read_adapters(model)
        except Unsupported:
            alone.append(i)
            continue
        except Exception as e:  # noqa: BLE001 - fails this configuration only
            failed[i] = e
            continue
        head = (model.head.weight.detach().float(), model.head.bias.detach().float())
        members.append(_Member(len(members), config, int(seed), int(config["steps"]), float(config["lr"]), adapters,
                               head, extra={"index": i}))
    return members, alone, failed


def batchable(problem: Any) -> str | None:
    """Why ``problem``'s configurations cannot share a pass (they are then trained one at a time), or None."""
    if problem.task != "sequence-classification":
        return f"task={problem.task!r}: only sequence classification is batched"
    if any(m.kind != "Linear" for m in problem.geometry.modules):
        return "the model's layers hold Conv1D modules: only nn.Linear layers are batched"
    if "latency_ms" in problem.objective_list:
        return "the latency_ms objective times a lone model"
    return None


def train_population(problem: Any, members: list[_Member], lanes: int | None = None,
                     graphs: bool | None = None) -> _Population:
    """Attach ``members`` to the problem's resident frozen encoder (loaded once per process) and train them,
    at most ``lanes`` at once (None: the problem's ``population`` option), the step captured as a CUDA
    graph on a GPU if ``graphs`` (None: the problem's ``population_graphs`` option)."""
    device = problem._device()
    cache = problem._cache
    if cache.get("population_device") != str(device):
        base = copy.deepcopy(problem._base()[1]).to(device).requires_grad_(False)
        cache.update(population_device=str(device), population_base=base, population_data={})
    population = _Population(members, cache["population_base"], device, problem._bf16(device), problem.pooling)
    _train(population, problem._split("train"), problem.batch_size, cache["population_data"],
           lanes or problem.population, problem.population_graphs if graphs is None else graphs)
    return population


def evaluate_population(problem: Any, configs: Sequence[Config], seeds: Sequence[int]) -> list[Evaluation | Exception]:
    """``PeftProblem.evaluate_population``: train ``configs`` together and score each on the validation split.

    Args:
        problem: a ``PeftProblem``.
        configs: n configurations (n <= ``problem.max_population``).
        seeds: n seeds, one per configuration.

    Returns:
        n entries in order: each configuration's ``Evaluation`` (as ``PeftProblem.evaluate`` reports
        it, with ``population`` and ``population_train_s`` in its metadata) or the exception that
        failed it.
    """
    if len(configs) != len(seeds):
        raise ValueError(f"evaluate_population got {len(configs)} configurations but {len(seeds)} seeds")
    if len(configs) > problem.max_population:
        raise ValueError(f"evaluate_population got {len(configs)} configurations; this problem's population "
                         f"option allows at most {problem.max_population}")
    _set_threads()
    device = problem._device()
    train, val = problem._split("train"), problem._split("val")
    problem._warm_up(device, train)
    build_start = time.perf_counter()
    if batchable(problem) is None:
        members, alone, failed = _members(problem, configs, seeds)
    else:
        members, alone, failed = [], list(range(len(configs))), {}
    out: list[Evaluation | Exception | None] = [failed.get(i) for i in range(len(configs))]
    if members:
        build_time = time.perf_counter() - build_start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        population = train_population(problem, members)
        train_wall = time.perf_counter() - start
        predictions = _logits(population, val, problem._cache["population_data"]).argmax(dim=-1).cpu().numpy()
        labels = val.labels.numpy()
        if problem.metric == "accuracy":
            scores = (predictions == labels[None, :]).mean(axis=1).tolist()
        else:
            scores = [macro_f1(labels, p, len(problem.classes)) for p in predictions]
        if device.type == "cuda":
            peak_mb, source = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak_mb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        for m in members:
            if not math.isfinite(m.final_loss):
                out[m.extra["index"]] = FloatingPointError(
                    f"training diverged: mean loss of the last steps is {m.final_loss} (lr={m.lr})")
                continue
            count = problem.trainable_params(m.config)
            measured = {problem.metric: scores[m.slot], "trainable_params": float(count),
                        "train_time_s": m.train_time_s, "peak_memory_mb": round(peak_mb, 1)}
            out[m.extra["index"]] = Evaluation(
                values={n: measured[n] for n in problem.objective_list},
                measures=[math.log10(max(count, 1)), float(len(adapted_layers(m.config, problem.geometry.num_layers)))],
                metadata={"device": str(device), "peak_memory_mb": round(peak_mb, 1), "peak_memory_source": source,
                          **gpu_total(device),
                          "build_time_s": round(build_time / len(members), 3), "steps": m.steps,
                          "epochs": round(m.steps * problem.batch_size / len(train), 3),
                          "final_train_loss": round(m.final_loss, 4), "population": len(members),
                          "population_train_s": round(train_wall, 3)},
            )
    for i in alone:
        try:
            out[i] = problem.evaluate(configs[i], int(seeds[i]))
        except Exception as e:  # noqa: BLE001 - fails this configuration only
            out[i] = e
    return out  # type: ignore[return-value]
