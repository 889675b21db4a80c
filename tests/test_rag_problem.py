"""The rag problem: chunking rules, BM25 against rank_bm25, real retrieval runs, the embedding cache, errors."""

from __future__ import annotations

import pickle
import re
import time

import numpy as np
import pytest
import torch

from problems.rag import (
    Bm25Index,
    Chunking,
    RagProblem,
    _rerank,
    chunk_corpus,
    load_xquad,
    sentence_spans,
    terms,
    top,
)
from qd.registry import get_problem
from qd.space import SpaceError

BM25 = {"unit": "sentence", "chunk_size": 64, "overlap": 0.0, "retriever": "bm25", "top_k": 5, "rerank": False}
DENSE = {"unit": "word", "chunk_size": 32, "overlap": 0.25, "retriever": "dense", "index": "flat", "top_k": 5,
         "rerank": False}


@pytest.fixture(scope="module")
def full() -> RagProblem:
    """The whole corpus; only BM25 is run on it (no embeddings), so it stays fast."""
    return get_problem("rag", n_questions=200)


@pytest.fixture(scope="module")
def small() -> RagProblem:
    """A 20-paragraph corpus for the MiniLM paths: embedding it takes seconds on one core."""
    torch.set_num_threads(1)
    return get_problem("rag", n_paragraphs=20, n_questions=40, device="cpu")


def answerable(chunking: Chunking) -> float:
    paragraphs, questions = load_xquad()
    chunks = chunk_corpus(paragraphs, chunking)
    return np.mean([((chunks.paragraph == q.paragraph) & (chunks.start <= q.answer_start)
                     & (chunks.end >= q.answer_end)).any() for q in questions])


# --- data and chunking -----------------------------------------------------------------------
def test_vendored_xquad_has_every_answer_at_its_offset():
    paragraphs, questions = load_xquad()
    assert (len(paragraphs), len(questions)) == (240, 1190)
    assert all(q.answer_end > q.answer_start for q in questions)


def test_sentences_split_at_stops_but_not_at_abbreviations():
    text = "Dr. Smith met Mr. J. Doe in the U.S. capital. It rained!  Then 3 people left (quietly). End"
    sentences = [text[s:e] for s, e in sentence_spans(text)]
    assert sentences == ["Dr. Smith met Mr. J. Doe in the U.S. capital.", "It rained!",
                         "Then 3 people left (quietly).", "End"]


@pytest.mark.parametrize("unit", ["word", "sentence"])
@pytest.mark.parametrize("size", [32, 128])
def test_chunks_cover_every_word_and_respect_their_size(unit, size):
    paragraphs, _ = load_xquad()
    paragraphs = paragraphs[:40]
    chunks = chunk_corpus(paragraphs, Chunking(unit, size, 0.25))
    for p, text in enumerate(paragraphs):
        mine = np.flatnonzero(chunks.paragraph == p)
        covered = np.zeros(len(text), bool)
        for i in mine:
            covered[chunks.start[i] : chunks.end[i]] = True
            assert chunks.texts[i] == text[chunks.start[i] : chunks.end[i]]
            if unit == "word":
                assert len(chunks.texts[i].split()) <= size
        assert all(covered[m.start() : m.end()].all() for m in re.finditer(r"\S+", text))
        if unit == "sentence":
            ends = {e for _, e in sentence_spans(text)}
            assert {int(chunks.end[i]) for i in mine} <= ends
    # Each chunk's sentences (clipped to it) are re-ranking's pieces: every chunk has at least one.
    assert (np.diff(chunks.piece_offsets) >= 1).all()


def test_overlap_adds_chunks_and_saves_answers_cut_by_boundaries():
    paragraphs, _ = load_xquad()
    counts = [len(chunk_corpus(paragraphs, Chunking("word", 32, o)).texts) for o in (0.0, 0.25, 0.5)]
    assert counts[0] < counts[1] < counts[2]
    assert answerable(Chunking("word", 32, 0.0)) < answerable(Chunking("word", 32, 0.5)) == 1.0


# --- BM25 ------------------------------------------------------------------------------------
def test_bm25_index_scores_equal_rank_bm25(full):
    from rank_bm25 import BM25Okapi

    chunks = full.chunks(Chunking("sentence", 64, 0.0))
    index = Bm25Index.build(chunks.texts)
    reference = BM25Okapi([terms(t) for t in chunks.texts])
    for question in full.corpus()[1][:20]:
        np.testing.assert_allclose(index.scores(question.text), reference.get_scores(terms(question.text)), rtol=1e-5, atol=1e-5)
    assert not index.scores("zzzz qqqq").any()  # unknown words score nothing


def test_top_returns_best_first_with_ties_by_index():
    assert top(np.array([0.1, 0.5, 0.5, 0.9, 0.0]), 3).tolist() == [3, 1, 2]
    assert top(np.array([1.0, 2.0]), 5).tolist() == [1, 0]


def test_bm25_evaluation_on_the_full_corpus(full):
    one, twenty = full.evaluate(dict(BM25, top_k=1), seed=0), full.evaluate(dict(BM25, top_k=20), seed=0)
    for evaluation in (one, twenty):
        (recall, mrr, latency_ms, index_mb), measures, _ = full.normalise(evaluation)
        assert 0.0 <= mrr <= recall <= 1.0
        assert latency_ms > 0 and index_mb > 0
        assert evaluation.metadata["encode_ms"] == 0.0  # BM25 alone needs no query vector
        assert evaluation.metadata["texts_embedded"] == 0
    assert one.values["recall_at_k"] == pytest.approx(one.values["mrr"])  # at k=1 they are the same thing
    assert 0.5 < one.values["recall_at_k"] < twenty.values["recall_at_k"]
    assert twenty.values["mrr"] >= one.values["mrr"]
    assert twenty.measures == [6.0, 20.0]
    assert one.values["index_mb"] == twenty.values["index_mb"]


def test_rerank_scores_chunk_plus_best_sentence():
    query = np.array([1.0, 0.0, 0.0])
    chunk_vectors = np.array([[0.6, 0.8, 0.0], [0.5, 0.0, 0.866], [0.7, 0.714, 0.0]])
    # Chunk 0: 0.6 + best sentence 0.0; chunk 1: 0.5 + best sentence 1.0; chunk 2: 0.7 + 0.6.
    piece_vectors = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    piece_offsets = np.array([0, 1, 3, 4])
    assert _rerank(np.array([0, 1, 2]), query, chunk_vectors, piece_vectors, piece_offsets).tolist() == [1, 2, 0]
    assert _rerank(np.array([], dtype=np.int64), query, chunk_vectors, piece_vectors, piece_offsets).size == 0


# --- dense, hybrid, re-ranking (small corpus) ---------------------------------------------------
def test_dense_evaluation_then_the_same_chunking_comes_from_the_cache(small):
    started = time.perf_counter()
    first = small.evaluate(DENSE, seed=0)
    first_s = time.perf_counter() - started
    n_chunks = first.metadata["n_chunks"]
    assert first.metadata["texts_embedded"] >= n_chunks  # the chunks (and the questions) were embedded

    started = time.perf_counter()
    second = small.evaluate(dict(DENSE, top_k=20), seed=1)
    second_s = time.perf_counter() - started
    assert second.metadata["texts_embedded"] == 0
    assert second.metadata["texts_from_cache"] == n_chunks
    assert second_s < first_s / 5

    for evaluation in (first, second):
        (recall, mrr, latency_ms, index_mb), _, _ = small.normalise(evaluation)
        assert 0.0 <= mrr <= recall <= 1.0
        assert latency_ms >= evaluation.metadata["encode_ms"] > 0
        # A flat index holds n x 384 float32 vectors.
        assert index_mb * 2**20 >= n_chunks * 384 * 4
    assert second.values["recall_at_k"] >= first.values["recall_at_k"] > 0.5


def test_embeddings_are_unit_length_and_find_their_own_text(small):
    chunks = small.chunks(Chunking("word", 32, 0.25))
    vectors = small.embedding_cache.get(chunks.texts[:10], small._encode)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similarities = vectors @ vectors.T
    assert (similarities.argmax(axis=1) == np.arange(10)).all()


def test_ivf_probing_every_list_ranks_like_flat(small):
    flat = small.evaluate(DENSE, seed=0)
    ivf = small.evaluate(dict(DENSE, index="ivf", nlist=4, nprobe=4), seed=0)
    assert ivf.metadata["nprobe_used"] == ivf.metadata["nlist_used"] == 4
    assert (ivf.values["recall_at_k"], ivf.values["mrr"]) == (flat.values["recall_at_k"], flat.values["mrr"])
    hnsw = small.evaluate(dict(DENSE, index="hnsw", hnsw_m=16, ef_search=256), seed=0)
    assert hnsw.values["recall_at_k"] == flat.values["recall_at_k"]  # a tiny graph searched widely is exact
    assert hnsw.values["index_mb"] > flat.values["index_mb"]  # the graph's links cost memory


def test_hybrid_and_rerank_cost_memory_and_stay_in_range(small):
    dense = small.evaluate(DENSE, seed=0)
    hybrid = small.evaluate(dict(DENSE, retriever="hybrid", hybrid_weight=0.5), seed=0)
    reranked = small.evaluate(dict(DENSE, rerank=True), seed=0)
    bm25 = small.evaluate({**{k: v for k, v in DENSE.items() if k != "index"}, "retriever": "bm25"}, seed=0)
    bm25_reranked = small.evaluate({**{k: v for k, v in DENSE.items() if k != "index"}, "retriever": "bm25",
                                    "rerank": True}, seed=0)
    assert hybrid.values["index_mb"] == pytest.approx(dense.values["index_mb"] + bm25.values["index_mb"])
    assert reranked.values["index_mb"] > dense.values["index_mb"]
    assert bm25_reranked.values["index_mb"] > bm25.values["index_mb"]
    assert bm25.metadata["encode_ms"] == 0 < bm25_reranked.metadata["encode_ms"]
    assert bm25_reranked.values["latency_ms"] > bm25.values["latency_ms"]
    for evaluation in (hybrid, reranked, bm25_reranked):
        assert 0.0 <= evaluation.values["mrr"] <= evaluation.values["recall_at_k"] <= 1.0


def test_pickles_without_its_caches(small):
    small.evaluate(DENSE, seed=0)
    payload = pickle.dumps(small)
    assert len(payload) < 10_000
    assert pickle.loads(payload)._cache == {}


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, named",
    [
        (dict(BM25, top_k=0), "top_k"),
        (dict(BM25, top_k=21), "top_k"),
        (dict(BM25, retriever="tfidf"), "retriever"),
        (dict(BM25, chunk_size=100), "chunk_size"),
        (dict(BM25, unit="paragraph"), "unit"),
        (dict(BM25, index="flat"), "index"),  # inactive for BM25
        (dict(DENSE, hnsw_m=16), "hnsw_m"),  # inactive for a flat index
        (dict(DENSE, index="hnsw"), "hnsw_m"),  # missing
        (dict(DENSE, retriever="hybrid"), "hybrid_weight"),  # missing
        (dict(BM25, rerank="yes"), "rerank"),
    ],
)
def test_invalid_configurations_are_rejected_naming_the_parameter(full, config, named):
    with pytest.raises(SpaceError, match=named):
        full.evaluate(config, seed=0)


@pytest.mark.parametrize(
    "options, named",
    [({"n_questions": 0}, "n_questions"), ({"n_paragraphs": 241}, "n_paragraphs"), ({"device": "tpu"}, "device"),
     ({"embed_batch": 0}, "embed_batch"), ({"gpus_per_eval": 0}, "gpus_per_eval"), ({"data_seed": "a"}, "data_seed")],
)
def test_invalid_options_are_rejected_naming_the_option(options, named):
    with pytest.raises(ValueError, match=named):
        get_problem("rag", **options)


def test_subsamples_are_fixed_by_the_data_seed():
    a, b = get_problem("rag", n_paragraphs=30, n_questions=25), get_problem("rag", n_paragraphs=30, n_questions=25)
    assert a.corpus() == b.corpus()
    paragraphs, questions = a.corpus()
    assert len(paragraphs) == 30 and len(questions) == 25
    assert all(0 <= q.paragraph < 30 and q.answer_end <= len(paragraphs[q.paragraph]) for q in questions)
    assert get_problem("rag", n_paragraphs=30, n_questions=25, data_seed=1).corpus() != a.corpus()


@pytest.mark.slow
def test_full_corpus_dense_retrieval_quality():
    problem = get_problem("rag", n_questions=400, device="cpu")
    evaluation = problem.evaluate({**DENSE, "unit": "sentence", "chunk_size": 128, "overlap": 0.0}, seed=0)
    assert evaluation.values["recall_at_k"] > 0.9
