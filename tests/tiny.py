"""Tiny, self-contained fixtures: a BEIR corpus about a few topics and a random-init BERT
(with a WordPiece tokenizer trained on that corpus) built from a config in seconds."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

TOPICS = {
    "vitamin": ["vitamin", "deficiency", "bone", "fracture", "calcium", "elderly"],
    "cancer": ["tumor", "cancer", "metastasis", "chemotherapy", "cells", "colorectal"],
    "heart": ["cardiac", "heart", "artery", "blood", "pressure", "hypertension"],
    "brain": ["neurons", "brain", "cortex", "memory", "synapse", "cognitive"],
    "virus": ["virus", "infection", "immune", "vaccine", "antibody", "influenza"],
    "gene": ["gene", "mutation", "dna", "expression", "genome", "protein"],
}
FILLER = ["the", "study", "shows", "patients", "with", "results", "increase", "reduced", "trial", "effect",
          "analysis", "significant", "risk", "associated", "data", "observed", "in", "of", "and", "a"]


def write_tiny_beir(root: Path, n_docs: int = 60, seed: int = 0, with_labels: bool = True) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    topics = list(TOPICS)
    docs = []
    for i in range(n_docs):
        topic = topics[i % len(topics)]
        words = [rng.choice(TOPICS[topic]) if rng.random() < 0.4 else rng.choice(FILLER) for _ in range(40)]
        docs.append({"_id": f"d{i}", "title": f"{topic} study {i}", "text": " ".join(words) + ".", "topic": topic})
    with (root / "corpus.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({k: d[k] for k in ("_id", "title", "text")}) + "\n")
    if not with_labels:
        return root
    queries: list[dict[str, str]] = []
    qrels: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    for qi in range(24):
        topic = topics[qi % len(topics)]
        text = " ".join(rng.sample(TOPICS[topic], 3))
        queries.append({"_id": f"q{qi}", "text": text})
        split = "train" if qi < 18 else "test"
        rel = [d["_id"] for d in docs if d["topic"] == topic][:3]
        qrels[split].extend((f"q{qi}", r, 1) for r in rel)
    with (root / "queries.jsonl").open("w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        with (root / "qrels" / f"{split}.tsv").open("w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for qid, did, grade in rows:
                f.write(f"{qid}\t{did}\t{grade}\n")
    return root


def write_tiny_bert(root: Path, corpus_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a WordPiece vocab trained on the corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for line in (corpus_dir / "corpus.jsonl").read_text().splitlines():
        d = json.loads(line)
        texts.append(f"{d['title']}. {d['text']}")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    # The vocab is built here rather than by tokenizers' WordPieceTrainer, whose ties between equally frequent
    # merges fall by a per-process hash order: every corpus word whole, and every character alone and as a
    # continuation piece, in a fixed order, so the same seed gives the same model in every process.
    counts: Counter[str] = Counter()
    for text in texts + [".,;:!?()-"]:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = specials + chars + [f"##{c}" for c in chars] + words
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.save(str(root / "tokenizer.json"))
    (root / "vocab.txt").write_text("\n".join(t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(root))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast",
                                                            "do_lower_case": True}))
    return root


def write_tiny_seq2seq(root: Path, corpus_dir: Path, seed: int = 0) -> Path:
    """A 1-layer BART with random weights and a word-level tokenizer trained on the corpus."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in (corpus_dir / "corpus.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(root))
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=tok.get_vocab_size(), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=2)
    BartForConditionalGeneration(config).save_pretrained(str(root))
    return root


def write_trec_pool(root: Path) -> Path:
    """A TREC DL-style pool from the tiny corpus: test judgments only and a BM25 run (top 20)."""
    import shutil

    from index_build.data import load_collection
    from models.sparse_index import BM25Index

    data = write_tiny_beir(root / "pool")
    shutil.rmtree(data / "qrels")
    write_tiny_beir(root / "full")
    (data / "qrels").mkdir()
    shutil.copyfile(root / "full" / "qrels" / "test.tsv", data / "qrels" / "test.tsv")
    col = load_collection(data)
    bm = BM25Index.build(col.doc_texts())
    (data / "runs").mkdir()
    with (data / "runs" / "BM25.trec").open("w") as f:
        for qid in col.qrels["test"]:
            s, i = bm.search([col.queries[qid]], 20)
            for rank, (x, j) in enumerate(zip(s[0], i[0]), start=1):
                if j >= 0:
                    f.write(f"{qid} Q0 {col.docs[int(j)].id} {rank} {x:.4f} bm25\n")
    return data
