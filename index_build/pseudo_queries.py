"""Pseudo-queries from a corpus alone, for the label-free distillation path.

Generators (pluggable, see :class:`Generator`):

- :class:`TitleGenerator`: the document title as a query (AugTriever-style extraction).
- :class:`SentenceGenerator`: salient sentences of the text (inverse-cloze style: a
  sentence as the query, its document as the positive), ranked by mean IDF.
- :class:`KeyphraseGenerator`: the top BM25-weighted terms of a passage, in text order.
- :class:`StatementGenerator`: the proposition a sentence reports ("... suggest that
  <statement>"): a self-contained claim in the document's own words, the form of a
  fact-checking or "is it true that" query.
- :class:`SpanGenerator`: random spans of a few words (Contriever-style cropping): many
  distinct, unpolished queries per document, for a student whose labels come from the
  teacher's ranking rather than from the source document.
- :class:`Seq2SeqGenerator`: doc2query with any HF seq2seq checkpoint (T5-style); needs
  torch + transformers and, for hub names, internet.

Filters (:func:`filter_queries`): normalization + de-duplication, length bounds, near-copy
removal, a cap per document, a total budget, and round-trip consistency with the teacher
(:func:`round_trip_filter`: keep a query only if its source document ranks in the
teacher's top-k; Promptagator).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from index_build.data import Doc

_WORD = re.compile(r"(?u)\b\w\w+\b")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have if in into is it its of on or such that the their then there "
    "these they this to was were will with we our not no can may also been than which who whom what when where why "
    "how all any both each few more most other some only own same so too very just should now do does did being "
    "between after before during over under again further here once about above below up down out off".split()
)


@dataclass(frozen=True)
class PseudoQuery:
    text: str
    doc: int            # corpus index of the source document (the positive)
    generator: str


class Generator(Protocol):
    name: str

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]: ...


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]


def document_frequencies(docs: Sequence[Doc]) -> tuple[Counter, int]:
    df: Counter = Counter()
    for d in docs:
        df.update(set(content_words(d.full_text)))
    return df, len(docs)


def idf(df: Counter, n: int, w: str) -> float:
    return math.log(1 + (n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5))


def most_informative(texts: Sequence[str], df: Counter, n: int, k: int, min_words: int, max_words: int) -> list[str]:
    """The ``k`` texts of ``[min_words, max_words]`` words with the highest mean IDF of their
    content words (ties in the given order); texts without content words are skipped."""
    scored = [(float(np.mean([idf(df, n, w) for w in ws])), t) for t in texts
              if min_words <= len(words(t)) <= max_words and (ws := content_words(t))]
    scored.sort(key=lambda x: -x[0])
    return [t for _, t in scored[:k]]


class TitleGenerator:
    name = "title"

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        return [PseudoQuery(d.title, i, self.name) for i, d in enumerate(docs) if d.title.strip()]


class SentenceGenerator:
    """Up to ``per_doc`` sentences per document, the most informative first (mean IDF of
    their content words); sentences outside ``[min_words, max_words]`` are skipped."""

    name = "sentence"

    def __init__(self, per_doc: int = 2, min_words: int = 4, max_words: int = 40) -> None:
        self.per_doc, self.min_words, self.max_words = per_doc, min_words, max_words

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        df, n = document_frequencies(docs)
        return [PseudoQuery(s, i, self.name) for i, d in enumerate(docs)
                for s in most_informative([t.strip() for t in _SENT.split(d.text)], df, n, self.per_doc,
                                          self.min_words, self.max_words)]


class KeyphraseGenerator:
    """The ``n_terms`` highest tf·idf (BM25-like) content words of each passage, in text order."""

    name = "keyphrase"

    def __init__(self, n_terms: int = 5, per_doc: int = 1, seed: int = 0) -> None:
        self.n_terms, self.per_doc, self.seed = n_terms, per_doc, seed

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        df, n = document_frequencies(docs)
        rng = random.Random(self.seed)
        out = []
        for i, d in enumerate(docs):
            ws = content_words(d.full_text)
            if len(ws) < 3:
                continue
            tf = Counter(ws)
            weight = {w: (c / (c + 1.2)) * idf(df, n, w) for w, c in tf.items() if not w.isdigit()}
            ranked = sorted(weight, key=lambda w: -weight[w])
            for k in range(self.per_doc):
                # first query: the top terms; further ones: a random subset of the top 2n (more diverse)
                pool = ranked[: self.n_terms] if k == 0 else rng.sample(ranked[: 2 * self.n_terms],
                                                                        min(self.n_terms, len(ranked)))
                chosen = set(pool)
                ordered = list(dict.fromkeys(w for w in ws if w in chosen))
                if len(ordered) >= 2:
                    out.append(PseudoQuery(" ".join(ordered), i, self.name))
        return out


class StatementGenerator:
    """Up to ``per_doc`` statements per document: the clause a reporting verb introduces
    ("these results indicate that <statement>", "we found that <statement>"), cut at the end
    of its sentence, the most informative first (mean IDF of its content words); clauses
    outside ``[min_words, max_words]`` are skipped. Sentences without such a verb give none."""

    name = "statement"
    _REPORTING = re.compile(
        r"\b(?:suggest|indicate|show|demonstrate|reveal|conclude|find|found|establish|confirm|support|report"
        r"|propose|hypothesi[sz]e|argue|observe|predict|imply|prove|say|said|note|believe)(?:s|d|ed)?"
        r"\s+(?:that|whether)\s+(.+)", re.IGNORECASE)

    def __init__(self, per_doc: int = 2, min_words: int = 4, max_words: int = 40) -> None:
        self.per_doc, self.min_words, self.max_words = per_doc, min_words, max_words

    def statements(self, text: str) -> list[str]:
        """Every reported clause of ``text``, in text order."""
        found = (self._REPORTING.search(sentence.strip()) for sentence in _SENT.split(text))
        return [m.group(1).strip().rstrip(".;:!?").strip() for m in found if m]

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        df, n = document_frequencies(docs)
        return [PseudoQuery(s, i, self.name) for i, d in enumerate(docs)
                for s in most_informative(self.statements(d.text), df, n, self.per_doc, self.min_words,
                                          self.max_words)]


class SpanGenerator:
    """``per_doc`` random spans of ``min_words`` to ``max_words`` consecutive words of each
    document's text (its title prefixed), each starting at a word boundary; seeded."""

    name = "span"

    def __init__(self, per_doc: int = 2, min_words: int = 4, max_words: int = 12, seed: int = 0) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(f"span lengths need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.per_doc, self.min_words, self.max_words, self.seed = per_doc, min_words, max_words, seed

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        rng = random.Random(self.seed)
        out = []
        for i, d in enumerate(docs):
            ws = d.full_text.split()
            if len(ws) < self.min_words:
                continue
            for _ in range(self.per_doc):
                n = rng.randint(self.min_words, min(self.max_words, len(ws)))
                start = rng.randint(0, len(ws) - n)
                out.append(PseudoQuery(" ".join(ws[start : start + n]), i, self.name))
        return out


class Seq2SeqGenerator:
    """doc2query: sample ``per_doc`` queries per document from a seq2seq checkpoint."""

    name = "seq2seq"

    def __init__(self, model_ref: str, per_doc: int = 3, max_input_len: int = 384, max_new_tokens: int = 32,
                 batch_size: int = 16, seed: int = 0, top_p: float = 0.95) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from models.sources import resolve_model

        path = resolve_model(model_ref)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval()
        self.per_doc, self.max_input_len, self.max_new_tokens = per_doc, max_input_len, max_new_tokens
        self.batch_size, self.seed, self.top_p = batch_size, seed, top_p
        self._torch = torch

    def generate(self, docs: Sequence[Doc]) -> list[PseudoQuery]:
        torch = self._torch
        torch.manual_seed(self.seed)
        out = []
        with torch.inference_mode():
            for start in range(0, len(docs), self.batch_size):
                chunk = docs[start : start + self.batch_size]
                enc = self.tokenizer([d.full_text for d in chunk], truncation=True, max_length=self.max_input_len,
                                     padding=True, return_tensors="pt")
                gen = self.model.generate(**enc, do_sample=True, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                          num_return_sequences=self.per_doc)
                texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
                for j, t in enumerate(texts):
                    out.append(PseudoQuery(t.strip(), start + j // self.per_doc, self.name))
        return out


def make_generator(spec: dict) -> Generator:
    kind = spec.get("kind", "")
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "title":
        return TitleGenerator()
    if kind == "sentence":
        return SentenceGenerator(**args)
    if kind == "keyphrase":
        return KeyphraseGenerator(**args)
    if kind == "statement":
        return StatementGenerator(**args)
    if kind == "span":
        return SpanGenerator(**args)
    if kind == "seq2seq":
        return Seq2SeqGenerator(**args)
    raise ValueError(f"unknown pseudo-query generator {kind!r}; choose title, sentence, keyphrase, statement, span, "
                     "seq2seq")


def default_budget(n_docs: int) -> int:
    """Queries to keep: one per two documents, within [500, 2,000]. The cap is CPU time:
    each query costs one Margin-MSE step share per student (raise it on a GPU)."""
    return int(min(2_000, max(500, n_docs // 2)))


def is_near_copy(query: str, doc: Doc, threshold: float = 0.8) -> bool:
    """True when the query is (nearly) the whole document: its words cover ≥ ``threshold``
    of the document's distinct content words, or it equals the text/title+text."""
    q = set(content_words(query))
    d = set(content_words(doc.full_text))
    if not d:
        return True
    norm = " ".join(words(query))
    if norm in {" ".join(words(doc.text)), " ".join(words(doc.full_text))}:
        return True
    return len(q & d) / len(d) >= threshold


def filter_queries(queries: Sequence[PseudoQuery], docs: Sequence[Doc], *, min_words: int = 2, max_words: int = 48,
                   per_doc: int = 3, budget: int | None = None, seed: int = 0) -> tuple[list[PseudoQuery], dict]:
    """Deduplicate, drop too short / too long / near-copies, cap per document, then sample a budget.

    Returns the kept queries and counts of what each filter dropped.
    """
    stats: Counter = Counter()
    seen: set[str] = set()
    per: Counter = Counter()
    kept: list[PseudoQuery] = []
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)  # so the per-doc cap does not always favour the first generator
    for i in order:
        q = queries[i]
        norm = " ".join(words(q.text))
        n = len(norm.split())
        if n < min_words:
            stats["too_short"] += 1
            continue
        if n > max_words:
            stats["too_long"] += 1
            continue
        if norm in seen:
            stats["duplicate"] += 1
            continue
        if is_near_copy(q.text, docs[q.doc]):
            stats["near_copy"] += 1
            continue
        if per[q.doc] >= per_doc:
            stats["per_doc_cap"] += 1
            continue
        seen.add(norm)
        per[q.doc] += 1
        kept.append(q)
    if budget is not None and len(kept) > budget:
        stats["budget"] += len(kept) - budget
        kept = random.Random(seed + 1).sample(kept, budget)
    stats["kept"] = len(kept)
    return kept, dict(stats)


def round_trip_filter(queries: Sequence[PseudoQuery], pools: Sequence[np.ndarray], teacher_scores: Sequence[np.ndarray],
                      top_k: int = 3) -> list[bool]:
    """Keep a query when its source document is among the teacher's top ``top_k`` of its pool."""
    keep = []
    for q, pool, t in zip(queries, pools, teacher_scores):
        top = pool[np.argsort(-t)[:top_k]]
        keep.append(bool(np.any(top == q.doc)))
    return keep
