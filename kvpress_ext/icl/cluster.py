"""Cluster worked examples by question so a new question can be answered from a cache of similar ones.

``build_clusters`` embeds every record's question with a local embedding model, groups them with k-means and
keeps the centroids; ``nearest_cluster`` embeds a new question and returns the records of the closest
centroid, ready to be written as the ``--data`` of ``kvpress-ext icl precompute``. Everything runs offline:
the embedder is a local sentence-transformers directory (used when that optional package is installed) or
any Hugging Face model directory, mean-pooled over its last hidden state.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvpress_ext.icl.workflow import ICLInputError, load_documents
from kvpress_ext.storage.inputs import read_json_file
from kvpress_ext.storage.safe_write import write_output

FORMAT_VERSION = 1
_FIX = "give a local sentence-transformers or Hugging Face model directory with --embedder"
_PROGRESS_MIN_BATCHES = 4  # fewer batches finish before a bar would be worth drawing


# --------------------------------------------------------------------------------------------- embedders


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` (batch, seq, d) over the positions where ``attention_mask`` is 1, so padding is ignored."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class _HFEmbedder:
    """Any Hugging Face model directory: mean of the last hidden state over the real (non-padding) tokens.

    Batches are right-padded by hand, so a text gets the same positions alone or in a batch and tokenizers
    without a pad token (most causal LMs) work unchanged.
    """

    def __init__(self, path: Path, device: str):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        loader = AutoModelForCausalLM if self.causal else AutoModel
        self.model = loader.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.device = device
        limits = [n for n in (getattr(config, "max_position_embeddings", None), self.tokenizer.model_max_length)
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0  # masked out, so any valid id will do
        self.accepts = set(inspect.signature(self.model.forward).parameters)

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, truncation=self.max_length is not None, max_length=self.max_length)
        width = max(len(ids) for ids in enc["input_ids"])
        batch = {"input_ids": [ids + [self.pad_id] * (width - len(ids)) for ids in enc["input_ids"]],
                 "attention_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids in enc["input_ids"]]}
        if "token_type_ids" in enc and "token_type_ids" in self.accepts:
            batch["token_type_ids"] = [t + [0] * (width - len(t)) for t in enc["token_type_ids"]]
        return {k: torch.tensor(v, device=self.device) for k, v in batch.items()}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self._batch(texts)
        if self.causal:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in self.accepts else {}
            hidden = self.model(**batch, output_hidden_states=True, use_cache=False, **extra).hidden_states[-1]
        else:
            hidden = self.model(**batch).last_hidden_state
        return mean_pool(hidden.float(), batch["attention_mask"])


class _SentenceTransformerEmbedder:
    """A sentence-transformers directory: its own pooling and normalisation modules, as its authors intended."""

    def __init__(self, model):
        self.model = model

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)
        return out.float()


class Embedder:
    """A loaded local embedding model; load once and reuse it for building and querying."""

    def __init__(self, model_path, device: str | None = None):
        path = Path(model_path)
        self.path = str(path.resolve())
        if not path.is_dir():
            raise ICLInputError(f"Embedding model {model_path} is not a directory; {_FIX}.")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.kind = "huggingface"
        try:
            if (path / "modules.json").is_file() and (st := _import_sentence_transformers()) is not None:
                self.kind = "sentence-transformers"
                self._embed = _SentenceTransformerEmbedder(st.SentenceTransformer(str(path), device=device))
            else:
                self._embed = _HFEmbedder(path, device)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ICLInputError(f"Cannot load embedding model {model_path} ({first}); {_FIX}.") from exc

    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), d) float32 CPU tensor of L2-normalised embeddings, batched; a progress bar for long runs."""
        if batch_size < 1:
            raise ICLInputError(f"--batch_size must be >= 1, got {batch_size}.")
        texts = [str(t) for t in texts]
        starts = range(0, len(texts), batch_size)
        parts = [self._embed(texts[i:i + batch_size]).cpu()
                 for i in tqdm(starts, desc="embedding", unit="batch", disable=len(starts) < _PROGRESS_MIN_BATCHES)]
        if not parts:
            raise ICLInputError("Nothing to embed: the list of texts is empty.")
        return F.normalize(torch.cat(parts).float(), dim=-1)


def _import_sentence_transformers():
    """The optional ``sentence_transformers`` package, or None; imported only when a directory asks for it."""
    try:
        import sentence_transformers
    except ImportError:
        return None
    return sentence_transformers


def _as_embedder(embedder) -> Embedder:
    return embedder if isinstance(embedder, Embedder) else Embedder(embedder)


def embed_texts(texts: list[str], model_path, batch_size: int = 32) -> torch.Tensor:
    """Embed ``texts`` with the local model at ``model_path`` (or a loaded :class:`Embedder`): (n, d), unit rows."""
    return _as_embedder(model_path).embed(texts, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- k-means


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).clamp(min=0)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre is drawn with probability proportional to squared distance."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = _sq_distances(x, x[chosen]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            nxt = int(torch.multinomial(closest / total, 1, generator=generator))
        else:  # every point sits on a centre already (repeated points): any point will do
            nxt = int(torch.randint(n, (1,), generator=generator))
        chosen.append(nxt)
        closest = torch.minimum(closest, _sq_distances(x, x[nxt:nxt + 1]).squeeze(1))
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 100,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding; returns (centroids (k, d), labels (n,)). Deterministic per seed.

    Stops when no assignment changes or after ``max_iter`` rounds; on return every point is then assigned to
    its nearest centroid and every centroid is the mean of its points. A cluster left empty is re-seeded at
    the point farthest from its own centroid, so k clusters survive whenever there are k distinct points.
    On L2-normalised rows squared Euclidean distance orders pairs exactly as cosine similarity does.
    ``init`` (k, d) replaces the k-means++ seeding.
    """
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ICLInputError(f"k must be an integer between 1 and the number of points ({n}), got {k!r}.")
    if max_iter < 1:
        raise ICLInputError(f"max_iter must be >= 1, got {max_iter}.")
    data = x.detach().double().cpu()
    generator = torch.Generator().manual_seed(seed)
    if init is None:
        centroids = _kmeans_pp(data, k, generator)
    elif tuple(init.shape) != (k, data.shape[1]):
        raise ICLInputError(f"init must have shape ({k}, {data.shape[1]}), got {tuple(init.shape)}.")
    else:
        centroids = init.detach().double().cpu().clone()
    labels = None
    for _ in range(max_iter):
        dist = _sq_distances(data, centroids)
        new_labels = dist.argmin(1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        own = dist.gather(1, labels[:, None]).squeeze(1)  # each point's distance to its own centroid
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = data[members].mean(0)
            else:
                far = int(own.argmax())
                centroids[c] = data[far]
                own[far] = -1.0  # a second empty cluster takes the next farthest point
    return centroids.to(x.dtype), labels


# --------------------------------------------------------------------------------------------- clusters


def build_clusters(records: list[dict], embedder, k: int, seed: int = 0, *, batch_size: int = 32,
                   max_iter: int = 100) -> dict:
    """Embed each record's question and k-means them; the result holds centroids, member indices and records."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(records):
        raise ICLInputError(f"--k must be between 1 and the number of questions ({len(records)}), got {k!r}.")
    embedder = _as_embedder(embedder)
    vectors = embedder.embed([r["question"] for r in records], batch_size=batch_size)
    centroids, labels = kmeans(vectors, k, seed=seed, max_iter=max_iter)
    return {
        "format": FORMAT_VERSION, "embedder": embedder.path, "embedder_kind": embedder.kind, "k": k, "seed": seed,
        "dim": vectors.shape[1], "centroids": centroids.tolist(),
        "clusters": [torch.nonzero(labels == c).flatten().tolist() for c in range(k)],
        "records": records,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_clusters(clusters: dict, out, data_path=None) -> Path:
    """Write ``clusters`` as JSON; with ``data_path`` store that file's path and hash instead of the records."""
    out = Path(out)
    saved = dict(clusters)
    if data_path is not None:
        data_path = Path(data_path)
        saved.pop("records")
        saved["data"] = {"path": str(data_path.resolve()), "sha256": _sha256(data_path),
                         "count": len(clusters["records"])}

    return write_output(out, json.dumps(saved, indent=1), flag="--out")


def load_clusters(path) -> dict:
    """Read a saved clustering; records kept by reference are re-read and must match the saved hash."""
    path = Path(path)
    if not path.is_file():
        raise ICLInputError(f"Clusters file {path} does not exist; run `kvpress-ext icl cluster build --out {path}`.")
    clusters = read_json_file(path, "--clusters", "a clusters file from `kvpress-ext icl cluster build`",
                              error=ICLInputError)
    needed = {"format", "embedder", "centroids", "clusters"}
    if not isinstance(clusters, dict) or not needed <= set(clusters) or not ({"records", "data"} & set(clusters)):
        raise ICLInputError(f"{path} is not a clusters file; build one with `kvpress-ext icl cluster build`.")
    version = clusters["format"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ICLInputError(f"{path} has unknown clusters format version {version!r} (this version reads "
                            f"{FORMAT_VERSION}); rebuild it with `kvpress-ext icl cluster build`.")
    if version != FORMAT_VERSION:
        raise ICLInputError(f"{path} has clusters format {version}, this version reads "
                            f"{FORMAT_VERSION}; rebuild it with `kvpress-ext icl cluster build`.")
    centroids = clusters["centroids"]
    if not (isinstance(centroids, list) and centroids and all(isinstance(row, list) and row for row in centroids)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for row in centroids for x in row)):
        raise ICLInputError(f"{path} has missing, malformed or non-finite centroids; rebuild it with "
                            "`kvpress-ext icl cluster build`.")
    if "records" not in clusters:
        data = Path(clusters["data"]["path"])
        records = load_documents(data)
        if _sha256(data) != clusters["data"]["sha256"] or len(records) != clusters["data"]["count"]:
            raise ICLInputError(f"Data file {data} changed since {path} was built (content hash differs); "
                                f"rebuild with `kvpress-ext icl cluster build`.")
        clusters["records"] = records
    members, n = clusters["clusters"], len(clusters["records"]) if isinstance(clusters["records"], list) else -1
    if not (isinstance(members, list) and len(members) == len(centroids) and len({len(r) for r in centroids}) == 1
            and all(isinstance(m, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
                                                 for i in m) for m in members)):
        raise ICLInputError(f"{path} has cluster members that are not indices of its {max(n, 0)} records (or "
                            "centroids of unequal width); rebuild it with `kvpress-ext icl cluster build`.")
    return clusters


def nearest_cluster(clusters: dict, question: str, embedder=None) -> tuple[int, list[dict]]:
    """The id and records of the non-empty cluster whose centroid is closest to ``question``'s embedding.

    ``embedder`` defaults to the model the clusters were built with; another one must have the same width.
    """
    embedder = _as_embedder(embedder if embedder is not None else clusters["embedder"])
    vector = embedder.embed([question])
    centroids = torch.tensor(clusters["centroids"], dtype=vector.dtype)
    if vector.shape[1] != centroids.shape[1]:
        raise ICLInputError(f"Embedder {embedder.path} gives {vector.shape[1]}-d vectors but the clusters were "
                            f"built with {centroids.shape[1]}-d ones from {clusters['embedder']}; use that one.")
    dist = _sq_distances(vector, centroids).squeeze(0)
    dist[torch.tensor([len(m) == 0 for m in clusters["clusters"]])] = float("inf")
    best = int(dist.argmin())
    return best, [clusters["records"][i] for i in clusters["clusters"][best]]
