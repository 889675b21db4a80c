"""Retrieval for RAG on XQuAD-en: chunking, retriever, index and re-ranking vs quality and cost.

Corpus: the 240 English XQuAD paragraphs (``data/xquad_en``, CC BY-SA 4.0), cut into chunks by the
configuration. Queries: the paragraphs' questions (1,190; ``n_questions`` of them, drawn once with
``data_seed``). A chunk is *relevant* to a question when it comes from the question's gold
paragraph and its text contains the whole gold answer span (``answer_start`` .. + len(answer)),
so chunking decides which questions are answerable at all: a span cut in two by a chunk boundary
is lost unless an overlapping chunk holds it whole (``metadata["answerable"]`` reports the share).

Pipeline of one evaluation:

1. Chunking (``unit``, ``chunk_size``, ``overlap``). ``word``: windows of ``chunk_size`` words;
   ``sentence``: whole sentences packed greedily up to ``chunk_size`` words (a longer sentence is a
   chunk of its own). Consecutive chunks share about ``overlap`` x ``chunk_size`` words.
2. First stage (``retriever``): ``bm25`` (Okapi BM25, k1=1.5, b=0.75, idf from ``rank_bm25``,
   lower-cased ``\\w+`` tokens, served from an inverted index of precomputed term weights);
   ``dense`` (all-MiniLM-L6-v2 cosine similarity in a faiss index: exact ``flat``, graph ``hnsw``
   with ``hnsw_m`` and ``ef_search``, or clustered ``ivf`` with ``nlist`` and ``nprobe``);
   ``hybrid`` (weighted reciprocal-rank fusion of the BM25 and dense top-50 lists, weight
   ``hybrid_weight`` on dense).
3. ``rerank`` (optional): the first stage's top 50 are re-ordered by the question's cosine
   similarity to the whole chunk plus that to the chunk's best-matching sentence (sentences clipped
   to the chunk, each embedded by MiniLM on its own): a sentence-level late interaction. A long
   chunk dilutes its mean-pooled embedding; its best sentence does not. On the full corpus with
   400 questions it lifted MRR@5 in 5 of 6 (chunking, first stage) pairs tried (dense on 32-word
   chunks: 0.741 -> 0.749, on 256-word chunks: 0.933 -> 0.956) and recall@5 in all 6; scoring by
   the best sentence alone lowered MRR on short chunks. It costs the sentence vectors' memory (and
   the chunk vectors', for BM25, whose index holds none), the similarities at query time, and,
   for BM25, encoding the question.

Objectives: ``recall_at_k`` (share of questions with a relevant chunk in the top ``top_k``),
``mrr`` (mean reciprocal rank of the first relevant chunk, 0 when none is in the top ``top_k``),
``latency_ms`` (mean per-query time on the evaluation's CPU: first stage, fusion and re-ranking,
timed one query at a time, plus the question's encoding time when a query vector is needed,
measured once per instance one question at a time) and ``index_mb`` (MiB of what must be held to
answer queries: the faiss index as serialised, the BM25 postings, term ids and vocabulary, and the
vectors re-ranking reads).

Measures: ``log2_chunk_size`` and ``top_k``. Together they set how much text a downstream reader
receives (about chunk_size x top_k words), the main cost of the generation step that follows
retrieval, and they do not depend on the scores; so each cell of the map asks "what is the best
retrieval for this context shape?", while latency and memory stay objectives.

Expensive steps are cached on the instance (and dropped when pickled): MiniLM, the embeddings of
every text embedded so far (keyed by text, so a chunking seen before costs nothing and sentence
vectors are shared between chunkings), the question vectors, the chunks and BM25 index of each
chunking, and the question encoding time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qd.checks import check_device, check_int, check_number
from qd.problem import Evaluation, Measure, Objective, Problem, Resources
from qd.space import Bool, Categorical, Config, Float, Int, Space

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA_FILE = Path(__file__).parent / "data" / "xquad_en" / "xquad.en.json"
THREADS_ENV = "QD_TORCH_THREADS"

CHUNK_SIZES = (32, 64, 128, 256)  # words; discrete so that chunkings recur and their embeddings are reused
OVERLAPS = (0.0, 0.25, 0.5)
RETRIEVERS = ("bm25", "dense", "hybrid")
INDEXES = ("flat", "hnsw", "ivf")
#: Candidates taken from each first-stage list for fusion and re-ranking (>= the largest top_k).
POOL = 50
#: Reciprocal-rank-fusion constant (Cormack et al., 2009).
RRF_K = 60
#: Questions encoded one at a time to measure the query encoding latency.
ENCODE_SAMPLE = 16
BM25_K1, BM25_B = 1.5, 0.75
MIB = 2**20

_WORD = re.compile(r"\S+")
_TERM = re.compile(r"\w+")
# A sentence ends at . ! or ? (and any closing quotes or brackets) followed by space and a capital,
# digit or opening quote, unless the word before the stop is a known abbreviation or an initial.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "no", "mt", "ft", "co", "inc", "ltd",
                  "gen", "col", "gov", "rev", "prof", "u.s", "e.g", "i.e"}


# --- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """An XQuAD question: relevant chunks come from its paragraph and hold its whole answer span."""

    text: str
    paragraph: int
    answer_start: int
    answer_end: int


@dataclass(frozen=True)
class TextQuestion:
    """A question of a user's file: relevant chunks come from its gold document (when given) and contain its
    gold answer text, compared case-insensitively (when given)."""

    text: str
    paragraph: int | None
    answer: str | None


def relevant_chunks(chunks: Chunks, question: Question | TextQuestion) -> np.ndarray:
    """Boolean mask over the chunks: which ones answer ``question``."""
    if isinstance(question, Question):
        return ((chunks.paragraph == question.paragraph) & (chunks.start <= question.answer_start)
                & (chunks.end >= question.answer_end))
    mask = np.ones(len(chunks.texts), dtype=bool) if question.paragraph is None else chunks.paragraph == question.paragraph
    if question.answer:
        answer = question.answer.lower()
        for i in np.flatnonzero(mask):
            mask[i] = answer in chunks.texts[i].lower()
    return mask


def load_xquad() -> tuple[list[str], list[Question]]:
    """The paragraphs (in file order) and every question with its gold paragraph and answer span."""
    data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    paragraphs: list[str] = []
    questions: list[Question] = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = int(answer["answer_start"])
                questions.append(Question(qa["question"], len(paragraphs), start, start + len(answer["text"])))
            paragraphs.append(paragraph["context"])
    return paragraphs, questions


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (trailing whitespace excluded)."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start : match.start()].rsplit(None, 1)
        last_word = before[-1].lower().lstrip("(\"'") if before else ""
        if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
            continue
        end = match.end() - (len(match.group()) - len(match.group().rstrip()))
        spans.append((start, end))
        start = match.end()
    if start < len(text.rstrip()):
        spans.append((start, len(text.rstrip())))
    return spans


# --- chunking ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunking:
    """How the corpus is cut: ``unit`` "word" or "sentence", ``size`` in words, ``overlap`` as a fraction of it."""

    unit: str
    size: int
    overlap: float


@dataclass
class Chunks:
    """The chunks of one chunking: text, gold paragraph and character span of each, and its sentences."""

    texts: list[str]
    paragraph: np.ndarray  # (n,) int
    start: np.ndarray  # (n,) int, character offset in the paragraph
    end: np.ndarray  # (n,) int, exclusive
    piece_texts: list[str]  # the chunk's sentences clipped to the chunk, chunk after chunk
    piece_offsets: np.ndarray  # (n + 1,) chunk i's pieces are piece_texts[offsets[i]:offsets[i + 1]]


def _windows(lengths: Sequence[int], size: int, overlap: float, by_words: bool) -> list[tuple[int, int]]:
    """Index ranges [i, j) of units (words or sentences with ``lengths`` words) forming the chunks."""
    n = len(lengths)
    if by_words:
        stride = max(1, size - round(overlap * size))
        starts = list(range(0, max(n - size, 0) + 1, stride))
        if starts[-1] + size < n:
            starts.append(n - size)  # the tail, so every word is in a chunk
        return [(s, min(s + size, n)) for s in starts]
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j, words = i + 1, lengths[i]
        while j < n and words + lengths[j] <= size:
            words += lengths[j]
            j += 1
        out.append((i, j))
        if j == n:
            break
        # Carry trailing sentences worth at most overlap * size words into the next chunk.
        next_start, carried = j, 0
        while next_start - 1 > i and carried + lengths[next_start - 1] <= overlap * size:
            next_start -= 1
            carried += lengths[next_start]
        i = next_start
    return out


def chunk_corpus(paragraphs: Sequence[str], chunking: Chunking) -> Chunks:
    """Cut every paragraph into chunks; a chunk's text is the paragraph text between its first and last word."""
    texts, para_ids, starts, ends, pieces, offsets = [], [], [], [], [], [0]
    for p, text in enumerate(paragraphs):
        sentences = sentence_spans(text)
        words = [m.span() for m in _WORD.finditer(text)]
        if chunking.unit == "word":
            spans = [(words[i][0], words[j - 1][1]) for i, j in _windows([1] * len(words), chunking.size, chunking.overlap, True)]
        else:
            lengths = [len(_WORD.findall(text[s:e])) for s, e in sentences]
            spans = [(sentences[i][0], sentences[j - 1][1]) for i, j in _windows(lengths, chunking.size, chunking.overlap, False)]
        for start, end in spans:
            texts.append(text[start:end])
            para_ids.append(p)
            starts.append(start)
            ends.append(end)
            for s, e in sentences:
                lo, hi = max(s, start), min(e, end)
                piece = text[lo:hi].strip()
                if piece:
                    pieces.append(piece)
            offsets.append(len(pieces))
    return Chunks(texts, np.array(para_ids), np.array(starts), np.array(ends), pieces, np.array(offsets))


# --- BM25 --------------------------------------------------------------------------------
def terms(text: str) -> list[str]:
    """The lower-cased word tokens of ``text`` (BM25's terms)."""
    return _TERM.findall(text.lower())


@dataclass
class Bm25Index:
    """Okapi BM25 as an inverted index: per term, the chunks holding it and their precomputed weights.

    Weights are ``idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avglen))`` with idf from
    ``rank_bm25.BM25Okapi``, so a query's scores equal ``BM25Okapi.get_scores`` (a test checks it)
    without its per-query loop over all chunks.
    """

    vocabulary: dict[str, int]
    postings_offsets: np.ndarray  # (n_terms + 1,) int32
    postings_chunks: np.ndarray  # int32
    postings_weights: np.ndarray  # float32
    n_chunks: int

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25Index:
        """The index of ``texts``, one entry per chunk."""
        from rank_bm25 import BM25Okapi

        tokenised = [terms(t) for t in texts]
        okapi = BM25Okapi(tokenised, k1=BM25_K1, b=BM25_B)
        vocabulary = {term: i for i, term in enumerate(sorted(okapi.idf))}
        per_term: list[list[tuple[int, float]]] = [[] for _ in vocabulary]
        for chunk, frequencies in enumerate(okapi.doc_freqs):
            norm = BM25_K1 * (1 - BM25_B + BM25_B * okapi.doc_len[chunk] / okapi.avgdl)
            for term, tf in frequencies.items():
                per_term[vocabulary[term]].append((chunk, okapi.idf[term] * tf * (BM25_K1 + 1) / (tf + norm)))
        offsets = np.zeros(len(vocabulary) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([len(p) for p in per_term])
        flat = [posting for postings in per_term for posting in postings]
        return cls(vocabulary, offsets, np.array([c for c, _ in flat], dtype=np.int32),
                   np.array([w for _, w in flat], dtype=np.float32), len(texts))

    def scores(self, query: str) -> np.ndarray:
        """(n_chunks,) BM25 score of every chunk for ``query`` (zeros when no term is known)."""
        ids = [self.vocabulary[t] for t in terms(query) if t in self.vocabulary]
        if not ids:
            return np.zeros(self.n_chunks, dtype=np.float32)
        ranges = [np.arange(self.postings_offsets[i], self.postings_offsets[i + 1]) for i in ids]
        rows = np.concatenate(ranges)
        return np.bincount(self.postings_chunks[rows], weights=self.postings_weights[rows], minlength=self.n_chunks)

    @property
    def nbytes(self) -> int:
        """The index's size in bytes (arrays and vocabulary)."""
        vocabulary_bytes = sum(len(t.encode()) for t in self.vocabulary) + 4 * len(self.vocabulary)
        return self.postings_offsets.nbytes + self.postings_chunks.nbytes + self.postings_weights.nbytes + vocabulary_bytes


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (ties: lower index first)."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


# --- dense -------------------------------------------------------------------------------
@dataclass
class EmbeddingCache:
    """MiniLM vectors by text: each distinct text is embedded once per instance."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, texts: Sequence[str], encoder: Any) -> np.ndarray:
        """(n, 384) float32 vectors of ``texts``, embedding with ``encoder`` only those not seen before."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            # Similar lengths in a batch waste less compute on padding.
            order = sorted(range(len(missing)), key=lambda i: len(missing[i]))
            embedded = encoder([missing[i] for i in order])
            for row, i in enumerate(order):
                self.vectors[missing[i]] = embedded[row]
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, 384), np.float32)


def build_faiss_index(vectors: np.ndarray, config: Config) -> tuple[Any, dict[str, Any]]:
    """A faiss inner-product index over unit vectors (so scores are cosines); returns it and its settings."""
    import faiss

    dim, n = vectors.shape[1], vectors.shape[0]
    settings: dict[str, Any] = {}
    if config["index"] == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config["index"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = config["ef_search"]
    else:
        # k-means needs at least one point per list; small corpora (few long chunks) get fewer lists.
        nlist = min(config["nlist"], max(1, n // 4))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # a few points per list is what these corpus sizes give
        index.train(vectors)
        index.nprobe = min(config["nprobe"], nlist)
        settings = {"nlist_used": nlist, "nprobe_used": index.nprobe}
    index.add(vectors)
    return index, settings


# --- the problem -------------------------------------------------------------------------
class RagProblem(Problem):
    """Retrieval on XQuAD-en or your corpus and questions: chunking, BM25/dense/hybrid, faiss index, re-ranking vs recall, MRR, latency, memory."""

    def __init__(
        self,
        n_questions: int | None = 400,
        n_paragraphs: int | None = None,
        corpus: str | None = None,
        questions: str | None = None,
        embedding_model: str | None = None,
        reranker: str | None = None,
        cache_dir: str | None = None,
        device: str = "auto",
        gpus_per_eval: float = 0.25,
        embed_batch: int = 64,
        data_seed: int = 0,
    ):
        """Options:

        - ``corpus``: a folder of .txt / .md files (one document each; its id is its path inside the
          folder) or a JSON Lines file of ``{"id", "text"}`` documents; None: XQuAD-en's paragraphs.
        - ``questions``: with ``corpus``, a JSON Lines file of ``{"question", "answer", "doc_id"}``
          objects (``answer`` and/or ``doc_id``): a chunk is relevant when it comes from the gold
          document and contains the answer text (case-insensitive).
        - ``embedding_model``: a sentence-transformers-style checkpoint folder (its ``1_Pooling``
          config picks mean or CLS pooling; mean without one); None: the packaged all-MiniLM-L6-v2.
        - ``reranker``: a cross-encoder checkpoint folder (a sequence-classification model scoring
          (question, chunk) pairs; the last logit is the score). When given, the space gains
          ``rerank_with`` ("sentences": the built-in late interaction, or "cross-encoder"), and a
          cross-encoder re-orders the first stage's top 50 by its scores; its inference time counts in
          ``latency_ms`` (pair scores are computed once per instance and their measured time reused).
        - ``cache_dir``: a folder where vectors are kept on disk, keyed by a content hash of (model
          files, the exact texts embedded: corpus and chunking), so re-runs and other workers
          reuse them; None: in memory only.

        - ``n_questions``: questions scored per evaluation, drawn once with ``data_seed`` from those
          of the corpus paragraphs (None: all of them, 1,190 with the full corpus).
        - ``n_paragraphs``: corpus size, drawn once with ``data_seed`` from the 240 paragraphs (None:
          all). Fewer paragraphs make quick runs and tests cheaper, and retrieval easier.
        - ``device``: where MiniLM embeds texts: "auto" (cuda when available), "cpu", "cuda" or
          "cuda:N". faiss and BM25 always run on the CPU.
        - ``gpus_per_eval``: the GPU share one evaluation declares when MiniLM will run on a GPU.
        - ``embed_batch``: texts per MiniLM batch.
        - ``data_seed``: fixes the question and paragraph samples.
        """
        for name, value in (("n_questions", n_questions), ("n_paragraphs", n_paragraphs)):
            check_int(value, name, "rag", low=1, none=True)  # None: all
        if n_paragraphs is not None and n_paragraphs > 240:
            raise ValueError(f"rag option n_paragraphs={n_paragraphs!r} is not allowed; allowed: 1..240 (XQuAD-en has 240), or None")
        check_int(embed_batch, "embed_batch", "rag", low=1)
        check_device(device, "device", "rag")
        check_number(gpus_per_eval, "gpus_per_eval", "rag", low=0, low_open=True, high=1)
        check_int(data_seed, "data_seed", "rag")
        self.n_questions, self.n_paragraphs = n_questions, n_paragraphs
        self.device_option, self.embed_batch, self.data_seed = device, embed_batch, data_seed
        self.corpus_path, self.questions_path = corpus, questions
        self._cache: dict[str, Any] = {}
        if corpus is not None or questions is not None:
            from problems._data import DataError

            if corpus is None or questions is None:
                missing = "questions" if corpus is not None else "corpus"
                raise DataError(f"rag option {missing}=None: a corpus given by path needs its questions file and the "
                                f"other way round; expected both corpus and questions")
            if n_paragraphs is not None:
                raise DataError(f"rag option n_paragraphs={n_paragraphs!r} is only for XQuAD-en; expected None with corpus")
            self.corpus()  # reads and checks both files now, before any evaluation
            from problems._data import absolute

            self.corpus_path, self.questions_path = absolute(corpus), absolute(questions)
        from problems._minilm import resolve_checkpoint

        self.embedding_model = resolve_checkpoint(embedding_model, "rag", "embedding_model")
        self.pooling = _sentence_pooling(self.embedding_model)
        self.reranker = None if reranker is None else resolve_checkpoint(reranker, "rag", "reranker")
        if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
            raise ValueError(f"rag option cache_dir={cache_dir!r} is not allowed; allowed: a folder path, or None")
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser().absolute())

        self.space = Space([
            Categorical("unit", ("word", "sentence")),
            Categorical("chunk_size", CHUNK_SIZES),
            Categorical("overlap", OVERLAPS),
            Categorical("retriever", RETRIEVERS),
            Float("hybrid_weight", 0.0, 1.0, active_if={"retriever": ["hybrid"]}),
            Categorical("index", INDEXES, active_if={"retriever": ["dense", "hybrid"]}),
            Int("hnsw_m", 4, 64, log=True, active_if={"index": ["hnsw"]}),
            Int("ef_search", 8, 256, log=True, active_if={"index": ["hnsw"]}),
            Int("nlist", 4, 64, log=True, active_if={"index": ["ivf"]}),
            Int("nprobe", 1, 16, log=True, active_if={"index": ["ivf"]}),
            Int("top_k", 1, 20),
            Bool("rerank"),
            *([Categorical("rerank_with", ("sentences", "cross-encoder"), active_if={"rerank": [True]})]
              if reranker is not None else []),
        ])
        self.objectives = (  # scales and bounds: the units of hypervolumes and plots (qd.scaling)
            Objective("recall_at_k", "maximize", bounds=(0.0, 1.0)),
            Objective("mrr", "maximize", bounds=(0.0, 1.0)),
            Objective("latency_ms", "minimize", scale="log"),
            Objective("index_mb", "minimize", scale="log"),
        )
        self.measures = (
            Measure("log2_chunk_size", int(math.log2(CHUNK_SIZES[0])), int(math.log2(CHUNK_SIZES[-1])), integer=True),
            Measure("top_k", 1, 20, integer=True),
        )
        will_use_cuda = device.startswith("cuda") or (device == "auto" and _cuda_available())
        self.resources = Resources(cpus=1, gpus=float(gpus_per_eval) if will_use_cuda else 0.0, memory_mb=4000)

    # Lazy caches (MiniLM, embeddings, indexes) stay out of pickles sent to workers.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    # --- public helpers ----------------------------------------------------------------------
    @property
    def embedding_cache(self) -> EmbeddingCache:
        """Text -> vector cache; ``hits``/``misses`` count texts served from it and embedded."""
        return self._cache.setdefault("embeddings", EmbeddingCache())

    def corpus(self) -> tuple[list[str], list[Question]]:
        """The corpus paragraphs and the questions scored, both fixed by the options."""
        if "corpus" not in self._cache and self.corpus_path is not None:
            from problems._data import read_documents, read_questions

            documents = read_documents(self.corpus_path, "rag", "corpus")
            position = {d.id: i for i, d in enumerate(documents)}
            asked = read_questions(self.questions_path, set(position), "rag", "questions")
            questions = [TextQuestion(q.text, None if q.doc_id is None else position[q.doc_id], q.answer) for q in asked]
            if self.n_questions is not None and self.n_questions < len(questions):
                rng = np.random.default_rng(self.data_seed)
                questions = [questions[i] for i in sorted(rng.choice(len(questions), self.n_questions, replace=False))]
            self._cache["corpus"] = ([d.text for d in documents], questions)
        if "corpus" not in self._cache:
            paragraphs, questions = load_xquad()
            rng = np.random.default_rng(self.data_seed)
            kept = sorted(rng.choice(len(paragraphs), self.n_paragraphs, replace=False)) if self.n_paragraphs else range(len(paragraphs))
            renumber = {old: new for new, old in enumerate(kept)}
            paragraphs = [paragraphs[i] for i in kept]
            questions = [Question(q.text, renumber[q.paragraph], q.answer_start, q.answer_end)
                         for q in questions if q.paragraph in renumber]
            if self.n_questions is not None and self.n_questions < len(questions):
                questions = [questions[i] for i in sorted(rng.choice(len(questions), self.n_questions, replace=False))]
            self._cache["corpus"] = (paragraphs, questions)
        return self._cache["corpus"]

    def relevant(self, chunking: Chunking) -> list[np.ndarray]:
        """Per scored question, the mask of the chunks (of ``chunking``) that answer it."""
        key = ("relevant", chunking)
        if key not in self._cache:
            chunks = self.chunks(chunking)
            self._cache[key] = [relevant_chunks(chunks, q) for q in self.corpus()[1]]
        return self._cache[key]

    def chunks(self, chunking: Chunking) -> Chunks:
        """The corpus cut by ``chunking`` (cached per problem)."""
        key = ("chunks", chunking)
        if key not in self._cache:
            self._cache[key] = chunk_corpus(self.corpus()[0], chunking)
        return self._cache[key]

    def bm25(self, chunking: Chunking) -> Bm25Index:
        """The BM25 index of ``chunking``'s chunks (cached per problem)."""
        key = ("bm25", chunking)
        if key not in self._cache:
            self._cache[key] = Bm25Index.build(self.chunks(chunking).texts)
        return self._cache[key]

    # --- evaluation ----------------------------------------------------------------------------
    def evaluate(self, config: Config, seed: int) -> Evaluation:
        """Deterministic given the configuration (``seed`` is unused; timings vary run to run)."""
        config = self.space.validate(config)
        self._set_threads()
        import faiss

        faiss.omp_set_num_threads(1)  # single-query latency, as a serving process would see it
        chunking = Chunking(config["unit"], config["chunk_size"], config["overlap"])
        paragraphs, questions = self.corpus()
        chunks = self.chunks(chunking)
        retriever, rerank, top_k = config["retriever"], config["rerank"], config["top_k"]
        cross = config.get("rerank_with") == "cross-encoder"
        rerank_sentences = rerank and not cross
        use_dense = retriever in ("dense", "hybrid")
        use_bm25 = retriever in ("bm25", "hybrid")
        needs_query_vector = use_dense or rerank_sentences
        metadata: dict[str, Any] = {"n_chunks": len(chunks.texts), "n_questions": len(questions),
                                    "n_paragraphs": len(paragraphs)}

        hits_before, misses_before = self.embedding_cache.hits, self.embedding_cache.misses
        started = time.perf_counter()
        index_bytes = 0
        bm25 = self.bm25(chunking) if use_bm25 else None
        if bm25 is not None:
            index_bytes += bm25.nbytes
        disk_before = self._cache.get("disk_hits", 0)
        chunk_vectors = self._vectors(chunks.texts) if (use_dense or rerank_sentences) else None
        dense_index = None
        if use_dense:
            build_started = time.perf_counter()
            dense_index, settings = build_faiss_index(chunk_vectors, config)
            metadata.update(settings, index_build_s=time.perf_counter() - build_started)
            index_bytes += len(faiss.serialize_index(dense_index))
        piece_vectors = None
        if rerank_sentences:
            piece_vectors = self._vectors(chunks.piece_texts)
            index_bytes += piece_vectors.nbytes + chunks.piece_offsets.astype(np.int32).nbytes
            if not use_dense:  # a faiss index already holds the chunk vectors; BM25 does not
                index_bytes += chunk_vectors.nbytes
        query_vectors = self._question_vectors() if needs_query_vector else None
        metadata["prepare_s"] = time.perf_counter() - started
        metadata["texts_embedded"] = self.embedding_cache.misses - misses_before
        metadata["texts_from_cache"] = self.embedding_cache.hits - hits_before
        metadata["vector_sets_from_disk"] = self._cache.get("disk_hits", 0) - disk_before

        first_stage_k = POOL if (rerank or retriever == "hybrid") else top_k
        # One untimed query first, so one-off costs (first touches of the index) do not count as latency.
        self._retrieve(questions[0].text, None if query_vectors is None else query_vectors[:1], retriever, config,
                       first_stage_k, bm25, dense_index)
        relevant_masks = self.relevant(chunking)
        ranks = np.zeros(len(questions))  # 1-based rank of the first relevant chunk; 0: none in top_k
        answerable = 0
        search_s = 0.0
        for qi, question in enumerate(questions):
            query_vector = query_vectors[qi : qi + 1] if query_vectors is not None else None
            t0 = time.perf_counter()
            ranked = self._retrieve(question.text, query_vector, retriever, config, first_stage_k, bm25, dense_index)
            if rerank_sentences:
                ranked = _rerank(ranked, query_vector[0], chunk_vectors, piece_vectors, chunks.piece_offsets)
            search_s += time.perf_counter() - t0
            if cross and len(ranked):
                scores, model_s = self.cross_scores(question.text, [chunks.texts[i] for i in ranked])
                t0 = time.perf_counter()
                ranked = ranked[np.argsort(-scores, kind="stable")]
                search_s += time.perf_counter() - t0 + model_s
            ranked = ranked[:top_k]

            relevant = relevant_masks[qi]
            answerable += bool(relevant.any())
            hit = np.flatnonzero(relevant[ranked])
            if hit.size:
                ranks[qi] = hit[0] + 1

        search_ms = 1000.0 * search_s / len(questions)
        encode_ms = self._encode_latency_ms() if needs_query_vector else 0.0
        found = ranks > 0
        recall = float(found.mean())
        mrr = float(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0).mean())
        metadata.update(search_ms=search_ms, encode_ms=encode_ms, answerable=answerable / len(questions),
                        index_bytes=index_bytes)
        return Evaluation(
            values={"recall_at_k": recall, "mrr": mrr, "latency_ms": search_ms + encode_ms, "index_mb": index_bytes / MIB},
            measures=[math.log2(config["chunk_size"]), float(top_k)],
            metadata=metadata,
        )

    # --- internals -----------------------------------------------------------------------------
    @staticmethod
    def _retrieve(query: str, query_vector: np.ndarray | None, retriever: str, config: Config, k: int,
                  bm25: Bm25Index | None, dense_index: Any) -> np.ndarray:
        """Chunk indices, best first: the first stage (and fusion for hybrid)."""
        if retriever == "bm25":
            return top(bm25.scores(query), k)
        _, found = dense_index.search(query_vector, k)
        dense_ranked = found[0][found[0] >= 0]  # IVF with few probed lists can return fewer than k
        if retriever == "dense":
            return dense_ranked
        lexical_ranked = top(bm25.scores(query), k)
        weight = config["hybrid_weight"]
        fused: dict[int, float] = {}
        for rank, chunk in enumerate(dense_ranked):
            fused[int(chunk)] = weight / (RRF_K + rank + 1)
        for rank, chunk in enumerate(lexical_ranked):
            fused[int(chunk)] = fused.get(int(chunk), 0.0) + (1.0 - weight) / (RRF_K + rank + 1)
        candidates = np.fromiter(fused, dtype=np.int64, count=len(fused))
        scores = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
        return candidates[np.lexsort((candidates, -scores))][:k]

    @staticmethod
    def _set_threads() -> None:
        threads = os.environ.get(THREADS_ENV, "1")
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"environment variable {THREADS_ENV}={threads!r} is not allowed; allowed: an integer >= 1")
        import torch

        torch.set_num_threads(int(threads))

    def _device(self):
        import torch

        if self.device_option == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device_option)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"rag option device={self.device_option!r} but no CUDA device is available")
        return device

    def _minilm(self) -> tuple[Any, Any]:
        """(tokenizer, model) of the embedding model, loaded once per instance."""
        if "minilm" not in self._cache:
            from problems._minilm import load_checkpoint

            self._cache["minilm"] = load_checkpoint(self.embedding_model, device=self._device())
        return self._cache["minilm"]

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        from problems._minilm import embed

        tokenizer, model = self._minilm()
        return embed(texts, tokenizer, model, batch_size=self.embed_batch, pooling=self.pooling)

    def cross_scores(self, query: str, texts: Sequence[str]) -> tuple[np.ndarray, float]:
        """The cross-encoder's scores of (query, text) pairs, shape ``(len(texts),)``, and the seconds its
        inference took for them (measured when each pair was first scored)."""
        cache = self._cache.setdefault("cross_scores", {})
        missing = [t for t in dict.fromkeys(texts) if (query, t) not in cache]
        if missing:
            import torch

            if "cross_encoder" not in self._cache:
                from problems._minilm import load_checkpoint
                from transformers import AutoModelForSequenceClassification

                self._cache["cross_encoder"] = load_checkpoint(self.reranker, AutoModelForSequenceClassification, self._device())
            tokenizer, model = self._cache["cross_encoder"]
            started = time.perf_counter()
            with torch.no_grad():
                batch = tokenizer([query] * len(missing), list(missing), padding=True, truncation=True, max_length=512,
                                  return_tensors="pt").to(next(model.parameters()).device)
                scores = model(**batch).logits[:, -1].float().cpu().numpy()
            each = (time.perf_counter() - started) / len(missing)
            for text, score in zip(missing, scores):
                cache[(query, text)] = (float(score), each)
        pairs = [cache[(query, t)] for t in texts]
        return np.array([p[0] for p in pairs]), float(sum(p[1] for p in pairs))

    def _model_key(self) -> str:
        """A content hash of the embedding model: its files' bytes and the pooling."""
        if "model_key" not in self._cache:
            digest = hashlib.sha256(self.pooling.encode())
            folder = Path(self.embedding_model)
            files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
            for file in files:
                if file.suffix in (".json", ".txt", ".safetensors", ".bin", ".model"):
                    digest.update(file.relative_to(folder).as_posix().encode())
                    with open(file, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
            if not files:  # a cached hub name
                digest.update(str(self.embedding_model).encode())
            self._cache["model_key"] = digest.hexdigest()
        return self._cache["model_key"]

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``, shape ``(len(texts), dim)``: from memory, from ``cache_dir``, or embedded
        (and then written there; a write is atomic, so workers racing on one set lose nothing)."""
        if self.cache_dir is None:
            return self.embedding_cache.get(texts, self._encode)
        digest = hashlib.sha256(self._model_key().encode())
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x1e")
        path = Path(self.cache_dir).expanduser() / f"{digest.hexdigest()[:40]}.npy"
        if path.is_file():
            vectors = np.load(path)
            self._cache["disk_hits"] = self._cache.get("disk_hits", 0) + 1
            self.embedding_cache.vectors.update(zip(texts, vectors))
            return vectors
        vectors = self.embedding_cache.get(texts, self._encode)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        np.save(partial, vectors)
        os.replace(partial, path)
        return vectors

    def _question_vectors(self) -> np.ndarray:
        if "question_vectors" not in self._cache:
            self._cache["question_vectors"] = self._vectors([q.text for q in self.corpus()[1]])
        return self._cache["question_vectors"]

    def _encode_latency_ms(self) -> float:
        """Mean time to encode one question on its own (batch of one), after a warm-up."""
        if "encode_ms" not in self._cache:
            sample = [q.text for q in self.corpus()[1][: ENCODE_SAMPLE + 1]]
            self._encode(sample[:1])
            started = time.perf_counter()
            for text in sample[1:]:
                self._encode([text])
            self._cache["encode_ms"] = 1000.0 * (time.perf_counter() - started) / max(len(sample) - 1, 1)
        return self._cache["encode_ms"]


def _rerank(candidates: np.ndarray, query_vector: np.ndarray, chunk_vectors: np.ndarray,
            piece_vectors: np.ndarray, piece_offsets: np.ndarray) -> np.ndarray:
    """Order ``candidates`` by cosine(query, chunk) + max cosine(query, sentence of the chunk); ties keep the order."""
    if len(candidates) == 0:  # IVF probing only empty lists finds nothing
        return candidates
    starts, ends = piece_offsets[candidates], piece_offsets[candidates + 1]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
    similarities = piece_vectors[rows] @ query_vector
    best_sentence = np.maximum.reduceat(similarities, np.concatenate(([0], np.cumsum(ends - starts)[:-1])))
    return candidates[np.argsort(-(chunk_vectors[candidates] @ query_vector + best_sentence), kind="stable")]


def _sentence_pooling(model: str) -> str:
    """"cls" or "mean", as a sentence-transformers folder's 1_Pooling/config.json says (mean without one)."""
    config = Path(model) / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
