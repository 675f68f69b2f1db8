"""End-to-end: the regime study's reduced form (``python -m verl_mtp_example.study --reduced``: detach and rl_occ,
one seed, two steps of verl's real Ray PPO trainer each) runs, writes its record, report and figures; its rl_occ
run records every mini-batch update's MTP metrics (the launcher's ``--record-updates``), the exact and proxy
lambda of the same diagnosed updates among them (the export checks the pairing); a second call finds both runs
finished and launches nothing. The full study's results are in docs/results.md."""

from __future__ import annotations

import json
import math
import os

import pytest

from verl_mtp_example import study, study_data

pytestmark = pytest.mark.slow  # verl's trainer end to end: the slow tier (README, "Tested versions")


def test_reduced_study_runs_records_every_update_reports_and_resumes(tmp_path, prep_dir, capfd):
    out = tmp_path / "study"
    args = ["--reduced", "--out", str(out), "--prep-dir", str(prep_dir)]  # the e2e tests' shared SFT warm-up
    assert study.main(args) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    rows = {r["regime"]: r for r in results["rows"]}
    assert set(rows) == {"detach", "rl_occ"} and all(r["steps"] == 2 for r in rows.values())
    assert all(r["reward_last"][2] == 1 and math.isfinite(r["reward_last"][0]) for r in rows.values())
    _, runs, updates = study_data.load(str(out / "data"))
    assert set(runs) == {"detach", "rl_occ"} and set(updates) == {"rl_occ"}
    rows = updates["rl_occ"][0]  # 8 prompts in 4 mini-batches: 4 updates a step, the 2nd and 4th diagnosed
    assert [(r["step"], r["update"]) for r in rows] == [(s, u) for s in (1, 2) for u in (1, 2, 3, 4)]
    assert all((r["occ_grad_c"] is not None) == (r["update"] in (2, 4)) for r in rows)
    assert all(math.isfinite(r["occ_grad_v2"]) and r["occ_grad_v2"] > 0 for r in rows if r["update"] in (2, 4))
    assert all(r["occ_cross_sum"] is not None and r["coef_applied"] is not None for r in rows)
    for name in ("report.md", "reward.png", "decomposition.png", "lambda_scatter.png"):
        assert os.path.getsize(out / name) > 0, name
    capfd.readouterr()
    assert study.main(args) == 0
    assert "2/2 runs finished earlier, 0 to go" in capfd.readouterr().out
