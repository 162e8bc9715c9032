"""The chunk store's resident tiers: least recently used out first, the byte budget honoured, an entry read and
verified from disk once while resident, read and verified again after eviction, and fusion unchanged by them."""

from __future__ import annotations

import pytest
import torch

from kvpress_ext.core.errors import CacheFormatError
from kvpress_ext.presses.a3 import A3Press, ChunkStore
from kvpress_ext.storage import chunk_store as CS
from kvpress_ext.storage.chunk_store import ResidentTier
from kvpress_ext.testing import random_chunks, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNKS = [[4 + i, 9, 17, 33, 65, 3, 7, 8] for i in range(4)]  # four chunks of the same size (same bytes)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


@pytest.fixture
def stored(model, tmp_path):
    """A store with every chunk of CHUNKS on disk; returns (root, bytes of one entry)."""
    ChunkStore(tmp_path, model).precompute(CHUNKS)
    return tmp_path, ChunkStore(tmp_path, model).get(CHUNKS[0]).nbytes


@pytest.fixture
def reads(monkeypatch):
    """Paths of the tensor files read from disk (each read is also a checksum verification)."""
    seen = []
    real = CS.read_verified_tensors
    monkeypatch.setattr(CS, "read_verified_tensors", lambda path, *a, **k: seen.append(path.parent) or real(path, *a, **k))
    return seen


def _corrupt(path):
    data = bytearray((path / CS.TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (path / CS.TENSORS).write_bytes(bytes(data))


def test_hits_return_the_same_tensors_read_once(model, stored, reads):
    root, size = stored
    store = ChunkStore(root, model, memory_bytes=10 * size)
    first = store.get(CHUNKS[1])
    again = store.get(CHUNKS[1])
    assert reads.count(store.chunk_path(CHUNKS[1])) == 1 and store.memory_hits == 1 and store.hits == 2
    assert all(a is b for a, b in zip(first.keys + first.values, again.keys + again.values))
    plain = ChunkStore(root, model).get(CHUNKS[1])  # no tier: the file's tensors
    assert all(torch.equal(a, b) for a, b in zip(plain.keys + plain.values, again.keys + again.values))


def test_least_recently_used_entry_is_evicted_first(model, stored):
    root, size = stored
    store = ChunkStore(root, model, memory_bytes=2 * size)  # room for exactly two entries
    a, b, c = (store.chunk_path(x) for x in CHUNKS[:3])
    store.get(CHUNKS[0])
    store.get(CHUNKS[1])
    store.get(CHUNKS[0])  # a is now the most recent
    store.get(CHUNKS[2])  # evicts b, not a
    assert list(store.tiers[0].entries) == [a, c]
    store.get(CHUNKS[0])
    store.get(CHUNKS[1])  # evicts c
    assert list(store.tiers[0].entries) == [a, b]


@pytest.mark.parametrize("budget_entries", [0.5, 1, 1.5, 3])
def test_byte_budget_is_never_exceeded(model, stored, budget_entries):
    root, size = stored
    budget = int(budget_entries * size)
    store = ChunkStore(root, model, memory_bytes=budget)
    for chunk in CHUNKS + CHUNKS[::-1] + CHUNKS:
        store.get(chunk)
        tier = store.tiers[0]
        assert tier.used == sum(e.nbytes for e in tier.entries.values()) <= budget
    assert len(tier.entries) == min(int(budget_entries), len(CHUNKS))  # as many as fit


def test_an_entry_larger_than_the_budget_is_read_from_disk_each_time(model, stored, reads):
    root, size = stored
    store = ChunkStore(root, model, memory_bytes=size - 1)
    for _ in range(3):
        store.get(CHUNKS[0])
    assert reads.count(store.chunk_path(CHUNKS[0])) == 3 and store.memory_hits == 0 and not store.tiers[0].entries


def test_evicted_entry_is_reloaded_and_verified_again(model, stored, reads):
    """While resident, a damaged file is not read (one read per process); once evicted, the next use reads the
    file again and its checksum catches the damage."""
    root, size = stored
    store = ChunkStore(root, model, memory_bytes=size)
    original = [t.clone() for t in store.get(CHUNKS[0]).keys]
    path = store.chunk_path(CHUNKS[0])
    _corrupt(path)
    assert all(torch.equal(a, b) for a, b in zip(store.get(CHUNKS[0]).keys, original))
    assert reads.count(path) == 1  # served from memory although the file is damaged
    store.get(CHUNKS[1])  # evicts chunk 0
    assert path not in store.tiers[0].entries
    with pytest.raises(CacheFormatError, match="does not match its checksum"):
        store.get(CHUNKS[0])
    assert reads.count(path) >= 2  # read again (a damaged read is retried once under the entry's lock)


def test_host_tier_takes_what_the_first_tier_evicts_and_gives_it_back(model, stored, reads):
    root, size = stored
    store = ChunkStore(root, model, memory_bytes=size, host_bytes=2 * size)
    paths = [store.chunk_path(c) for c in CHUNKS]
    for chunk in CHUNKS[:3]:
        store.get(chunk)
    assert list(store.tiers[0].entries) == paths[2:3] and list(store.tiers[1].entries) == paths[:2]
    for p in paths[:3]:
        _corrupt(p)  # none of them is read again while resident
    store.get(CHUNKS[0])  # from the host tier, moved up; chunk 2 goes down
    assert list(store.tiers[0].entries) == paths[:1] and list(store.tiers[1].entries) == [paths[1], paths[2]]
    store.get(CHUNKS[3])  # chunk 0 goes down, chunk 1 falls out of memory
    assert list(store.tiers[1].entries) == [paths[2], paths[0]]
    assert all(reads.count(p) == 1 for p in paths) and store.memory_hits == 1
    with pytest.raises(CacheFormatError, match="does not match its checksum"):
        store.get(CHUNKS[1])


def test_surprisal_request_is_not_served_by_an_entry_without_it(model, tmp_path):
    store = ChunkStore(tmp_path, model, memory_bytes=1 << 20)
    assert store.get(CHUNKS[0]).surprisal is None
    upgraded = ChunkStore(tmp_path, model, save_surprisal=True, memory_bytes=1 << 20)
    upgraded.get(CHUNKS[0])
    assert upgraded.get(CHUNKS[0], need_surprisal=True).surprisal is not None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_memory_budget_must_be_bytes(model, tmp_path, bad):
    with pytest.raises(ValueError, match="a memory budget must be a number of bytes >= 0"):
        ChunkStore(tmp_path, model, memory_bytes=bad)
    with pytest.raises(ValueError, match="a memory budget must be a number of bytes >= 0"):
        ResidentTier(bad)


@pytest.mark.parametrize("strategy", ["debug", "blend"])
def test_fusion_from_resident_chunks_equals_fusion_from_files_and_leaves_them_intact(model, tmp_path, strategy):
    chunks, q = random_chunks(3)
    from_files = A3Press(strategy=strategy, rate=0.3, store=ChunkStore(tmp_path, model))
    resident = A3Press(strategy=strategy, rate=0.3, store=ChunkStore(tmp_path, model, memory_bytes=1 << 24))
    ref_cache, ref_logits = from_files.fuse(model, chunks, q)
    before = [[t.clone() for t in resident.store.get(c).keys + resident.store.get(c).values] for c in chunks]
    for _ in range(2):
        cache, logits = resident.fuse(model, chunks, q)
        assert torch.equal(logits, ref_logits)
        assert all(torch.equal(cache.layers[i].keys, ref_cache.layers[i].keys) for i in range(2))
    after = [resident.store.get(c).keys + resident.store.get(c).values for c in chunks]
    assert all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))
    assert resident.store.memory_hits >= 2 * len(chunks)
