"""Population-batched peft training equals training each configuration alone (CPU, small sizes)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from evaluators import Job
from evaluators.inprocess import InProcessEvaluator
from evaluators.process import ProcessPoolEvaluator
from problems import peft_population
from problems.peft import PeftProblem, trainable_params
from qd.problem import Evaluation
from qd.space import SpaceError

SIZES = {"train_size": 24, "val_size": 24, "max_length": 8, "batch_size": 4, "min_steps": 1, "max_steps": 8}


def layers(*on: int) -> dict[str, bool]:
    return {f"layer_{i}": i in on for i in range(6)}


#: Every method, placements that overlap and that do not, ranks to pad, different lrs and steps,
#: (IA)^3 on the feed-forward input, LoKr with a low-rank and a full second factor, a head-only
#: configuration.
CONFIGS = [
    dict(method="lora", rank=4, alpha_ratio=2.0, dropout=0.0, targets="qv", **layers(0, 1, 2, 3, 4, 5), lr=5e-3, steps=6),
    dict(method="lora", rank=8, alpha_ratio=1.0, dropout=0.0, targets="ffn", **layers(1, 3), lr=1e-2, steps=3),
    dict(method="loha", rank=2, alpha_ratio=2.0, targets="all", **layers(0, 5), lr=5e-3, steps=5),
    dict(method="ia3", targets="ffn", **layers(2, 3, 4), lr=1e-2, steps=4),
    dict(method="ia3", targets="qkvo", **layers(0, 1), lr=1e-2, steps=6),
    dict(method="loha", rank=1, alpha_ratio=4.0, targets="qkv", **layers(5), lr=3e-3, steps=2),
    dict(method="lora", rank=2, alpha_ratio=2.0, dropout=0.0, targets="qv", **layers(), lr=1e-2, steps=2),
    dict(method="lokr", rank=2, alpha_ratio=2.0, targets="qkvo", **layers(1, 4), lr=5e-3, steps=5),  # low-rank w2
    dict(method="lokr", rank=32, alpha_ratio=1.0, targets="ffn", **layers(0, 2), lr=3e-3, steps=3),  # full w2
]
SEEDS = [10 + i for i in range(len(CONFIGS))]


def without_dropout(problem: PeftProblem) -> PeftProblem:
    """The problem with every dropout of its cached base model off, so training is deterministic."""
    torch.set_num_threads(1)
    _, encoder = problem._base()
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return problem


@pytest.fixture(scope="module")
def problem() -> PeftProblem:
    return without_dropout(PeftProblem(**SIZES, population=len(CONFIGS)))


@pytest.fixture(scope="module")
def alone(problem):
    """Each configuration trained alone: validation logits and final training loss."""
    val = problem._split("val")
    out = []
    for config, seed in zip(CONFIGS, SEEDS):
        run = problem._train(config, seed)
        run.model.eval()
        with torch.no_grad():
            out.append((run.model(val.input_ids, val.attention_mask), run.final_loss))
    return out


def test_population_training_equals_training_each_alone(problem, alone):
    members, unsupported, failed = peft_population._members(problem, CONFIGS, SEEDS)
    assert len(members) == len(CONFIGS) and not unsupported and not failed
    population = peft_population.train_population(problem, members)
    logits = peft_population._logits(population, problem._split("val"), problem._cache["population_data"])
    for i, (reference, loss) in enumerate(alone):
        # fp32 on the CPU: equal up to rounding (Adam's first steps amplify it a little)
        torch.testing.assert_close(logits[i], reference, rtol=1e-3, atol=1e-3, msg=f"configuration {i}: {CONFIGS[i]}")
        assert members[i].final_loss == pytest.approx(loss, rel=1e-5)
    # The tolerance is far below what training changes: untrained models are far from the trained ones.
    val = problem._split("val")
    with torch.no_grad():
        untrained = problem.build_model(CONFIGS[0], SEEDS[0]).eval()(val.input_ids, val.attention_mask)
    assert (untrained - alone[0][0]).abs().max() > 1e-2


def test_lanes_refilled_as_members_finish_train_each_member_as_alone(problem, alone):
    # Three lanes for seven members: each later member starts on the rows a finished one leaves.
    steps = [c["steps"] for c in CONFIGS]
    starts = peft_population.lane_starts(steps, 3)
    assert sorted(starts)[:3] == [0, 0, 0] and max(starts) > 0
    members, _, _ = peft_population._members(problem, CONFIGS, SEEDS)
    population = peft_population.train_population(problem, members, lanes=3)
    # Groups are sized by their members training at once over the plan, not min(lanes, members).
    assert any(population.capacity(g, 3) < min(3, len(g.slots)) for g in population.ranked)
    logits = peft_population._logits(population, problem._split("val"), problem._cache["population_data"])
    for i, (reference, loss) in enumerate(alone):
        torch.testing.assert_close(logits[i], reference, rtol=1e-3, atol=1e-3, msg=f"configuration {i}: {CONFIGS[i]}")
        assert members[i].final_loss == pytest.approx(loss, rel=1e-5)


def test_lane_starts_keep_at_most_lanes_training_and_start_the_longest_first():
    steps = [5, 1, 1, 3, 2, 2, 4]
    starts = peft_population.lane_starts(steps, 2)
    busy = [sum(s <= t < s + n for s, n in zip(starts, steps)) for t in range(sum(steps))]
    assert max(busy) == 2 and max(s + n for s, n in zip(starts, steps)) == 9  # 18 steps over 2 lanes
    assert starts[0] == 0 and starts[6] == 0
    assert peft_population.lane_starts(steps, 10) == [0] * 7


def test_evaluate_population_reports_each_configuration_as_evaluate_does(problem, alone):
    results = problem.evaluate_population(CONFIGS, SEEDS)
    labels = problem._split("val").labels
    for config, result, (reference, loss) in zip(CONFIGS, results, alone):
        assert isinstance(result, Evaluation)
        values, measures, _ = problem.normalise(result)
        assert values[0] == pytest.approx(float((reference.argmax(-1) == labels).float().mean()), abs=1.5 / len(labels))
        assert values[1] == trainable_params(config)
        assert measures == [pytest.approx(np.log10(values[1])), sum(config[f"layer_{i}"] for i in range(6))]
        assert result.metadata["population"] == len(CONFIGS) and result.metadata["steps"] == config["steps"]
        assert result.metadata["final_train_loss"] == pytest.approx(loss, abs=2e-4)
        assert values[2] > 0
    # A member's time is its share: the longest-training members share the most.
    times = [r.values["train_time_s"] for r in results]
    assert times[0] > times[-1]


def test_a_bad_configuration_fails_alone(problem):
    bad = dict(CONFIGS[0], rank=1000)
    results = problem.evaluate_population([CONFIGS[6], bad], [1, 2])
    assert isinstance(results[0], Evaluation) and isinstance(results[1], SpaceError)


def test_population_option_and_size_are_checked():
    with pytest.raises(ValueError, match="population=0"):
        PeftProblem(**SIZES, population=0)
    with pytest.raises(ValueError, match="population_queue=0"):
        PeftProblem(**SIZES, population=2, population_queue=0)
    with pytest.raises(ValueError, match="population_graphs"):
        PeftProblem(**SIZES, population=2, population_graphs=1)
    small = PeftProblem(**SIZES, population=2, population_queue=1)
    with pytest.raises(ValueError, match="at most 2"):
        small.evaluate_population(CONFIGS[:3], SEEDS[:3])


def test_an_adapter_it_cannot_batch_is_named():
    import peft

    problem = PeftProblem(**SIZES)
    model = problem.build_model(CONFIGS[0], seed=0)
    assert set(peft_population.read_adapters(model)) == {
        f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")}
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        dora = peft.get_peft_model(problem._base()[1].__class__(problem._base()[1].config),
                                   peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(peft_population.Unsupported, match="LoRA variant"):
        peft_population.read_adapters(type(model)(dora))


@pytest.mark.parametrize("evaluator", [InProcessEvaluator, ProcessPoolEvaluator])
def test_evaluators_hand_a_worker_up_to_max_population_jobs(evaluator):
    problem = PeftProblem(**{**SIZES, "max_steps": 2}, population=3, population_queue=1)
    space = problem.space
    configs = [space.validate({**c, "steps": 1}) for c in space.sample(4, np.random.default_rng(0))]
    ev = evaluator()
    ev.start(problem, workers=3)
    try:
        for i, config in enumerate(configs):
            ev.submit(Job(i, config, seed=i))
        outcomes = []
        while len(outcomes) < len(configs):
            outcomes += ev.wait()
    finally:
        ev.close()
    assert sorted(o.key for o in outcomes) == [0, 1, 2, 3] and all(o.ok for o in outcomes)
    # One process (3 in flight / population 3): a population of three, then the last one alone.
    assert sorted(o.metadata.get("population", 1) for o in outcomes) == [1, 3, 3, 3]
    assert sorted(o.evaluation.metadata.get("population", 1) for o in outcomes) == [1, 3, 3, 3]



def test_a_queue_of_populations_is_shared_evenly_among_process_workers():
    from qd.registry import get_problem

    problem = get_problem("faulty", weights={"ok": 1})
    problem.max_population = 3  # the default evaluate_population: one evaluate per configuration
    ev = ProcessPoolEvaluator()
    ev.start(problem, workers=6)  # two workers of up to three each
    try:
        for key in range(4):
            ev.submit(Job(key, {"behaviour": "ok", "x": key / 10}, seed=key))
        outcomes = []
        while len(outcomes) < 4:
            outcomes += ev.wait(timeout=120)
    finally:
        ev.close()
    assert all(o.ok for o in outcomes)
    # Two each (not three and one): both workers train, each on half the queue.
    assert sorted(o.metadata.get("population", 1) for o in outcomes) == [2, 2, 2, 2]
    assert len({o.evaluation.metadata["pid"] for o in outcomes}) == 2


def test_lanes_keep_one_layout_whoever_trains_and_a_member_sees_only_its_own(problem):
    # A captured step replays on the same buffers and shapes whichever members fill the lanes; a
    # member's logits do not depend on its lane, its neighbours, idle lanes, or a diverged member
    # out of lanes that shares its layers (NaN values, masked rather than multiplied by 0).
    members, _, _ = peft_population._members(problem, CONFIGS, SEEDS)
    population = peft_population._Population(members, problem._base()[1], torch.device("cpu"))
    val = problem._split("val")
    ids, mask = val.input_ids[:4].repeat(3, 1), val.attention_mask[:4].repeat(3, 1)

    def lane_logits(lanes, lane):
        population.set_lanes(lanes)
        with torch.no_grad():
            return population.logits(ids, mask)[lane]

    alone_ = lane_logits([0, 1, 2], 0)
    buffers = (population.dev_i, population.dev_f)
    shapes = {k: [None if t is None else t.shape for t in v] for k, v in population.now.items()}
    moved = lane_logits([None, 7, 0], 2)
    assert population.dev_i is buffers[0] and population.dev_f is buffers[1]
    assert shapes == {k: [None if t is None else t.shape for t in v] for k, v in population.now.items()}
    torch.testing.assert_close(moved, alone_, rtol=1e-5, atol=1e-5)
    assert (lane_logits([None, 7, 0], 0) == 0).all()  # an idle lane meets the zero head
    flat = population.flat
    with torch.no_grad():  # members 1 (LoRA, ffn) and 7 (LoKr, qkvo) share layers 1, 3 and 4 with member 0
        flat.data[(flat.owner == 1) | (flat.owner == 7)] = float("nan")
    torch.testing.assert_close(lane_logits([0, 2, None], 0), alone_, rtol=1e-5, atol=1e-5)
    assert lane_logits([0, 7, None], 1).isnan().all()  # its own lane does see its values
