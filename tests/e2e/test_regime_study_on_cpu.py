"""End-to-end: the regime study's reduced form (``python -m verl_mtp_example.study --reduced``: detach and rl_occ,
one seed, two steps of verl's real Ray PPO trainer each) runs, writes its table and figures, and its rl_occ run
logs the exact and proxy lambda of the same diagnosed updates; a second call finds both runs finished and
launches nothing. The full study's results are in docs/results.md."""

from __future__ import annotations

import json
import math
import os

import pytest

from verl_mtp_example import study

pytestmark = pytest.mark.slow  # verl's trainer end to end: the slow tier (README, "Tested versions")


def test_reduced_study_runs_reports_and_resumes(tmp_path, prep_dir, capfd):
    out = tmp_path / "study"
    args = ["--reduced", "--out", str(out), "--prep-dir", str(prep_dir)]  # the e2e tests' shared SFT warm-up
    assert study.main(args) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    rows = {r["regime"]: r for r in results["rows"]}
    assert set(rows) == {"detach", "rl_occ"} and all(r["steps"] == 2 for r in rows.values())
    assert all(r["final_reward"][2] == 1 and math.isfinite(r["final_reward"][0]) for r in rows.values())
    assert results["lambda_correlation"]["rl_occ"]["n"] >= 1  # diagnosed steps with both estimators
    for name in ("table.md", "reward.png", "decomposition.png", "lambda_scatter.png"):
        assert os.path.getsize(out / name) > 0, name
    capfd.readouterr()
    assert study.main(args) == 0
    assert "2/2 runs finished earlier, 0 to go" in capfd.readouterr().out
