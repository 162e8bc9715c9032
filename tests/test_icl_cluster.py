"""``icl cluster``: k-means against known partitions, mean pooling against a hand computation on stories260k,
build/query through the command line, and the one-line errors."""

import json
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path

from kvpress_ext.cli import main
from kvpress_ext.icl import cluster
from kvpress_ext.icl import workflow as wf

DOCS = [
    {"question": "The cat sat on the mat and purred at the kitten.", "solution": "A cat purrs.", "answer": "1"},
    {"question": "A little cat chased a mouse and the kitten meowed.", "solution": "Cats chase mice.", "answer": "2"},
    {"question": "The kitten and the cat drank milk and purred.", "solution": "Cats like milk.", "answer": "3"},
    {"question": "The rocket flew up to the moon and the stars.", "solution": "Rockets fly.", "answer": "4"},
    {"question": "Tim built a big rocket to fly to space and the moon.", "solution": "Tim flies.", "answer": "5"},
    {"question": "The rocket went zoom into the sky past the stars.", "solution": "Zoom.", "answer": "6"},
]


def _partition(labels) -> set[frozenset[int]]:
    """Labels as a set of member sets, so two labelings compare equal up to renaming the clusters."""
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels.tolist() if torch.is_tensor(labels) else labels):
        groups.setdefault(label, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def _blobs(seed=0, per_blob=20, dim=8, blobs=3):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(blobs, dim, generator=gen) * 10
    truth = torch.arange(blobs).repeat_interleave(per_blob)
    x = centres[truth] + 0.1 * torch.randn(len(truth), dim, generator=gen)
    order = torch.randperm(len(truth), generator=gen)  # interleave the blobs so index order gives nothing away
    return x[order], truth[order]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_separated_blobs(seed):
    x, truth = _blobs(seed)
    centroids, labels = cluster.kmeans(x, 3, seed=seed)
    assert _partition(labels) == _partition(truth)
    for c in range(3):
        torch.testing.assert_close(centroids[c], x[labels == c].mean(0), rtol=0, atol=1e-5)
        nearest = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        assert torch.equal(nearest, labels)


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = _blobs(5, per_blob=7, blobs=4)
    first = cluster.kmeans(x, 6, seed=11)
    second = cluster.kmeans(x, 6, seed=11)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_kmeans_k1_is_the_mean_and_bad_k_errors():
    x, _ = _blobs(1)
    centroids, labels = cluster.kmeans(x, 1)
    torch.testing.assert_close(centroids[0], x.mean(0), rtol=0, atol=1e-5)
    assert labels.tolist() == [0] * len(x)
    for k in (0, -1, len(x) + 1, 2.0, True):
        with pytest.raises(wf.ICLInputError, match="k must be"):
            cluster.kmeans(x, k)


def test_kmeans_reseeds_an_empty_cluster_at_the_farthest_point():
    x, truth = _blobs(2, blobs=2)
    far_away = torch.full((1, x.shape[1]), 1000.0)  # no point is nearest to it: its cluster starts empty
    init = torch.cat([x[truth == 0].mean(0, keepdim=True), far_away])
    _, labels = cluster.kmeans(x, 2, init=init)
    assert _partition(labels) == _partition(truth)


def test_mean_pool_ignores_masked_positions():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(cluster.mean_pool(hidden, mask), expected)


def test_embeddings_match_manual_mean_pooling_and_ignore_padding(stories260k):
    model, tok = stories260k
    path = shared_path("models", "stories260k")
    texts = ["The cat sat.", "Once upon a time a big red rocket flew up to the moon with Tim and Lily."]
    assert len(tok(texts[0])["input_ids"]) < len(tok(texts[1])["input_ids"])  # so the batch really is padded
    with torch.no_grad():
        manual = []
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            manual.append(F.normalize(last.mean(0), dim=0))
    batched = cluster.embed_texts(texts, path, batch_size=2)
    alone = cluster.embed_texts(texts[:1], path)
    assert batched.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(batched, torch.stack(manual), rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], batched[0], rtol=0, atol=1e-5)


def test_sentence_transformers_directory_is_used_only_when_the_package_imports(tmp_path, monkeypatch):
    class FakeSentenceTransformer:
        def __init__(self, path, device):
            self.path = path

        def encode(self, texts, **kwargs):
            return torch.tensor([[float(len(t)), 3.0] for t in texts])

    st_dir = tmp_path / "st"
    shutil.copytree(shared_path("models", "stories260k"), st_dir)  # also a plain HF model, for the fallback
    (st_dir / "modules.json").write_text("[]")
    monkeypatch.setitem(sys.modules, "sentence_transformers",
                        types.SimpleNamespace(SentenceTransformer=FakeSentenceTransformer))
    embedder = cluster.Embedder(st_dir)
    assert embedder.kind == "sentence-transformers"
    torch.testing.assert_close(embedder.embed(["abcd"]), F.normalize(torch.tensor([[4.0, 3.0]]), dim=1))
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now fails: fall back to mean pooling
    embedder = cluster.Embedder(st_dir)
    assert embedder.kind == "huggingface" and embedder.embed(["abcd"]).shape == (1, 64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """DOCS clustered into two groups by stories260k through the command line."""
    root = tmp_path_factory.mktemp("cluster")
    data, out = root / "data.json", root / "clusters.json"
    data.write_text(json.dumps(DOCS))
    model = str(shared_path("models", "stories260k"))
    assert main(["icl", "cluster", "build", "--data", str(data), "--embedder", model, "--k", "2", "--seed", "3",
                 "--out", str(out)]) == 0
    return data, out, model


def test_build_saves_a_consistent_clustering(built):
    data, out, model = built
    saved = json.loads(out.read_text())
    assert saved["k"] == 2 and saved["seed"] == 3 and saved["data"]["count"] == len(DOCS)
    assert "records" not in saved and saved["data"]["path"] == str(data.resolve())
    assert sorted(i for members in saved["clusters"] for i in members) == list(range(len(DOCS)))
    vectors = cluster.embed_texts([d["question"] for d in DOCS], model)
    for centroid, members in zip(saved["centroids"], saved["clusters"]):
        torch.testing.assert_close(torch.tensor(centroid), vectors[members].mean(0), rtol=0, atol=1e-5)


def test_query_writes_one_cluster_as_precompute_data(built, tmp_path, capsys):
    _data, out, _model = built
    saved = json.loads(out.read_text())
    answer = tmp_path / "for_precompute.json"
    assert main(["icl", "cluster", "query", "--clusters", str(out), "--question", "A cat and a kitten purred.",
                 "--out", str(answer)]) == 0
    records = wf.load_documents(answer)
    groups = [[DOCS[i] for i in members] for members in saved["clusters"]]
    assert records in groups
    cluster_id = groups.index(records)
    assert f"cluster {cluster_id} ({len(records)} records)" in capsys.readouterr().out


def test_a_records_own_question_returns_its_cluster(built):
    _data, out, model = built
    clusters = cluster.load_clusters(out)
    embedder = cluster.Embedder(model)
    for i, doc in enumerate(DOCS):
        cluster_id, records = cluster.nearest_cluster(clusters, doc["question"], embedder)
        assert i in clusters["clusters"][cluster_id] and doc in records


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_errors_exit_2_with_one_line(built, tmp_path, capsys):
    data, _out, model = built
    build = ["icl", "cluster", "build", "--data", str(data), "--k", "2", "--out", str(tmp_path / "c.json")]
    assert main([*build, "--embedder", str(tmp_path / "missing")]) == 2
    assert "--embedder" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main([*build, "--embedder", str(tmp_path / "empty")]) == 2
    assert "Cannot load embedding model" in _one_line_error(capsys)
    assert main(["icl", "cluster", "build", "--data", str(data), "--embedder", model, "--k", "7",
                 "--out", str(tmp_path / "c.json")]) == 2
    assert "--k must be between 1 and the number of questions (6)" in _one_line_error(capsys)

    query = ["icl", "cluster", "query", "--question", "cat", "--out", str(tmp_path / "q.json")]
    assert main([*query, "--clusters", str(tmp_path / "nope.json")]) == 2
    assert "icl cluster build" in _one_line_error(capsys)
    copy_data, copy_out = tmp_path / "data.json", tmp_path / "clusters.json"
    copy_data.write_text(data.read_text())
    assert main(["icl", "cluster", "build", "--data", str(copy_data), "--embedder", model, "--k", "2",
                 "--out", str(copy_out)]) == 0
    capsys.readouterr()  # transformers' weight-loading bar
    copy_data.write_text(json.dumps(DOCS[:5] + [{**DOCS[5], "answer": "7"}]))
    assert main([*query, "--clusters", str(copy_out)]) == 2
    assert "changed since" in _one_line_error(capsys)
    assert not (tmp_path / "q.json").exists()
