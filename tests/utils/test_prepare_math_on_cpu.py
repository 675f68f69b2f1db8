"""``python -m verl_mtp.utils.dataset.prepare_math`` on small files shaped like the published ones (no network):
one row per problem, in the columns verl's ``RLHFDataset`` reads, scored by verl's own ``dapo`` and ``naive``
reward managers (1 for the right ``Answer:``, -1 for a wrong one).

Fixture shapes (the real files' layouts): ``BytedTsinghua-SIA/DAPO-Math-17k`` and ``BytedTsinghua-SIA/AIME-2024``
are verl-layout parquet (``data_source``, ``prompt`` [{content, role}], ``ability``, ``reward_model``
{ground_truth, style}, ``extra_info`` {index}) with each problem repeated (about 100x / 32x);
``HuggingFaceH4/aime_2024`` has bare ``id``, ``problem``, ``solution``, ``answer``, ``url``, ``year`` columns.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from verl_mtp.utils.dataset import prepare_math
from verl_mtp.utils.dataset.prepare_math import dapo_prompt, main, prepare

PROBLEMS = {"What is 2+3?": "5", "Compute 7 times 6.": "42", "Give the sum of 10 and -13.": "-3"}


def _verl_row(problem: str, answer: str, index: str, data_source: str = "math_dapo") -> dict:
    return {
        "data_source": data_source,
        "prompt": [{"content": dapo_prompt(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


@pytest.fixture
def dapo_file(tmp_path):
    """DAPO-Math-17k's shape: every problem repeated, one problem published with two answers, one empty answer."""
    rows = []
    for copy in range(4):
        rows += [_verl_row(p, a, f"uuid-{i}-{copy}") for i, (p, a) in enumerate(PROBLEMS.items())]
    rows += [_verl_row("Find x if x+1=2.", "1", "c1"), _verl_row("Find x if x+1=2.", "2", "c2")]
    rows.append(_verl_row("An unanswered problem.", "", "e1"))
    path = tmp_path / "dapo-math-17k.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


@pytest.fixture
def aime_file(tmp_path):
    """AIME-2024's shape on the hub: each problem 32 times (avg@32 with one sample each)."""
    rows = [_verl_row(p, a, f"{i}", "math_dapo") for _ in range(32) for i, (p, a) in enumerate(PROBLEMS.items())]
    path = tmp_path / "hub" / "data" / "aime-2024.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return str(path)


def _read(path) -> pd.DataFrame:
    return pd.read_parquet(path)


def test_dapo_math_one_row_per_problem(dapo_file, tmp_path):
    out = str(tmp_path / "out" / "dapo-math-17k.parquet")
    stats = prepare("dapo-math-17k", out, dapo_file)
    assert (stats.rows_in, stats.duplicates, stats.conflicting, stats.empty, stats.rows_out) == (15, 10, 1, 1, 3)
    df = _read(out)
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert df["data_source"].eq("math_dapo").all() and df["ability"].eq("MATH").all()
    got = {row["prompt"][0]["content"]: row["reward_model"]["ground_truth"] for _, row in df.iterrows()}
    assert got == {dapo_prompt(p): a for p, a in PROBLEMS.items()}
    assert [row["extra_info"]["index"] for _, row in df.iterrows()] == ["uuid-0-0", "uuid-1-0", "uuid-2-0"]
    assert all(row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1 for _, row in df.iterrows())
    assert df["extra_info"].map(lambda e: e["split"]).eq("train").all()


def test_aime_from_a_downloaded_hub_directory(aime_file, tmp_path):
    out = str(tmp_path / "aime-2024.parquet")
    stats = prepare("aime-2024", out, os.path.dirname(os.path.dirname(aime_file)))
    assert (stats.rows_in, stats.rows_out) == (96, 3)
    df = _read(out)
    assert df["data_source"].eq("aime-2024").all()
    assert sorted(df["reward_model"].map(lambda r: r["ground_truth"])) == sorted(PROBLEMS.values())
    assert df["extra_info"].map(lambda e: e["split"]).eq("test").all()


def test_bare_problem_answer_rows_get_dapo_instruction(tmp_path):
    """HuggingFaceH4/aime_2024's columns, as jsonl; integer answers become strings."""
    path = tmp_path / "aime.jsonl"
    with open(path, "w") as f:
        for i, (problem, answer) in enumerate(PROBLEMS.items()):
            f.write(json.dumps({"id": 60 + i, "problem": problem, "solution": "worked solution", "answer": int(answer),
                                "url": "https://example.org", "year": 2024}) + "\n")
    out = str(tmp_path / "aime-2024.parquet")
    assert main(["aime-2024", "--input", str(path), "--output", out]) == 0
    df = _read(out)
    assert [r["reward_model"]["ground_truth"] for _, r in df.iterrows()] == list(PROBLEMS.values())
    first = df.iloc[0]["prompt"][0]["content"]
    assert first.startswith("Solve the following math problem step by step.") and "What is 2+3?" in first
    assert first.endswith('after "Answer:".')
    assert [r["extra_info"]["index"] for _, r in df.iterrows()] == ["60", "61", "62"]


def test_unusable_input_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pd.DataFrame([{"text": "no problem here", "label": 1}]).to_parquet(path)
    assert main(["dapo-math-17k", "--input", str(path), "--output", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err
    assert "prompt/reward_model" in err and "['label', 'text']" in err
    assert not (tmp_path / "o.parquet").exists()


# ------------------------------------------------------------------------------------ verl reads and scores it
@pytest.fixture
def tokenizer(tmp_path):
    from verl_mtp_example.tiny_model import make_tokenizer

    return make_tokenizer(str(tmp_path / "tok"))


def _dataset_items(path, tokenizer, tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create({"max_prompt_length": 512, "filter_overlong_prompts": False,
                               "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(path, tokenizer=tokenizer, config=config)
    return [dataset[i] for i in range(len(dataset))]


def _reward_batch(item: dict, tokenizer, response: str):
    """One sample as verl's reward loop hands it to a reward manager: prompt + response ids, the row's fields."""
    from verl import DataProto

    prompt = tokenizer.encode("<s>", add_special_tokens=False)
    answer = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    return DataProto.from_dict(
        tensors={"prompts": ids[:, : len(prompt)], "responses": ids[:, len(prompt):],
                 "attention_mask": torch.ones_like(ids)},
        non_tensors={key: np.array([item[key]], dtype=object) for key in ("data_source", "reward_model", "extra_info")},
    )


@pytest.mark.parametrize("manager_name", ["dapo", "naive"])
def test_verl_dataset_and_reward_managers_read_the_prepared_file(dapo_file, tokenizer, tmp_path, manager_name):
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_manager.registry import get_reward_manager_cls

    out = str(tmp_path / "dapo.parquet")
    prepare("dapo-math-17k", out, dapo_file)
    items = _dataset_items(out, tokenizer, tmp_path)
    assert len(items) == 3
    config = OmegaConf.create({"reward": {"reward_kwargs": {
        "overlong_buffer_cfg": {"enable": False, "len": 4, "penalty_factor": 1.0, "log": False}, "max_resp_len": 64}}})
    manager = get_reward_manager_cls(manager_name)(config, tokenizer, compute_score=None)
    for item in items:
        truth = item["reward_model"]["ground_truth"]
        assert item["raw_prompt"][0]["content"].endswith('after "Answer:".')
        # on the manager's own event loop, as verl's reward loop worker runs it
        score = lambda response: manager.loop.run_until_complete(  # noqa: E731
            manager.run_single(_reward_batch(item, tokenizer, response)))["reward_score"]
        right, wrong = score(f"Answer: {truth}"), score(f"Answer: {int(truth) + 1}")
        assert (right, wrong) == (1.0, -1.0), truth


def test_known_datasets():
    assert {d.hub_id for d in prepare_math.DATASETS.values()} == {
        "BytedTsinghua-SIA/DAPO-Math-17k", "BytedTsinghua-SIA/AIME-2024"}
