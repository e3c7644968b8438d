"""Torch student models: dense bi-encoder, ColBERT, cross-encoder.

Every student wraps a Hugging Face encoder loaded from a checkpoint directory
(default: the packaged all-MiniLM-L6-v2) and saves itself as::

    DIR/encoder.json      models.encoders.EncoderConfig (kind, lengths, pooling, ...)
    DIR/tokenizer.json    the tokenizer the ONNX runtime uses
    DIR/hf/               the Hugging Face encoder (save_pretrained)
    DIR/head.pt           extra weights (ColBERT projection, cross-encoder classifier)

so ``load_student(DIR)`` rebuilds the exact module (used by export parity checks).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import EncoderConfig
from models.tokenization import Batch, TextTokenizer

log = logging.getLogger(__name__)


def _tokenizer_file(checkpoint: Path) -> Path:
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: tokenizer.json missing (a fast tokenizer file is required)")
    return path


def to_torch(batch: Batch, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.as_dict().items()}


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``h``'s token states over the real tokens (``[batch, hidden]``)."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Student(nn.Module):
    """Base: a transformer encoder plus the config that the ONNX runtime reads back."""

    kind: str = ""
    #: autocast dtype of the transformer's passes (set by the training loop; None: fp32). The
    #: heads and everything after the transformer run in fp32 either way.
    compute_dtype: torch.dtype | None = None

    def __init__(self, checkpoint: Path, config: EncoderConfig) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.checkpoint = Path(checkpoint)
        self.config = config
        self.encoder = AutoModel.from_pretrained(str(checkpoint), add_pooling_layer=False)
        self.tokenizer = TextTokenizer.from_file(_tokenizer_file(self.checkpoint))
        self._tokenizer_path = _tokenizer_file(self.checkpoint)

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs are moved there)."""
        return next(self.parameters()).device

    def hidden(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The last layer's token states ``[batch, length, hidden]``."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids, every_layer=False)[-1]

    def hidden_states(self, input_ids, attention_mask, token_type_ids,
                      every_layer: bool = True) -> tuple[torch.Tensor, ...]:
        """Every layer's token states, the embeddings first and the last layer last (with
        ``every_layer=False``, the last layer's alone), in fp32."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": every_layer}
        if getattr(self.encoder.config, "type_vocab_size", 0) > 1:
            kwargs["token_type_ids"] = token_type_ids
        if self.compute_dtype is None:
            out = self.encoder(**kwargs)
        else:
            with torch.autocast(input_ids.device.type, dtype=self.compute_dtype):
                out = self.encoder(**kwargs)
        states = out.hidden_states if every_layer else (out.last_hidden_state,)
        return tuple(h.float() for h in states)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(str(directory / "hf"))
        shutil.copyfile(self._tokenizer_path, directory / "tokenizer.json")
        shutil.copyfile(self._tokenizer_path, directory / "hf" / "tokenizer.json")
        head = self.head_state()
        if head:
            torch.save(head, directory / "head.pt")
        self.config.save(directory)


class DenseStudent(Student):
    """Bi-encoder: pooled token states (mean or CLS), L2-normalized for cosine similarity."""

    kind = "dense"

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.head(self.hidden(input_ids, attention_mask, token_type_ids), attention_mask)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled token states (mean over the real tokens, or [CLS]), normalized for cosine."""
        pooled = h[:, 0] if self.config.pooling == "cls" else mean_pool(h, attention_mask)
        if self.config.similarity == "cos":
            pooled = F.normalize(pooled, dim=-1)
        return pooled

    def head(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The embedding from the last-layer token states ``h``."""
        return self.pool(h, attention_mask)

    def embed_with_states(self, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding and the last layer's token states it came from (one pass)."""
        h = self.hidden(input_ids, attention_mask, token_type_ids)
        return self.head(h, attention_mask), h

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        return self(**to_torch(self.tokenizer.encode(texts, self.config.max_query_len), self.device))

    def encode_docs(self, texts: list[str]) -> torch.Tensor:
        return self(**to_torch(self.tokenizer.encode(texts, self.config.max_doc_len), self.device))


class ColbertStudent(Student):
    """ColBERT: token states projected to ``dim`` (128) and L2-normalized; MaxSim scoring."""

    kind = "colbert"

    def __init__(self, checkpoint: Path, config: EncoderConfig) -> None:
        super().__init__(checkpoint, config)
        self.proj = nn.Linear(self.encoder.config.hidden_size, config.dim, bias=False)

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        h = self.hidden(input_ids, attention_mask, token_type_ids)
        return F.normalize(self.proj(h), dim=-1)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"proj.weight": self.proj.weight.detach().cpu()}

    @torch.no_grad()
    def token_states(self, texts: list[str], *, queries: bool = False, batch_size: int = 16) -> list[torch.Tensor]:
        """The encoder's output before the projection, one float32 ``[n_i, hidden]`` per text,
        in eval mode: documents as the index encodes them (skiplist applied), queries with all
        ``colbert_query_len`` positions ([MASK] augmentation included)."""
        was_training = self.training
        self.eval()
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            batch = (self.tokenizer.encode_colbert_queries(chunk, self.config.colbert_query_len) if queries
                     else self.tokenizer.encode_colbert_docs(chunk, self.config.max_doc_len))
            h = self.hidden(**to_torch(batch, self.device)).float().cpu()
            keep = (torch.ones(h.shape[:2], dtype=torch.bool) if queries
                    else torch.from_numpy(self.tokenizer.colbert_doc_keep_mask(batch)))
            out += [h[r][keep[r]] for r in range(len(chunk))]
        self.train(was_training)
        return out

    @torch.no_grad()
    def init_projection_pca(self, texts: list[str], batch_size: int = 16) -> float:
        """Set the projection to the top ``dim`` principal directions of the encoder's token
        states over ``texts`` (documents as the index encodes them: skiplist applied), instead
        of ``nn.Linear``'s random init, so that MaxSim starts from the subspace where the
        checkpoint's token states vary most. Returns the share of their variance kept.

        Untrained all-MiniLM-L6-v2 reranking TREC DL19's BM25 top-100 by MaxSim: nDCG@10
        0.4543 with the random projection, 0.5116 with this one (``benchmarks/colbert_init.py``).
        """
        if self.config.dim > self.encoder.config.hidden_size:
            raise ValueError(f"a PCA projection needs dim <= hidden size, got {self.config.dim} > "
                             f"{self.encoder.config.hidden_size}")
        x = torch.cat(self.token_states(texts, batch_size=batch_size))
        if len(x) < self.config.dim:
            raise ValueError(f"{len(x)} token states cannot give {self.config.dim} principal directions")
        directions, kept = principal_directions(x, self.config.dim)
        self.proj.weight.copy_(directions.to(self.proj.weight.dtype))
        return kept

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer.encode_colbert_queries(texts, self.config.colbert_query_len)
        return self(**to_torch(batch, self.device))

    def encode_docs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors ``[n, L, dim]`` and the keep mask (real, non-punctuation tokens)."""
        batch = self.tokenizer.encode_colbert_docs(texts, self.config.max_doc_len)
        keep = torch.from_numpy(self.tokenizer.colbert_doc_keep_mask(batch)).to(self.device)
        return self(**to_torch(batch, self.device)), keep

    @staticmethod
    def maxsim(q: torch.Tensor, d: torch.Tensor, d_keep: torch.Tensor) -> torch.Tensor:
        """Score query ``i`` against doc ``i``: ``q [n, Lq, dim]``, ``d [n, Ld, dim]`` -> ``[n]``."""
        sims = torch.einsum("nqd,ntd->nqt", q, d)
        sims = sims.masked_fill(~d_keep.unsqueeze(1), -1e4)
        return sims.max(dim=-1).values.sum(dim=-1)


class CrossEncoderStudent(Student):
    """Cross-encoder: a linear head on the [CLS] state of ``[CLS] q [SEP] d [SEP]``."""

    kind = "cross-encoder"

    def __init__(self, checkpoint: Path, config: EncoderConfig) -> None:
        super().__init__(checkpoint, config)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        h = self.hidden(input_ids, attention_mask, token_type_ids)
        return self.classifier(h[:, 0]).squeeze(-1)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()}

    def score_pairs(self, queries: list[str], docs: list[str]) -> torch.Tensor:
        batch = self.tokenizer.encode_pairs(queries, docs, self.config.max_doc_len, self.config.max_query_len)
        return self(**to_torch(batch, self.device))


def principal_directions(x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The top ``k`` principal directions of the rows of ``x`` (``[k, width]``, orthonormal,
    computed in float64) and the share of the rows' variance they keep.

    >>> d, kept = principal_directions(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [0.0, -0.1]]), 1)
    >>> [abs(round(v, 6)) for v in d[0].tolist()], round(kept, 4)
    ([1.0, 0.0], 0.9901)
    """
    x = x.double()
    _, singular, vt = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
    variance = singular.pow(2)
    return vt[:k], float(variance[:k].sum() / variance.sum())


class AsymmetricStudent(DenseStudent):
    """A query encoder into a teacher's document space (asymmetric distillation).

    The document space is the concatenation of the teacher's dense members' normalized
    document embeddings, so one dot product with ``[q_1; ...; q_m]`` sums the members'
    cosines. The student encodes queries only: its pooled, normalized embedding ``u`` is
    mapped to each member's part by a linear map and normalized, ``[n(W_1 u); ...; n(W_m u)]``.
    With the ``layers-mlp`` head each part adds a residual MLP of every layer's mean-pooled
    states ``x`` (standardized by fixed statistics), ``n(W_i u + MLP_i(x))``: the members'
    query embeddings are non-linear functions of the text that the last layer's pooled state
    alone, mapped linearly, approximates least for the larger member
    (``benchmarks/results/asym-head.md``). Documents are never encoded by it: the artifact's
    index holds the members' own document vectors. Saved and served as a dense model
    (``config.extra["asymmetric"]`` records the members, their dimensions and the head;
    ``config.dim`` is their sum).
    """

    #: the layer features' standardization (buffers of the ``layers-mlp`` head)
    feature_mean: torch.Tensor
    feature_scale: torch.Tensor

    def __init__(self, checkpoint: Path, config: EncoderConfig) -> None:
        super().__init__(checkpoint, config)
        spec = config.extra.get("asymmetric")
        if not spec or not spec.get("dims"):
            raise ValueError("an asymmetric student needs config.extra['asymmetric'] with the members' dims")
        hidden = self.encoder.config.hidden_size
        if sum(spec["dims"]) != config.dim:
            raise ValueError(f"asymmetric student: dim {config.dim} != the members' dims {spec['dims']} summed")
        self.maps = nn.ModuleList(nn.Linear(hidden, d, bias=False) for d in spec["dims"])
        self.head_kind = spec.get("head", "linear")
        self.residuals = nn.ModuleList()
        if self.head_kind == "layers-mlp":
            width = (self.encoder.config.num_hidden_layers + 1) * hidden
            self.register_buffer("feature_mean", torch.zeros(width))
            self.register_buffer("feature_scale", torch.ones(width))
            for d in spec["dims"]:
                out = nn.Linear(spec["hidden"], d)
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
                self.residuals.append(nn.Sequential(nn.Linear(width, spec["hidden"]), nn.GELU(), out))
        elif self.head_kind != "linear":
            raise ValueError(f"asymmetric student: unknown head {self.head_kind!r}")

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.embed_with_states(input_ids, attention_mask, token_type_ids)[0]

    def embed_with_states(self, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.residuals:
            return super().embed_with_states(input_ids, attention_mask, token_type_ids)
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        u = self.pool(states[-1], attention_mask)
        return self.parts(u, self.layer_features(states, attention_mask)), states[-1]

    def head(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.residuals:
            raise RuntimeError("the layers-mlp head reads every layer: call embed_with_states")
        return self.parts(self.pool(h, attention_mask), None)

    @staticmethod
    def layer_features(states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
        """Every layer's mean-pooled states side by side (``[batch, (layers + 1) * hidden]``)."""
        return torch.cat([mean_pool(h, attention_mask) for h in states], dim=-1)

    def parts(self, u: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The query vector from the pooled state ``u`` (and, with residual MLPs, the layer
        features): each member's part normalized, side by side."""
        if not self.residuals:
            return torch.cat([F.normalize(m(u), dim=-1) for m in self.maps], dim=-1)
        assert features is not None
        x = (features - self.feature_mean) / self.feature_scale
        return torch.cat([F.normalize(m(u) + r(x), dim=-1) for m, r in zip(self.maps, self.residuals)], dim=-1)

    @torch.no_grad()
    def encode_pooled(self, texts: list[str]) -> torch.Tensor:
        """The normalized pooled query embedding ``u`` the maps read."""
        inputs = to_torch(self.tokenizer.encode(texts, self.config.max_query_len), self.device)
        return self.pool(self.hidden(**inputs), inputs["attention_mask"])

    @torch.no_grad()
    def encode_features(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` (:meth:`encode_pooled`) and every layer's pooled states (:meth:`layer_features`)."""
        inputs = to_torch(self.tokenizer.encode(texts, self.config.max_query_len), self.device)
        mask = inputs["attention_mask"]
        states = self.hidden_states(inputs["input_ids"], mask, inputs["token_type_ids"])
        return self.pool(states[-1], mask), self.layer_features(states, mask)

    def set_maps(self, weights: list[np.ndarray]) -> None:
        """Set each member's map (``[hidden, dim_i]`` arrays, as :func:`ridge_map` fits them)."""
        if len(weights) != len(self.maps):
            raise ValueError(f"{len(weights)} maps for {len(self.maps)} members")
        with torch.no_grad():
            for m, w in zip(self.linear_maps, weights):
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(w, dtype=np.float32).T)))

    @property
    def linear_maps(self) -> list[nn.Linear]:
        """The members' maps, in the order of their parts."""
        return [m for m in self.maps if isinstance(m, nn.Linear)]

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's trainable weights (maps and residual MLPs)."""
        return [*self.maps.parameters(), *self.residuals.parameters()]

    def head_state(self) -> dict[str, torch.Tensor]:
        """Everything but the transformer: the maps, and a layers-mlp head's MLPs and statistics."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`head_state` saved (or the maps' own state, as linear heads once were)."""
        if not any(k.startswith("maps.") for k in state):
            state = {f"maps.{k}": v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("encoder.") for k in missing):
            raise ValueError(f"asymmetric head state does not fit this head: missing "
                             f"{[k for k in missing if not k.startswith('encoder.')]}, unexpected {unexpected}")


class WithTokenStates(nn.Module):
    """A dense student whose graph also outputs its last-layer token states (``[batch,
    length, hidden]``), from the same pass as the embedding: the service projects ColBERT's
    query tokens from them (:func:`models.encoders.project_query_tokens`), so a dense first
    stage reranked by ColBERT runs one transformer pass per query."""

    def __init__(self, student: DenseStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.embed_with_states(input_ids, attention_mask, token_type_ids)


def new_asymmetric_student(checkpoint: Path, members: list[str], dims: list[int], head: str = "linear",
                           head_hidden: int = 1536, **config_overrides) -> AsymmetricStudent:
    """An asymmetric student from ``checkpoint`` into the space of ``members`` (model
    references, in the order of their parts) with part dimensions ``dims`` and head ``head``
    ("linear", or "layers-mlp" with ``head_hidden`` units). Each map starts at zero;
    :meth:`AsymmetricStudent.set_maps` sets them (e.g. to ridge fits)."""
    base = new_student("dense", checkpoint, **config_overrides)
    config = base.config
    config.dim = int(sum(dims))
    config.similarity = "cos"
    spec: dict = {"members": list(members), "dims": [int(d) for d in dims]}
    if head != "linear":
        spec |= {"head": head, "hidden": int(head_hidden)}
    config.extra = {**config.extra, "asymmetric": spec}
    student = AsymmetricStudent(Path(checkpoint), config)
    with torch.no_grad():
        for m in student.linear_maps:
            m.weight.zero_()
    return student


def ridge_map(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``W`` (``[dim_x, dim_y]``) minimizing ``|x W - y|^2 + alpha |W|^2``: the linear map that
    best predicts ``y`` (e.g. a teacher member's query embeddings) from ``x`` (the student's).

    >>> x = np.eye(3, dtype=np.float32); ridge_map(x, 2 * x, alpha=0.0).round(3).tolist()
    [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y).astype(np.float32)


STUDENTS: dict[str, type[Student]] = {
    "dense": DenseStudent,
    "colbert": ColbertStudent,
    "cross-encoder": CrossEncoderStudent,
}


def new_student(kind: str, checkpoint: Path, **config_overrides) -> Student:
    """A student initialized from ``checkpoint`` (a local HF directory)."""
    if kind not in STUDENTS:
        raise ValueError(f"unknown student kind {kind!r}; choose from {sorted(STUDENTS)}")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(checkpoint))
    defaults = {"dim": 128 if kind == "colbert" else hf_config.hidden_size, "base_model": str(checkpoint)}
    if kind == "dense":
        defaults["pooling"] = _checkpoint_pooling(checkpoint)
    config = EncoderConfig(kind=kind, **{**defaults, **config_overrides})  # type: ignore[arg-type]
    limit = position_limit(hf_config)
    if limit is not None:
        for name in ("max_doc_len", "max_query_len", "colbert_query_len"):
            if getattr(config, name) > limit:
                log.warning("%s: %s=%d exceeds the checkpoint's %d positions; using %d",
                            checkpoint, name, getattr(config, name), limit, limit)
                setattr(config, name, limit)
    return STUDENTS[kind](Path(checkpoint), config)


#: model types whose position ids start after the padding index
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer"}


def position_limit(hf_config) -> int | None:
    """The most tokens a checkpoint's position embeddings take in one sequence (RoBERTa-style
    models, MPNet's included, offset their positions past the padding index), None if unknown."""
    positions = getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    pad = getattr(hf_config, "pad_token_id", None)
    offset = pad + 1 if hf_config.model_type in _OFFSET_POSITIONS and isinstance(pad, int) else 0
    return positions - offset


def load_student(directory: Path) -> Student:
    """Rebuild a saved student exactly (weights of encoder and head)."""
    directory = Path(directory)
    config = EncoderConfig.load(directory)
    cls = AsymmetricStudent if config.extra.get("asymmetric") else STUDENTS[config.kind]
    student = cls(directory / "hf", config)
    head = directory / "head.pt"
    if head.is_file():
        state = torch.load(head, map_location="cpu", weights_only=True)
        if isinstance(student, AsymmetricStudent):
            student.load_head_state(state)
        elif isinstance(student, ColbertStudent):
            student.proj.weight.data.copy_(state["proj.weight"])
        elif isinstance(student, CrossEncoderStudent):
            student.classifier.load_state_dict(state)
    student.eval()
    return student


def interpolate_with_base(student: Student, base_checkpoint: Path, alpha: float) -> Student:
    """WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): set the
    transformer's weights to ``base + alpha * (trained - base)``, in place. ``alpha = 1`` keeps
    the distilled model, ``0`` the base; task heads (ColBERT projection, cross-encoder
    classifier) keep their trained weights. Guards a student distilled on a narrow query
    distribution (e.g. extractive pseudo-queries) against forgetting what the base knew."""
    from transformers import AutoModel

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {alpha}")
    base = AutoModel.from_pretrained(str(base_checkpoint), add_pooling_layer=False).state_dict()
    trained = student.encoder.state_dict()
    if set(base) != set(trained):
        raise ValueError(f"{base_checkpoint} does not have the student's architecture: cannot interpolate")
    mixed = {k: base[k] + alpha * (v - base[k]) if v.is_floating_point() else v for k, v in trained.items()}
    student.encoder.load_state_dict(mixed)
    return student


def _checkpoint_pooling(checkpoint: Path) -> str:
    """Read sentence-transformers' pooling choice when the checkpoint has one."""
    import json

    cfg = Path(checkpoint) / "1_Pooling" / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
