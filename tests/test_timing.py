"""The shared timing helper: warm-up first, interleaved rounds in alternating order, per-round ratios, and a
measurement marked unreliable when times spread or the load moves (on a fake clock and a fake load)."""

from __future__ import annotations

import pytest
import torch

from kvpress_ext.evaluation import timing


class FakeMachine:
    """A clock that only advances when a side runs, and a load average that follows a script."""

    def __init__(self, loads=None):
        self.now = 0.0
        self.cpu = 0.0
        self.calls: list[str] = []
        self.loads = list(loads or [])

    def side(self, name: str, durations):
        durations = iter(durations)

        def run():
            self.calls.append(name)
            seconds = next(durations)
            self.now += seconds
            self.cpu += seconds / 2  # half of the wall time on a core, the rest waiting for one
            return name

        return run

    def load(self):
        value = self.loads.pop(0) if len(self.loads) > 1 else (self.loads[0] if self.loads else 1.0)
        return {"loadavg_1m": value, "loadavg_5m": value, "cpu_count": 2, "busy": value >= 1}


@pytest.fixture
def machine(monkeypatch):
    m = FakeMachine()
    monkeypatch.setattr(timing.time, "perf_counter", lambda: m.now)
    monkeypatch.setattr(timing.time, "process_time", lambda: m.cpu)
    monkeypatch.setattr(timing, "machine_load", m.load)
    return m


def test_warm_up_then_interleaved_rounds_in_alternating_order(machine):
    sides = {"full": machine.side("full", [9, 4, 4, 4]), "fused": machine.side("fused", [9, 1, 1, 1])}
    c = timing.compare(sides, "full", repeat=3, warmup=1)
    assert machine.calls == ["full", "fused", "full", "fused", "fused", "full", "full", "fused"]
    assert c.sides["full"].seconds == [4, 4, 4] and c.sides["fused"].seconds == [1, 1, 1]  # warm-up not timed
    assert c.ratio("fused") == 0.25 and c.ratio_of_best("fused") == 0.25 and c.ratio_spread("fused") == 0
    assert c.reliable and c.reasons == [] and c.results == {"full": "full", "fused": "fused"}
    assert c.as_dict()["ratios"]["fused"]["per_round"] == [0.25, 0.25, 0.25]
    assert c.sides["full"].cpu_seconds == [2, 2, 2] and c.cpu_ratios("fused") == [0.25, 0.25, 0.25]
    assert "CPU time 0.250x, spread 0 %; reliable" in c.summary("fused")


def test_ratio_is_the_median_of_per_round_ratios(machine):
    """A slow round slows both sides alike: the per-round ratio is unaffected, the ratio of medians would not be."""
    sides = {"full": machine.side("full", [1, 4, 8, 4.4]), "fused": machine.side("fused", [1, 1, 2, 1])}
    c = timing.compare(sides, "full", repeat=3, max_spread=0.2)
    assert c.ratios["fused"] == pytest.approx([0.25, 0.25, 1 / 4.4], abs=1e-12)
    assert c.ratio("fused") == 0.25 and c.sides["full"].median == pytest.approx(4.4) and c.sides["full"].best == 4
    assert not c.reliable and any(r.startswith("full times spread") for r in c.reasons)  # full: 4, 8, 4.4


def test_spread_of_the_ratio_makes_it_unreliable(machine):
    sides = {"full": machine.side("full", [1, 4, 4, 4]), "fused": machine.side("fused", [1, 1, 2, 1])}
    c = timing.compare(sides, "full", repeat=3, max_spread=0.15)
    assert not c.reliable
    assert c.reasons[0] == "fused/full ratios spread 100 % > 15 %"
    assert "UNRELIABLE: fused/full ratios spread" in c.summary("fused")


@pytest.mark.parametrize(("loads", "reliable"), [([1.0, 1.2, 1.4, 1.9], True), ([1.0, 1.2, 1.4, 2.2], False)])
def test_load_change_beyond_the_limit_makes_it_unreliable(machine, loads, reliable):
    machine.loads = loads  # max_load_change 0.5 per CPU on 2 CPUs: a range of 1.0 is allowed
    sides = {"a": machine.side("a", [1] * 4), "b": machine.side("b", [2] * 4)}
    c = timing.compare(sides, "a", repeat=3)
    assert c.reliable is reliable and c.ratio("b") == 2.0
    assert c.as_dict()["load_start"]["loadavg_1m"] == 1.0 and c.as_dict()["load_end"]["loadavg_1m"] == loads[-1]
    if not reliable:
        assert c.reasons == ["load average moved by 1.20 (> 1.00 on 2 CPUs)"]


def test_one_round_is_never_reliable_and_bad_arguments_fail(machine):
    c = timing.compare({"a": machine.side("a", [1, 1]), "b": machine.side("b", [1, 1])}, "a", repeat=1)
    assert not c.reliable and c.reasons == ["a single timed round has no spread"]
    with pytest.raises(ValueError, match="reference 'x' is not one of the sides"):
        timing.compare({"a": print}, "x")
    with pytest.raises(ValueError, match="repeat >= 1"):
        timing.compare({"a": print}, "a", repeat=0)


def test_relative_spread():
    assert timing.relative_spread([2.0, 3.0, 4.0]) == pytest.approx(2 / 3)
    assert timing.relative_spread([5.0]) == 0


def test_record_carries_ratio_speedup_spread_load_and_flag(machine):
    """The flat record every migrated benchmark stores: speed-up = reference / side per round, exact on the fake clock."""
    machine.loads = [1.0, 1.1, 1.2, 3.0]
    sides = {"full": machine.side("full", [4, 4, 4, 4]), "lazy": machine.side("lazy", [2, 2, 2, 2])}
    r = timing.compare(sides, "full", repeat=3).record("lazy")
    assert r["ratio"] == 0.5 and r["speedup"] == 2.0 and r["ratio_spread"] == 0 and r["speedup_spread"] == 0
    assert r["cpu_ratio"] == 0.5 and r["rounds"] == 3 and r["threads"] >= 1
    assert r["load_start"]["loadavg_1m"] == 1.0 and r["load_end"]["loadavg_1m"] == 3.0
    assert r["reliable"] is False and r["reasons"] == ["load average moved by 2.00 (> 1.00 on 2 CPUs)"]


def test_between_two_sides_is_their_per_round_time_ratio(machine):
    sides = {"ref": machine.side("ref", [1, 1, 1, 1]), "a": machine.side("a", [1, 2, 2, 3]),
             "b": machine.side("b", [1, 1, 1, 1])}
    c = timing.compare(sides, "ref", repeat=3)
    assert c.between("a", "b") == {"median": 2.0, "spread": 0.5, "per_round": [2.0, 2.0, 3.0]}


def test_profile_call_names_the_heaviest_operator_first_with_its_share():
    a, small = torch.randn(400, 400), torch.randn(8)

    def work():
        for _ in range(5):
            a @ a  # about 5 x 128 M flops: dominates
        small.sin()

    ops = timing.profile_call(work, top=3)
    assert len(ops) <= 3
    assert ops[0]["op"] in ("aten::mm", "aten::matmul") and ops[0]["calls"] == 5
    assert [o["self_s"] for o in ops] == sorted((o["self_s"] for o in ops), reverse=True)
    assert 0.5 < ops[0]["share"] <= 1.0 and sum(o["share"] for o in ops) <= 1.0 + 1e-9
