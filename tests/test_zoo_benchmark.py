"""benchmarks/zoo.py's variant pipelines on the CPU at tiny shapes: every variant's selection and
attention run through the public ops, the fast-vs-reference check sees no error where both are the
reference, and the cost models say that each variant reads fewer keys than dense."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo  # noqa: E402

TINY = {"msa": dict(block=16, topk=4, Di=16), "nsa": dict(l=8, d=4, lsel=16, n=4, w=32),
        "dsa": dict(topk=40, J=4, Di=16), "csa": dict(m=4, topk=10, w=16, J=4, Di=16), "moba": dict(block=16, topk=3)}


@pytest.fixture
def tiny_cpu(monkeypatch):
    monkeypatch.setattr(zoo, "DEVICE", "cpu")
    monkeypatch.setitem(zoo.M3, "Hq", 8)
    monkeypatch.setitem(zoo.M3, "Hkv", 2)
    monkeypatch.setitem(zoo.M3, "D", 16)
    monkeypatch.setattr(zoo, "DTYPE", torch.float32)


@pytest.mark.parametrize("name", sorted(TINY))
def test_pipeline_runs_checks_and_costs_less_than_dense(tiny_cpu, name):
    var = zoo.Variant(name, TINY[name], 1, 96, 128, grad=True)
    sel = var.select()
    err, overlap = zoo.check(var, sel)
    assert err < 1e-6 and overlap == 1.0
    zoo.with_backward(lambda: var.attend(var.select()), var.leaves())()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in var.leaves())
    flops = var.flops()
    assert flops["selection"] + flops["attention"] <= flops["dense"]
    by = var.decode_bytes()
    assert 0 < by["variant"] < by["dense"]


def test_configs_that_coincide_run_once():
    assert zoo.configs_of("msa", ["published", "equal_budget"]) == [(["published", "equal_budget"],
                                                                      zoo.CONFIGS["msa"]["published"])]
    assert [names for names, _ in zoo.configs_of("moba", ["published", "equal_budget"])] == [["published"],
                                                                                              ["equal_budget"]]


def test_result_files_are_named_after_the_card_that_ran_them():
    """Every benchmark names its result files through cards.card_tag: no file name claims a fixed card."""
    import re

    from cards import card_tag

    assert card_tag("NVIDIA H200") == "h200" and card_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert card_tag("") == "cpu"
    for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"):
        fixed = re.findall(r"['\"]\w*_[hb]\d{3}\.(?:json|md|png)['\"]", path.read_text())
        assert not fixed, f"{path.name} writes {fixed}: name results with card_tag(card)"


def test_dense_decode_candidates_offer_folded_and_grouped_sdpa_and_agree():
    """Decode's dense baseline times each SDPA backend with the group folded into the query axis and with
    enable_gqa (either can be the fastest); every form that runs here gives the same attention."""
    import decode

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Q, S, D = 2, 8, 2, 3, 20, 16
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, Hq, Q, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    cands = decode.sdpa_decode_candidates(q, k, v, Q)
    assert {"sdpa_cudnn", "sdpa_cudnn_gqa", "sdpa_flash", "sdpa_flash_gqa"} <= set(cands)
    kk, vv = (x.repeat_interleave(Hq // Hkv, 1) for x in (k, v))
    want = torch.softmax(q @ kk.transpose(-1, -2) / D**0.5, -1) @ vv  # every key, as the candidates
    ran = 0
    for name, fn in cands.items():
        try:
            out = decode.fold_out(fn(), B, Hq, Q, D)
        except RuntimeError:  # a backend this build lacks (cuDNN on a CPU)
            continue
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=name)
        ran += 1
    assert ran >= 2


def test_step_gaps_counts_idle_time_between_kernels(monkeypatch, capsys):
    """zoo_profile --gaps: idle time is what lies between one kernel's end (or the latest end so far, when kernels
    overlap) and the next kernel's start; the longest gap is listed first with the kernels either side, and the
    step's kernels are totalled by name."""
    import types

    import zoo_profile

    def kernel(name, start, end):
        return types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(start=start, end=end),
                                     device_type=types.SimpleNamespace(name="CUDA"))

    events = [kernel("b", 150, 300), kernel("a", 0, 100), kernel("c", 250, 400), kernel("a", 1400, 1500),
              types.SimpleNamespace(name="host op", time_range=types.SimpleNamespace(start=500, end=600),
                                    device_type=types.SimpleNamespace(name="CPU"))]
    monkeypatch.setattr(zoo_profile, "profile_once", lambda fn: types.SimpleNamespace(events=lambda: events))
    zoo_profile.step_gaps(None, rows=5)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("-- one eager step: 4 kernels, 1.500 ms from the first start to the last end, 1.050 ms idle "
                      "in 2 gaps")
    assert out[1].split() == ["1.000", "ms", "idle", "at", "0.400", "ms", "after", "c", "before", "a"]
    assert out[2].split()[:5] == ["0.050", "ms", "idle", "at", "0.100"]
    assert out[3] == "-- the same step's kernels by time"
    assert [line.split() for line in out[4:]] == [["0.200", "ms", "x2", "a"], ["0.150", "ms", "x1", "b"],
                                                   ["0.150", "ms", "x1", "c"]]
