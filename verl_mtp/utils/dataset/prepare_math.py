"""Prepare DAPO-Math-17k (training) and AIME-2024 (validation) as the parquet files the recipes read.

Why a step of its own: the published files already use verl's RL layout, but not as a run should read them.
``BytedTsinghua-SIA/DAPO-Math-17k`` holds each of its ~17k problems about a hundred times (1.79M rows), a few
problems with two different answers, and ``BytedTsinghua-SIA/AIME-2024`` holds each of its 30 problems 32 times
(for avg@32 with one sample each), while the recipes sample ``val_kwargs.n=32`` per problem themselves. Other
copies (``HuggingFaceH4/aime_2024``, ``Maxwell-Jia/AIME_2024``, ``open-r1/DAPO-Math-17k-Processed``) carry bare
``problem`` / ``answer`` columns with no instruction. This module writes one row per problem with the columns
verl's ``RLHFDataset`` and its rule-based reward managers (``dapo``, ``naive``) read:

* ``prompt``: one user message, DAPO's instruction around the problem (the ``Answer:`` line ``math_dapo`` scores);
* ``data_source``: ``math_dapo`` / ``aime-2024``, both scored by verl's ``default_compute_score`` with
  ``math_dapo`` (and naming the validation metrics ``val-core/<data_source>/...``);
* ``reward_model``: ``{"style": "rule-lighteval/MATH_v2", "ground_truth": "<answer>"}``;
* ``ability`` (``MATH``) and ``extra_info`` (``split``, ``index``: the source's id or row).

Usage (``--input`` defaults to the hub dataset, read with ``datasets``; a local parquet / json / jsonl file or a
downloaded dataset directory works offline)::

    python -m verl_mtp.utils.dataset.prepare_math dapo-math-17k --output $DATA_HOME/data/dapo-math-17k.parquet
    python -m verl_mtp.utils.dataset.prepare_math aime-2024 --output $DATA_HOME/data/aime-2024.parquet
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["MathDataset", "DATASETS", "PrepStats", "dapo_prompt", "read_source", "prepare_rows", "prepare", "main"]

ANSWER_STYLE = "rule-lighteval/MATH_v2"
# DAPO's instruction: the last line "Answer: <answer>" is what verl's math_dapo reward extracts.
INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
REMINDER = 'Remember to put your answer on its own line after "Answer:".'
PROBLEM_COLUMNS = ("problem", "Problem", "question", "prompt")
ANSWER_COLUMNS = ("answer", "Answer", "solution")
ID_COLUMNS = ("id", "ID", "unique_id")


@dataclass(frozen=True)
class MathDataset:
    """One dataset the recipes read: where it is published (one parquet file, the hub's ``train`` split), the
    role of its rows in a run (``extra_info.split``) and their ``data_source``."""

    name: str
    hub_id: str
    split: str
    data_source: str


DATASETS = {
    "dapo-math-17k": MathDataset("dapo-math-17k", "BytedTsinghua-SIA/DAPO-Math-17k", "train", "math_dapo"),
    "aime-2024": MathDataset("aime-2024", "BytedTsinghua-SIA/AIME-2024", "test", "aime-2024"),
}
HUB_SPLIT = "train"  # both hub datasets publish their single file under the default split


@dataclass
class PrepStats:
    """What preparation did to the source rows (printed, so a run's data is accounted for)."""

    rows_in: int = 0
    duplicates: int = 0
    conflicting: int = 0  # problems published with more than one answer (dropped)
    empty: int = 0  # rows without a problem or an answer
    rows_out: int = 0

    def line(self) -> str:
        return (f"{self.rows_in} rows read, {self.duplicates} duplicates merged, {self.conflicting} problems with "
                f"conflicting answers dropped, {self.empty} empty rows dropped: {self.rows_out} problems")


def dapo_prompt(problem: str) -> str:
    """A bare problem inside DAPO's instruction (what the verl-layout copies already hold)."""
    return f"{INSTRUCTION}\n\n{problem.strip()}\n\n{REMINDER}"


def read_source(source: str):
    """The source as a pandas DataFrame: a local parquet / json / jsonl file, a directory of those (a downloaded
    hub dataset), or a hub dataset id (needs the network)."""
    import pandas as pd

    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"{source}: no *.parquet file under this directory")
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if os.path.isfile(source):
        if source.endswith(".parquet"):
            return pd.read_parquet(source)
        if source.endswith((".json", ".jsonl")):
            return pd.read_json(source, lines=source.endswith(".jsonl"))
        raise ValueError(f"{source}: read .parquet, .json or .jsonl files")
    import datasets

    return datasets.load_dataset(source, split=HUB_SPLIT).to_pandas()


def _first(row: dict, names) -> Optional[Any]:
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def _problem_and_answer(row: dict) -> tuple[str, str]:
    """(prompt text, answer) of a verl-layout row (prompt messages, reward_model) or a bare problem/answer row."""
    messages, reward = row.get("prompt"), row.get("reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if truth is not None and messages is not None and not isinstance(messages, str):
        user = [m for m in messages if m["role"] == "user"]
        return (user[-1]["content"] if user else ""), str(truth).strip()
    problem = _first(row, PROBLEM_COLUMNS)
    answer = truth if truth is not None else _first(row, ANSWER_COLUMNS)
    if problem is None or answer is None:
        raise ValueError(
            f"a row has neither verl's prompt/reward_model columns nor one of {PROBLEM_COLUMNS} and one of "
            f"{ANSWER_COLUMNS}; columns: {sorted(row)}"
        )
    text = str(problem).strip()
    return (dapo_prompt(text) if text else ""), str(answer).strip()


def _source_index(row: dict, position: int) -> Any:
    info = row.get("extra_info")
    if isinstance(info, dict) and info.get("index") is not None:
        return info["index"]
    found = _first(row, ID_COLUMNS)
    return position if found is None else found


def prepare_rows(records: list[dict], dataset: MathDataset) -> tuple[list[dict], PrepStats]:
    """One row per problem, in first-seen order; a problem published with two answers is dropped."""
    stats = PrepStats(rows_in=len(records))
    answers: dict[str, set[str]] = {}
    first: dict[str, dict] = {}
    for position, row in enumerate(records):
        prompt, answer = _problem_and_answer(row)
        if not prompt or not answer:
            stats.empty += 1
            continue
        answers.setdefault(prompt, set()).add(answer)
        if prompt in first:
            stats.duplicates += 1
            continue
        first[prompt] = {
            "data_source": dataset.data_source,
            "prompt": [{"role": "user", "content": prompt}],
            "ability": "MATH",
            "reward_model": {"style": ANSWER_STYLE, "ground_truth": answer},
            "extra_info": {"split": dataset.split, "index": str(_source_index(row, position))},
        }
    rows = []
    for prompt, row in first.items():
        if len(answers[prompt]) > 1:
            stats.conflicting += 1
            continue
        rows.append(row)
    stats.rows_out = len(rows)
    return rows, stats


def prepare(dataset: str, output: str, source: Optional[str] = None) -> PrepStats:
    """Read ``source`` (default: the hub copy), write ``output`` atomically, return what was done."""
    import pandas as pd

    spec = DATASETS[dataset]
    frame = read_source(source or spec.hub_id)
    rows, stats = prepare_rows(frame.to_dict("records"), spec)
    if not rows:
        raise ValueError(f"{source or spec.hub_id}: no usable problem ({stats.line()})")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, output)
    return stats


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl_mtp.utils.dataset.prepare_math", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--output", required=True, help="parquet file to write")
    parser.add_argument("--input", default=None,
                        help="local parquet / json / jsonl file or directory, or a hub id (default: the dataset's)")
    args = parser.parse_args(argv)
    try:
        stats = prepare(args.dataset, args.output, args.input)
    except (ValueError, FileNotFoundError) as error:
        print(f"prepare_math {args.dataset}: {error}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: {stats.line()} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
