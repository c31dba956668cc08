"""Chapter 02's verdict logic on constructed ledgers (no notebook executed)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mbe_helpers import audit
from mbe_helpers.chapters import grid
from mbe_helpers.simulate import SCENARIOS


def ledger(n: int = 300, seed: int = 0, shape: str = "u") -> pd.DataFrame:
    """lr and wd log-uniform; metric and target both follow the learning rate (no increment)."""
    rng = np.random.default_rng(seed)
    lr, wd = 10 ** rng.uniform(-4, -2, n), 10 ** rng.uniform(-5, -3, n)
    x = np.log10(lr) + 3
    follow = x**2 if shape == "u" else x
    return pd.DataFrame({"lr": lr, "weight_decay": wd,
                         "fim": follow + rng.normal(0, 0.1, n), "acc": -follow + rng.normal(0, 0.1, n),
                         "val": follow + rng.normal(0, 0.1, n)})


def test_replication_of_a_pure_proxy_washes_out() -> None:
    audits = grid.replication_audits(ledger(900, shape="linear"), "fim", "acc", baseline="val",
                                     placebos=50, bootstrap=200)
    values = grid.replication_values(audits)
    assert values["replication_raw_r"] < -0.8 and abs(values["replication_partial_r"]) < 0.1
    assert values["replication_class"] == "washout" and values["replication_adjust"] == "cross-fitted"
    assert values["replication_story"].startswith("as in the original study")
    table = grid.replication_table(audits)
    assert list(table.given) == ["lr, weight_decay", "val"] and table["class"].iloc[0] == "washout"


def test_u_shaped_proxy_changes_class_and_says_why() -> None:
    frame = ledger(300, shape="u")
    audits = grid.baseline_audits(frame, ["fim"], "acc", baseline=["val"], design=["lr", "weight_decay"],
                                  placebos=20, seed=0)
    changed = grid.disagreements(audits, "design")
    assert len(changed) == 1 and changed["rank class"].iloc[0] != changed["calibrated class"].iloc[0]
    assert "rank-linear control says" in changed.why.iloc[0]
    summary = grid.audit_summary(audits)
    assert {"adjusted_design", "adjusted_lo_design", "adjust_design", "q_design"} <= set(summary)


def test_no_claim_when_the_placebos_fail() -> None:
    summary = pd.DataFrame({"metric": ["a"], "class_both": ["survives"], "q_both": [0.001]})
    assert grid.beyond_sentence(summary, False, 0.05).startswith("no metric is claimed")
    checks = pd.DataFrame({"control": ["positive"], "metric": ["p"], "class": ["survives"], "landed": [True]})
    failed = {"placebo_rate": 0.2, "proxy_placebo_rate": 0.1, "trustworthy": False}
    assert "not trustworthy on this grid" in grid.trust_sentence(checks, failed, 0.05)
    weak = checks.assign(landed=False, **{"class": "weak-or-mixed"})
    ok = {"placebo_rate": 0.05, "proxy_placebo_rate": 0.04, "trustworthy": True}
    assert "lacks the power" in grid.trust_sentence(weak, ok, 0.05)
    twins = {**ok, "twin_placebo_rate": 1.0, "twins_flagged": True}
    withheld = weak.assign(p=0.01, **{"class": "inconclusive"})    # significant, gated by twins
    assert "did not beat them" in grid.trust_sentence(withheld, twins, 0.05)
    unproven = weak.assign(p=0.2, **{"class": "inconclusive"})     # not significant at all
    sentence = grid.trust_sentence(unproven, twins, 0.05)
    assert "lacks the power" in sentence and "would have to beat them" in sentence
    assert "100 % of the time" in grid.trust_sentence(withheld, twins, 0.05)
    assert "  " not in grid.trust_sentence(withheld, twins, 0.05)
    assert grid.trust_sentence(checks, ok, 0.05).endswith("can be trusted")
    thin = {**twins, "thin_withheld": {"p": "60 rows for 8 controls, and the learner's smooth "
                                            "block needs 82"}}
    sentence = grid.trust_sentence(withheld, thin, 0.05)               # withheld for want of rows
    assert "its claim was withheld (60 rows for 8 controls" in sentence
    assert "did not beat them" not in sentence and "  " not in sentence


def test_the_chapter_reads_the_audits_own_withholding_note() -> None:
    """_thin_withheld parses the note that the audit writes when the smooth block cannot enter."""
    rng = np.random.default_rng([0, 60])
    frame = SCENARIOS["grid_proxy_5"].generate(rng, 60)
    frame["momentum"], frame["noise"] = rng.uniform(0, 1, 60), rng.uniform(0, 0.4, 60)
    frame["arch"] = rng.choice(["mlp", "cnn", "res"], 60)
    controls = ["lr", "wd", "width", "depth", "optimizer", "momentum", "noise", "arch"]
    result = audit(frame, "metric", "target", controls, seed=0)
    assert grid._thin_withheld(result.table) == {
        "metric": "60 rows for 8 controls, and the learner's smooth block needs 82"}


def test_replication_story_branches() -> None:
    base = {"replication_raw_r": -0.7, "replication_trustworthy": True}
    assert "explain away most" in grid.replication_story({**base, "replication_class": "inconclusive"})
    weak = {**base, "replication_raw_r": -0.1, "replication_class": "inconclusive"}
    assert grid.replication_story(weak).startswith("the association left")
    assert "unlike the original" in grid.replication_story({**base, "replication_class": "survives"})


def test_comparators_beside_the_audit() -> None:
    frame = grid.binned(ledger(240, shape="linear"), ["lr", "weight_decay"], bins=3)
    frame["acc"] = (frame.acc - frame.acc.min()) / (frame.acc.max() - frame.acc.min())  # a fraction
    summary = grid.comparator_summary(frame, ["fim"], "acc", ["lr_bin", "weight_decay_bin"])
    row = summary.iloc[0]
    assert row.sign == "−" and row.kendall > 0 and 0 <= row.sign_error_max <= 1
    kept = summary.assign(cmi=summary.cmi_none)
    assert grid.comparator_sentence(kept, "fim").startswith("conditioning on the hyperparameters leaves")
