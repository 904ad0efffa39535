"""cat_core.config: defaults, validation of every field, token budget, dict round trip."""
from __future__ import annotations

import dataclasses
import math

import pytest

from cat_core import CATSettings, SettingsError

# name -> (kind, low, high): the documented allowed range of each setting.
FIELDS = {
    "keep_ratio": ("float", 0.01, 1.0),
    "warmup_steps": ("int", 0, 1000),
    "cooldown_steps": ("int", 0, 1000),
    "num_clusters": ("int", 1, 256),
    "stale_share": ("float", 0.0, 1.0),
    "cluster_iters": ("int", 0, 100),
    "feature_scale": ("float", 0.0, 100.0),
    "seed": ("int", 0, 2**63 - 1),
}


def test_documented_fields_exist_in_order():
    names = [f.name for f in dataclasses.fields(CATSettings)]
    assert names[: len(FIELDS)] == list(FIELDS)


def test_selection_field():
    assert CATSettings().selection == "cat"
    for value in ("cat", "random"):
        assert CATSettings(selection=value).selection == value
    for value in ("CAT", "", "topk", None, 0, True):
        with pytest.raises(SettingsError, match="selection"):
            CATSettings(selection=value)


def test_ranking_field():
    for value in ("predicted_error", "reference_drift"):
        assert CATSettings(ranking=value).ranking == value
    for value in ("drift", "", None, 0, True):
        with pytest.raises(SettingsError, match="ranking"):
            CATSettings(ranking=value)


def test_block_math_field():
    assert CATSettings().block_math == "lean"
    assert CATSettings(block_math="modules").block_math == "modules"
    for value in ("LEAN", "", "graph", None, 1):
        with pytest.raises(SettingsError, match="block_math"):
            CATSettings(block_math=value)


@pytest.mark.parametrize("name", ["refresh_first_block", "pair_cfg"])
def test_switches_take_only_booleans(name):
    assert getattr(CATSettings(), name) is True  # both on by default: each measured to help
    assert getattr(CATSettings(**{name: False}), name) is False
    for value in (0, 1, "true", None, 1.0):
        with pytest.raises(SettingsError, match=name):
            CATSettings(**{name: value})


def test_defaults_follow_the_paper():
    s = CATSettings()
    assert s.keep_ratio == 0.3
    assert s.warmup_steps == 0  # automatic: 8 at the paper's 28 steps (tests/test_core_schedule.py)
    assert s.cooldown_steps == 1  # ours, not the paper's (0): one full final step, see README
    assert s.num_clusters == 20
    assert s.stale_share == 0.5  # ours (paper: 0.75), with the predicted-error ranking; see README
    assert s.ranking == "predicted_error"  # ours; the paper's is "reference_drift"
    assert s.cluster_iters >= 1
    assert 0 < s.feature_scale < 1  # features scaled down so clusters are spatial
    assert s.seed == 0


def test_settings_are_frozen():
    s = CATSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.keep_ratio = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", list(FIELDS))
def test_bounds_are_accepted(name):
    kind, lo, hi = FIELDS[name]
    for value in (lo, hi):
        s = CATSettings(**{name: value})
        assert getattr(s, name) == value
    if kind == "float":
        mid = (lo + hi) / 2
        assert getattr(CATSettings(**{name: mid}), name) == mid


def _beyond(kind, lo, hi):
    if kind == "int":
        return [lo - 1, hi + 1, -(2**70), 2**70]
    span = hi - lo
    return [lo - 1e-6, hi + 1e-6, lo - span, hi + span, -1e30, 1e30]


@pytest.mark.parametrize("name", list(FIELDS))
def test_beyond_bounds_rejected_naming_the_field(name):
    kind, lo, hi = FIELDS[name]
    for value in _beyond(kind, lo, hi):
        with pytest.raises(SettingsError, match=name):
            CATSettings(**{name: value})


@pytest.mark.parametrize("name", list(FIELDS))
def test_wrong_types_rejected_naming_the_field(name):
    kind, lo, hi = FIELDS[name]
    bad = [None, "0.5", str(lo), [lo], (lo,), {"v": lo}, complex(lo, 0), True, False]
    if kind == "int":
        bad += [float(lo), float(hi), lo + 0.5, math.nan, math.inf]
    for value in bad:
        with pytest.raises(SettingsError, match=name):
            CATSettings(**{name: value})


@pytest.mark.parametrize("name", [n for n, (k, _, _) in FIELDS.items() if k == "float"])
def test_non_finite_floats_rejected(name):
    for value in (math.nan, math.inf, -math.inf, float("nan")):
        with pytest.raises(SettingsError, match=name):
            CATSettings(**{name: value})


@pytest.mark.parametrize("name", [n for n, (k, _, _) in FIELDS.items() if k == "float"])
def test_int_values_accepted_for_float_fields(name):
    kind, lo, hi = FIELDS[name]
    value = int(math.ceil(lo)) if int(math.ceil(lo)) <= hi else None
    if value is None:
        pytest.skip("no integer in range")
    assert getattr(CATSettings(**{name: value}), name) == value


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)
    with pytest.raises(ValueError):
        CATSettings(keep_ratio=2.0)


def test_error_message_names_the_range():
    with pytest.raises(SettingsError) as info:
        CATSettings(num_clusters=0)
    msg = str(info.value)
    assert "num_clusters" in msg and "1" in msg and "256" in msg


# ---------------------------------------------------------------------------- token budget
def _expected_budget(keep, n):
    """Round-to-nearest of keep*n, clamped to [1, n] (ties may go either way)."""
    exact = keep * n
    return [min(n, max(1, c)) for c in {math.floor(exact), math.ceil(exact)} if abs(c - exact) <= 0.5 + 1e-9]


@pytest.mark.parametrize("keep", [0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 0.99, 1.0])
def test_token_budget_range_and_rounding(keep):
    s = CATSettings(keep_ratio=keep)
    previous = 0
    for n in range(1, 300):
        k = s.token_budget(n)
        assert isinstance(k, int)
        assert 1 <= k <= n, (keep, n, k)
        assert k in _expected_budget(keep, n), (keep, n, k)
        assert k >= previous  # more tokens never means a smaller budget
        previous = k


def test_token_budget_edge_cases():
    assert CATSettings(keep_ratio=1.0).token_budget(1) == 1
    assert CATSettings(keep_ratio=0.01).token_budget(1) == 1  # never 0
    assert CATSettings(keep_ratio=0.01).token_budget(49) == 1  # 0.49 rounds to 0 -> clamped
    assert CATSettings(keep_ratio=0.01).token_budget(4096) == 41
    for n in (1, 2, 3, 7, 16, 255, 256, 4096, 16384):
        assert CATSettings(keep_ratio=1.0).token_budget(n) == n
        assert CATSettings(keep_ratio=0.01).token_budget(n) >= 1


def test_token_budget_monotone_in_keep_ratio():
    keeps = [0.01 + i * 0.01 for i in range(100)]
    for n in (5, 64, 375, 1024):
        budgets = [CATSettings(keep_ratio=min(k, 1.0)).token_budget(n) for k in keeps]
        assert budgets == sorted(budgets)
        assert budgets[-1] == n


# ---------------------------------------------------------------------------- dict round trip
def test_as_dict_from_dict_round_trip():
    s = CATSettings(keep_ratio=0.42, warmup_steps=3, num_clusters=7, stale_share=0.1, cluster_iters=4,
                    feature_scale=1.5, seed=11)
    d = s.as_dict()
    expected = {"keep_ratio": 0.42, "warmup_steps": 3, "num_clusters": 7, "stale_share": 0.1,
                "cluster_iters": 4, "feature_scale": 1.5, "seed": 11}
    assert {k: d[k] for k in expected} == expected
    assert set(d) == {f.name for f in dataclasses.fields(CATSettings)}
    assert CATSettings.from_dict(d) == s
    assert CATSettings.from_dict(CATSettings(selection="random").as_dict()).selection == "random"


def test_from_dict_partial_uses_defaults():
    s = CATSettings.from_dict({"keep_ratio": 0.5})
    assert s == CATSettings(keep_ratio=0.5)
    assert CATSettings.from_dict({}) == CATSettings()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(SettingsError, match="keep_ration"):
        CATSettings.from_dict({"keep_ration": 0.5})
    with pytest.raises(SettingsError, match="bogus"):
        CATSettings.from_dict({"keep_ratio": 0.5, "bogus": 1})


def test_from_dict_validates_values():
    with pytest.raises(SettingsError, match="stale_share"):
        CATSettings.from_dict({"stale_share": 1.5})
    with pytest.raises(SettingsError, match="warmup_steps"):
        CATSettings.from_dict({"warmup_steps": True})
