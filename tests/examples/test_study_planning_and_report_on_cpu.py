"""The regime study's own logic (``verl_mtp_example.study``), without launching a trainer: which runs are left,
what each launch gets, that a study with other settings is refused, and that the report's table, correlations
and figures are computed from the runs' verl metric files as a hand computation says.
(The study's trainer runs themselves: tests/e2e/test_regime_study_on_cpu.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from verl_mtp_example import study, study_data, study_figures, study_report, study_stats
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


C, V2, COS, LAM, PROXY = (f"{study_data.HEAD}{k}" for k in study_data.DIAGNOSED)
CROSS, DMTP = (f"{study_data.HEAD}{k}" for k in ("occ_cross_sum", "occ_dmtp_sq_sum"))


def _synthetic_study(out, rng, steps: int = 9):
    """detach and rl_occ, 2 seeds; rl_occ records 4 updates per step, the 2nd and 4th diagnosed (as the launcher
    with --record-updates and occ.diagnose_every=2 writes them), whose proxy numerator is 2 c and denominator
    3 v^2."""
    settings = study.StudySettings(regimes=["detach", "rl_occ"], seeds=[0, 1], steps=steps)
    truth = {}
    for regime in ("detach", "rl_occ"):
        for seed in (0, 1):
            metrics, updates = {}, {}
            for step in range(1, steps + 1):
                metrics[step] = {REWARD: float(rng.uniform()), EXACT: float(rng.uniform()), STEP_TIME: 2.0 + step % 3,
                                 study_report.TOP1: float(rng.uniform()), "actor/other": 1.0}
                if regime == "rl_occ":
                    c, v2 = rng.normal(size=2), rng.uniform(0.5, 2, size=2)
                    cross = [0.0, 2 * c[0], float(rng.normal()), 2 * c[1]]
                    dmtp = [0.0, 3 * v2[0], float(rng.uniform()), 3 * v2[1]]
                    updates[step] = {CROSS: cross, DMTP: dmtp, C: list(c), V2: list(v2), COS: [0.1, 0.2],
                                     LAM: list(c / v2), PROXY: [cross[u] / (dmtp[u] + 1e-8) for u in (1, 3)]}
            workdir = study.run_dir(str(out), regime, seed)
            write_run(workdir, metrics)
            with open(os.path.join(workdir, "updates.jsonl"), "w") as f:
                f.writelines(json.dumps({"step": s, "data": d}) + "\n" for s, d in updates.items())
            truth[(regime, seed)] = (metrics, updates)
    study.check_settings(str(out), settings)
    return settings, truth


def test_record_keeps_what_the_report_reads_and_pairs_each_diagnosed_update(tmp_path):
    settings, truth = _synthetic_study(tmp_path / "study", np.random.default_rng(0))
    data = study.export_finished(str(tmp_path / "study"), settings)
    _, runs, updates = study_data.load(data)
    assert runs["rl_occ"][1][3] == {k: v for k, v in truth[("rl_occ", 1)][0][3].items() if k != "actor/other"}
    rows = updates["rl_occ"][0]
    assert len(rows) == 9 * 4 and [r["update"] for r in rows[:4]] == [1, 2, 3, 4]
    step2 = truth[("rl_occ", 0)][1][2]
    assert rows[4]["occ_grad_c"] is None and rows[6]["occ_grad_c"] is None  # 1st and 3rd update: not diagnosed
    assert (rows[5]["occ_grad_c"], rows[5]["occ_cross_sum"]) == (step2[C][0], step2[CROSS][1])
    assert (rows[7]["occ_grad_v2"], rows[7]["occ_dmtp_sq_sum"]) == (step2[V2][1], step2[DMTP][3])
    assert "detach" not in updates


def test_a_misaligned_update_record_is_refused():
    lists = {CROSS: [0.0, 1.0, 5.0, 2.0], DMTP: [0.0, 1.0, 1.0, 1.0], C: [1.0, 1.0], V2: [1.0, 1.0],
             COS: [0.0, 0.0], LAM: [1.0, 1.0], PROXY: [5.0, 2.0]}  # the first diagnosed proxy is the 3rd update's
    with pytest.raises(ValueError, match="misaligned"):
        study_data.update_rows("rl_occ", 0, {1: lists})


def test_report_matches_a_hand_computation(tmp_path):
    settings, truth = _synthetic_study(tmp_path / "study", np.random.default_rng(1))
    data = study.export_finished(str(tmp_path / "study"), settings)
    report = study_report.write_report(data, str(tmp_path / "report"))
    results = report["results"]
    rows = {r["regime"]: r for r in results["rows"]}
    n = study_report.window(9)

    def last(regime, seed, key=REWARD):
        return np.mean([truth[(regime, seed)][0][s][key] for s in range(10 - n, 10)])

    occ = [last("rl_occ", s) for s in (0, 1)]
    assert rows["rl_occ"]["reward_last"][:2] == pytest.approx((np.mean(occ), np.std(occ, ddof=1)))
    paired = np.array([last("rl_occ", s) - last("detach", s) for s in (0, 1)])
    half = 12.7062047 * paired.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
    assert rows["rl_occ"]["minus_detach"]["mean"] == pytest.approx(paired.mean())
    assert rows["rl_occ"]["minus_detach"]["ci"] == pytest.approx((paired.mean() - half, paired.mean() + half))
    assert rows["rl_occ"]["seconds_per_step"][0] == pytest.approx(np.median([2 + s % 3 for s in range(2, 10)]))
    proxy = {r["phase"]: r for r in results["proxy"]}
    # the proxy's numerator is 2 c and its denominator 3 v^2 on every diagnosed update: perfect rank agreement
    assert proxy["all"]["n"] == 2 * 9 * 2
    assert proxy["all"]["numerator_c"]["estimate"] == pytest.approx(1.0)
    assert proxy["all"]["denominator_v2"]["estimate"] == pytest.approx(1.0)
    assert proxy["all"]["spearman"]["estimate"] == pytest.approx(1.0)
    decomposition = {r["phase"]: r for r in results["decomposition"]}
    late_c = [truth[("rl_occ", s)][1][t][C][i] for s in (0, 1) for t in (7, 8, 9) for i in (0, 1)]
    assert decomposition["late"]["c"]["estimate"] == pytest.approx(np.median(late_c))
    assert decomposition["late"]["n"] == 12
    with open(tmp_path / "report" / "report.md") as f:
        assert study_report.doc_blocks(f.read()) == report["blocks"]
    figures = study_figures.draw_all(str(tmp_path / "report"), report["runs"], report["updates"], report["steps"])
    assert figures
    for png in figures:
        assert os.path.getsize(png) > 10_000, png


def test_a_doc_gets_the_report_blocks_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- study:table -->\nold\n<!-- /study:table -->\nprose\n")
    assert study_report.fill_doc(str(doc), {"table": "| a |\n", "claims": "x\n"}) == []
    assert doc.read_text() == "intro\n<!-- study:table -->\n| a |\n<!-- /study:table -->\nprose\n"
    doc.write_text("<!-- study:nothing -->\n<!-- /study:nothing -->\n")
    assert study_report.fill_doc(str(doc), {"table": "| a |\n"}) == ["nothing"]


@pytest.mark.parametrize("side, ci, mde, expected", [
    ("below", (-0.2, -0.1), 0.05, "reproduced"),
    ("below", (0.01, 0.1), 0.05, "not reproduced"),
    ("below", (-0.03, 0.1), 0.05, "not reproduced"),  # an effect of the detectable size is ruled out
    ("below", (-0.2, 0.1), 0.05, "not resolvable"),
    ("not below", (-0.03, 0.1), 0.05, "reproduced"),
    ("not below", (-0.2, -0.1), 0.05, "not reproduced"),
    ("not below", (-0.2, 0.1), 0.05, "not resolvable"),
    ("above", (0.1, 0.3), None, "reproduced"),
    ("above", (-0.1, 0.3), None, "not resolvable"),
    ("above", (None, None), None, "not resolvable"),
])
def test_verdicts(side, ci, mde, expected):
    assert study_report.verdict(side, ci, mde) == expected


def test_statistics_match_tables_and_hand_computations():
    assert study_stats.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)  # Student's t table
    assert study_stats.t_quantile(0.8, 4) == pytest.approx(0.940965, abs=1e-5)
    assert study_stats.detectable_difference(1.0, 5) == pytest.approx((2.776445 + 0.940965) / np.sqrt(5), abs=1e-5)
    assert study_stats.seeds_needed(1.0, 1.2) == 8  # 7 pairs detect (2.447 + 0.906) / sqrt(7) = 1.27, 8 pairs 1.15
    exact, proxy = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    expected = np.corrcoef([0.0, 1.5, 1.5, 3.0], np.arange(4.0))[0, 1]  # ties share their average rank
    assert study_stats.spearman(np.array(exact), np.array(proxy)) == pytest.approx(expected)
    assert study_stats.spearman(np.ones(3), np.arange(3.0)) is None
    pairs = np.array([(1.0, 1.0)] * 81 + [(1.0, -1.0)] * 9 + [(-1.0, 1.0)] * 9 + [(-1.0, -1.0)])  # 90 % positive
    assert study_stats.sign_agreement(*pairs.T) == pytest.approx(0.82)
    assert study_stats.chance_agreement(*pairs.T) == pytest.approx(0.9 * 0.9 + 0.1 * 0.1)
    assert study_stats.agreement_above_chance(*pairs.T) == pytest.approx(0.0)


def test_only_a_ray_start_timeout_in_the_last_launch_is_retried(tmp_path):
    log = tmp_path / "train.log"
    assert not study.ray_failed_to_start(str(tmp_path))
    log.write_text(f"\n===== verl PPO: a\nException: {study.RAY_START_TIMEOUT}. This could happen ...\n")
    assert study.ray_failed_to_start(str(tmp_path))
    with open(log, "a") as f:
        f.write("\n===== verl PPO: b\nValueError: something else\n")  # a resumed launch failing otherwise
    assert not study.ray_failed_to_start(str(tmp_path))


def test_the_wall_time_adds_up_over_calls(tmp_path):
    assert study.wall_time(str(tmp_path)) == 0.0
    study.add_wall_time(str(tmp_path), 10.5)
    study.add_wall_time(str(tmp_path), 2.25)
    assert study.wall_time(str(tmp_path)) == pytest.approx(12.8)  # rounded to 0.1 s at each call


def test_a_two_step_study_reports_what_is_defined(tmp_path):
    """The CI form's length: too short for a step-noise estimate or every quarter of training, which stay
    undefined (None in results.json, '-' in the tables) instead of NaN."""
    settings, _ = _synthetic_study(tmp_path / "study", np.random.default_rng(2), steps=2)
    report = study_report.write_report(study.export_finished(str(tmp_path / "study"), settings), str(tmp_path))
    assert report["results"]["learning"]["quarters"][0] is None
    assert report["results"]["learning"]["step_noise"][0] is None


def test_metric_ranges_leave_out_the_structural_zero_and_match_numpy():
    """``lambda`` skips each step's first update (dRL = 0 there), ``coef_applied`` keeps it; both read the
    record's ``coef_applied``; step metrics pool every seed's steps."""
    from verl_mtp_example.metric_ranges import metric_ranges

    rng = np.random.default_rng(3)
    rows = [{"update": u, "coef_applied": 0.0 if u == 1 else float(rng.normal()), "occ_cross_sum": float(rng.normal()),
             "occ_dmtp_sq_sum": 1.0, "occ_grad_c": None, "occ_grad_v2": None, "occ_grad_cos": None,
             "occ_grad_lambda": None} for _ in range(10) for u in (1, 2, 3, 4)]
    updates = {"rl_occ": {0: rows[:20], 1: rows[20:]}, "rl_1.0": {0: rows}}
    runs = {"detach": {s: {t: {"actor/mtp_1/top1_agreement": 0.1 * t + s} for t in range(1, 6)} for s in (0, 1)}}
    found = {(r["metric"], r["regime"]): r for r in metric_ranges(runs, updates, ["detach", "rl_1.0", "rl_occ"])}
    informative = [r["coef_applied"] for r in rows if r["update"] != 1]
    lam = found[("actor/mtp_1/lambda", "rl_occ")]
    assert lam["n"] == 30 and lam["median"] == pytest.approx(np.median(informative))
    assert lam["p5"] == pytest.approx(np.percentile(informative, 5))
    applied = found[("actor/mtp_1/coef_applied", "rl_occ")]
    assert applied["n"] == 40 and applied["p5"] == pytest.approx(np.percentile([r["coef_applied"] for r in rows], 5))
    assert ("actor/mtp_1/lambda", "rl_1.0") not in found  # a fixed coefficient is its setting
    assert ("actor/mtp_1/occ_grad_c", "rl_occ") not in found  # never diagnosed here
    top1 = found[("actor/mtp_1/top1_agreement", "detach")]
    assert top1["n"] == 10 and top1["p95"] == pytest.approx(np.percentile([0.1 * t + s for s in (0, 1)
                                                                           for t in range(1, 6)], 95))
