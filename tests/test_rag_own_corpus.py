"""rag over a user's corpus folder / JSONL and questions file by path: relevance by gold document and
answer text, another embedding model, vectors cached on disk by content hash, and bad input rejected
when the problem is built."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from problems._data import DataError
from problems._minilm import model_path
from problems.rag import Chunking, RagProblem, chunk_corpus, load_xquad

BM25 = {"unit": "sentence", "chunk_size": 64, "overlap": 0.0, "retriever": "bm25", "top_k": 5, "rerank": False}
DENSE = {"unit": "word", "chunk_size": 64, "overlap": 0.25, "retriever": "dense", "index": "flat", "top_k": 3,
         "rerank": True}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """XQuAD's first 12 paragraphs as a folder of .txt files (and as JSONL), with their questions."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("corpus")
    paragraphs, questions = load_xquad()
    (root / "docs" / "part").mkdir(parents=True)
    with open(root / "docs.jsonl", "w") as jsonl, open(root / "questions.jsonl", "w") as asked:
        for i, text in enumerate(paragraphs[:12]):
            (root / "docs" / "part" / f"{i:02d}.md").write_text(text)
            jsonl.write(json.dumps({"id": f"part/{i:02d}.md", "text": text}) + "\n")
        for q in questions:
            if q.paragraph < 12:
                answer = paragraphs[q.paragraph][q.answer_start : q.answer_end]
                asked.write(json.dumps({"question": q.text, "answer": answer, "doc_id": f"part/{q.paragraph:02d}.md"}) + "\n")
    (root / "docs" / "empty.txt").write_text("  \n")  # skipped: no text
    (root / "docs" / "notes.csv").write_text("ignored,file\n")  # skipped: not .txt/.md
    return root


def test_folder_and_jsonl_corpora_give_the_same_retrieval(files):
    folder = RagProblem(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=None)
    lines = RagProblem(corpus=str(files / "docs.jsonl"), questions=str(files / "questions.jsonl"), n_questions=None)
    docs, questions = folder.corpus()
    assert len(docs) == 12 and docs == lines.corpus()[0] and len(questions) == 100
    a, b = folder.evaluate(BM25, 0), lines.evaluate(BM25, 0)
    assert a.values["recall_at_k"] == b.values["recall_at_k"] > 0.5
    assert a.values["mrr"] == b.values["mrr"]


def test_relevance_by_answer_text_agrees_with_xquad_spans_where_the_text_is_unique(files):
    problem = RagProblem(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=None)
    chunking = Chunking("word", 32, 0.0)
    by_text = problem.relevant(chunking)
    paragraphs, questions = load_xquad()
    chunks = chunk_corpus(paragraphs[:12], chunking)
    spans = [q for q in questions if q.paragraph < 12]
    agree = [np.array_equal(mask, (chunks.paragraph == q.paragraph) & (chunks.start <= q.answer_start) & (chunks.end >= q.answer_end))
             for mask, q in zip(by_text, spans)]
    # The same chunks except where the answer text also occurs elsewhere in its paragraph.
    assert np.mean(agree) > 0.85
    for mask, q in zip(by_text, spans):
        assert set(chunks.paragraph[mask]) <= {q.paragraph}


def test_vectors_are_cached_on_disk_and_reused_by_a_fresh_instance(files, tmp_path):
    options = dict(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=20, cache_dir=str(tmp_path))
    config = dict(DENSE, rerank=False)
    first = RagProblem(**options).evaluate(config, 0)
    assert first.metadata["texts_embedded"] > 0 and first.metadata["vector_sets_from_disk"] == 0
    stored = sorted(tmp_path.glob("*.npy"))
    assert len(stored) == 2  # the chunks and the questions
    again = RagProblem(**options).evaluate(config, 0)
    assert again.metadata["texts_embedded"] == 0 and again.metadata["vector_sets_from_disk"] == 2
    assert again.values["recall_at_k"] == first.values["recall_at_k"] and again.values["mrr"] == first.values["mrr"]
    other = RagProblem(**options).evaluate(dict(config, chunk_size=128), 0)  # another chunking: a new key
    assert other.metadata["texts_embedded"] > 0 and len(sorted(tmp_path.glob("*.npy"))) == 3


def test_another_embedding_model_folder_with_cls_pooling(files, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_path(), folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    problem = RagProblem(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=20,
                         embedding_model=str(folder), cache_dir=str(tmp_path / "cache"))
    assert problem.pooling == "cls"
    mean = RagProblem(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=20,
                      cache_dir=str(tmp_path / "cache"))
    assert mean.pooling == "mean" and mean._model_key() != problem._model_key()
    vectors = problem._encode(["a card that never arrived"])
    assert vectors.shape == (1, 384) and not np.allclose(vectors, mean._encode(["a card that never arrived"]))


@pytest.mark.parametrize("change, named", [
    ({"corpus": "no/such/folder"}, ["corpus", "no/such/folder", "no such file"]),
    ({"corpus": "EMPTY"}, ["corpus", "holds no documents", ".txt/.md"]),
    ({"questions": None}, ["questions=None", "expected both"]),
    ({"questions": "BAD_DOC"}, ["questions", "doc_id='elsewhere.txt'", "not a document of the corpus"]),
    ({"questions": "NO_GOLD"}, ["questions", "line 1", "neither 'answer' nor 'doc_id'"]),
    ({"embedding_model": "EMPTY"}, ["embedding_model", "config.json"]),
    ({"n_paragraphs": 5}, ["n_paragraphs=5", "only for XQuAD"]),
])
def test_bad_input_fails_when_built(files, tmp_path, change, named):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n")
    (tmp_path / "bad_doc.jsonl").write_text(json.dumps({"question": "q?", "doc_id": "elsewhere.txt"}) + "\n")
    (tmp_path / "no_gold.jsonl").write_text(json.dumps({"question": "q?"}) + "\n")
    paths = {"EMPTY": str(tmp_path / "empty"), "BAD_DOC": str(tmp_path / "bad_doc.jsonl"), "NO_GOLD": str(tmp_path / "no_gold.jsonl")}
    options = {"corpus": str(files / "docs"), "questions": str(files / "questions.jsonl")}
    options.update({k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(DataError) as error:
        RagProblem(**options)
    for name in named:
        assert name in str(error.value)


def test_a_cross_encoder_re_ranks_the_first_stage_by_its_scores(files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    folder = tmp_path / "cross"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                             num_labels=1)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (model_path() / name).is_file():
            shutil.copy(model_path() / name, folder / name)
    options = dict(corpus=str(files / "docs"), questions=str(files / "questions.jsonl"), n_questions=6)
    problem = RagProblem(reranker=str(folder), **options)
    assert problem.space["rerank_with"].choices == ("sentences", "cross-encoder")
    assert "rerank_with" not in RagProblem(**options).space.names
    config = dict(BM25, rerank=True, rerank_with="cross-encoder", top_k=3)
    plain = problem.evaluate(dict(BM25, top_k=3), 0)
    crossed = problem.evaluate(config, 0)
    assert crossed.values["latency_ms"] > plain.values["latency_ms"]

    # The scores are the model's own on (question, chunk) pairs.
    question = problem.corpus()[1][0].text
    texts = problem.chunks(Chunking("sentence", 64, 0.0)).texts[:5]
    scores, seconds = problem.cross_scores(question, texts)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**tokenizer([question] * 5, texts, padding=True, return_tensors="pt")).logits[:, -1].numpy()
    assert np.allclose(scores, expected, atol=1e-5) and seconds > 0
    with pytest.raises(DataError, match="reranker"):
        RagProblem(reranker=str(tmp_path / "nowhere"), **options)
