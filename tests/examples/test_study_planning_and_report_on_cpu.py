"""The regime study's own logic (``verl_mtp_example.study``), without launching a trainer: which runs are left,
what each launch gets, that a study with other settings is refused, and that the report's table, correlations
and figures are computed from the runs' verl metric files as a hand computation says.
(The study's trainer runs themselves: tests/e2e/test_regime_study_on_cpu.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from verl_mtp_example import study, study_figures, study_report
from verl_mtp_example.metrics_view import EXACT, REWARD, STEP_TIME


def write_run(workdir, steps: dict[int, dict], finished: bool = True) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step, data in steps.items():
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"exit_code": 0 if finished else 1, "steps_logged": sorted(steps)}, f)


def test_pending_runs_skip_finished_ones_and_go_seed_major(tmp_path):
    settings = study.StudySettings(regimes=["detach", "rl_occ"], seeds=[0, 1], steps=2)
    write_run(study.run_dir(str(tmp_path), "detach", 0), {1: {}, 2: {}})
    write_run(study.run_dir(str(tmp_path), "rl_occ", 0), {1: {}}, finished=False)
    write_run(study.run_dir(str(tmp_path), "rl_occ", 1), {1: {}})  # exit code 0 but a step short
    assert [(r.name, s) for r, s in study.pending_runs(str(tmp_path), settings)] == [
        ("rl_occ", 0), ("detach", 1), ("rl_occ", 1)]


def test_launcher_argv_seeds_the_rl_run_only_and_diagnoses_the_rl_regimes(tmp_path):
    settings = study.StudySettings(diagnose_every=2)
    workdir = str(tmp_path / "rl")
    argv = study.launcher_argv(settings, study.REGIMES["rl_1.0"], 7, workdir, str(tmp_path / "prep"))
    overrides = argv[argv.index("--") + 1:]
    assert argv[argv.index("--seed") + 1] == "0" and argv[argv.index("--mtp-coef") + 1] == "1.0"
    assert {"data.seed=7", "actor_rollout_ref.rollout.seed=7", "actor_rollout_ref.actor.megatron.seed=7",
            "actor_rollout_ref.model.mtp.occ.diagnose_every=2"} == set(overrides)
    assert "--resume" not in argv
    detach = study.launcher_argv(settings, study.REGIMES["detach"], 7, workdir, str(tmp_path / "prep"))
    assert not any("diagnose_every" in a for a in detach) and "--mtp-coef" not in detach
    os.makedirs(os.path.join(workdir, "checkpoints"))
    open(os.path.join(workdir, "checkpoints", "latest_checkpointed_iteration.txt"), "w").close()
    assert "--resume" in study.launcher_argv(settings, study.REGIMES["rl_1.0"], 7, workdir, "p")


def test_a_study_with_other_settings_is_refused(tmp_path):
    study.check_settings(str(tmp_path), study.StudySettings(steps=4))
    study.check_settings(str(tmp_path), study.StudySettings(steps=4))  # same settings: continues
    with pytest.raises(SystemExit, match="steps"):
        study.check_settings(str(tmp_path), study.StudySettings(steps=5))


def _synthetic_study(out, rng):
    """detach and rl_occ, 2 seeds, 8 steps; rl_occ logs exact and proxy lambda on even steps."""
    truth = {}
    for regime in ("detach", "rl_occ"):
        for seed in (0, 1):
            steps = {}
            for step in range(1, 9):
                data = {REWARD: float(rng.uniform()), EXACT: float(rng.uniform()), STEP_TIME: 2.0 + step % 3,
                        study_report.TOP1: float(rng.uniform())}
                if regime == "rl_occ" and step % 2 == 0:
                    exact = float(rng.normal())
                    data.update({study_report.EXACT_LAMBDA: exact, study_report.PROXY_LAMBDA: 0.5 * exact + 0.1,
                                 study_report.GRAD_C: float(rng.normal()), study_report.GRAD_V2: float(rng.uniform()),
                                 study_report.GRAD_COS: 0.1})
                steps[step] = data
            write_run(study.run_dir(str(out), regime, seed), steps)
            truth[(regime, seed)] = steps
    return truth


def test_report_table_and_correlations_match_a_hand_computation(tmp_path):
    truth = _synthetic_study(tmp_path, np.random.default_rng(0))
    report = study_report.write_report(str(tmp_path), ["detach", "rl_occ"], [0, 1], 8, seconds=1.0)
    rows = {r["regime"]: r for r in report["results"]["rows"]}

    def last5(regime, seed, key):
        return np.mean([truth[(regime, seed)][s][key] for s in range(4, 9)])

    occ_last5 = [last5("rl_occ", s, REWARD) for s in (0, 1)]
    assert rows["rl_occ"]["reward_last_n"][:2] == pytest.approx((np.mean(occ_last5), np.std(occ_last5, ddof=1)))
    final = [truth[("rl_occ", s)][8][REWARD] for s in (0, 1)]
    assert rows["rl_occ"]["final_reward"][0] == pytest.approx(np.mean(final))
    paired = [last5("rl_occ", s, REWARD) - last5("detach", s, REWARD) for s in (0, 1)]
    assert rows["rl_occ"]["reward_last_n_minus_detach"][:2] == pytest.approx((np.mean(paired), np.std(paired, ddof=1)))
    assert rows["detach"]["reward_last_n_minus_detach"][0] == pytest.approx(0.0)
    assert rows["rl_occ"]["seconds_per_step"][0] == pytest.approx(np.median([2 + s % 3 for s in range(2, 9)]))
    lam = report["results"]["lambda_correlation"]
    assert lam["rl_occ"]["n"] == 8 and lam["rl_occ"]["pearson"] == pytest.approx(1.0)  # proxy = 0.5 exact + 0.1
    assert lam["rl_occ"]["spearman"] == pytest.approx(1.0) and "detach" not in lam
    with open(tmp_path / "table.md") as f:
        rows = [ln for ln in f.read().splitlines() if ln.startswith("| ") and not ln.startswith("| regime")]
    assert [r.split(" |")[0] for r in rows] == ["| detach", "| rl_occ", "| rl_occ"]  # both tables; 1 diagnosed
    (decomposition,) = report["results"]["decomposition"]
    for name, key in (("c", study_report.GRAD_C), ("v2", study_report.GRAD_V2)):
        early = [truth[("rl_occ", s)][t][key] for s in (0, 1) for t in (2, 4)]  # steps before the middle (5)
        late = [truth[("rl_occ", s)][t][key] for s in (0, 1) for t in (6, 8)]
        assert decomposition[name] == pytest.approx((np.mean(early), np.mean(late)))
    figures = study_figures.draw_all(str(tmp_path), report["runs"], report["pairs"], lam)
    assert len(figures) == 3
    for png in figures:
        assert os.path.getsize(png) > 10_000, png


def test_spearman_uses_average_ranks_for_ties():
    exact = [1.0, 2.0, 2.0, 3.0]
    proxy = [1.0, 2.0, 3.0, 4.0]
    ranks_exact = np.array([0.0, 1.5, 1.5, 3.0])
    expected = np.corrcoef(ranks_exact, np.arange(4.0))[0, 1]
    assert study_report.correlations(exact, proxy)["spearman"] == pytest.approx(expected)
    assert study_report.correlations([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"] is None
    assert study_report.correlations([1.0, -2.0, 3.0, -0.5], [0.1, 0.2, 0.3, -0.1])["sign_agreement"] == 0.75


def test_only_a_ray_start_timeout_in_the_last_launch_is_retried(tmp_path):
    log = tmp_path / "train.log"
    assert not study.ray_failed_to_start(str(tmp_path))
    log.write_text(f"\n===== verl PPO: a\nException: {study.RAY_START_TIMEOUT}. This could happen ...\n")
    assert study.ray_failed_to_start(str(tmp_path))
    with open(log, "a") as f:
        f.write("\n===== verl PPO: b\nValueError: something else\n")  # a resumed launch failing otherwise
    assert not study.ray_failed_to_start(str(tmp_path))
