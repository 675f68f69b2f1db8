"""A tiny verifiable task for local RL runs: short integer arithmetic, exact-match reward.

Why this task: a few-hundred-thousand-parameter model trained from random weights on CPU must be able to
improve within a few dozen RL steps, and the reward must be checkable by a rule. ``a+b`` with single-digit
operands has a one- or two-token answer, every prompt fits the tiny tokenizer of
:mod:`verl_mtp_example.tiny_model`, and the answer is an exact integer.

verl wiring::

    data.train_files=<out_dir>/train.parquet data.val_files=<out_dir>/val.parquet
    reward.custom_reward_function.path=pkg://verl_mtp_example.arithmetic_task
    reward.custom_reward_function.name=compute_score
    # optional: +reward.custom_reward_function.reward_kwargs.format_score=0.0

(verl 0.9.1 loads it with ``verl.utils.import_utils.load_extern_object``; a file path to this module works
too. Its reward managers call ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=,
**reward_kwargs)`` with the response decoded with ``skip_special_tokens=True``.)
"""

from __future__ import annotations

import os
import random
import re
from typing import Optional, Sequence

__all__ = ["DATA_SOURCE", "make_problem", "make_rows", "write_dataset", "compute_score"]

DATA_SOURCE = "local_arithmetic"
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INTEGER = re.compile(r"-?\d+")


def make_problem(a: int, op: str, b: int) -> tuple[str, str]:
    """(question text, exact answer text) for ``a op b``; every word and symbol is in the tiny vocabulary."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    return f"What is {a}{op}{b}?", str(_OPS[op](a, b))


def make_rows(n: int, seed: int, split: str, max_operand: int = 9, ops: Sequence[str] = ("+",)) -> list[dict]:
    """``n`` rows in verl's RL dataset format; operands uniform in ``[0, max_operand]``, a pure function of
    the arguments. Problems repeat when ``n`` exceeds the number of distinct ones (fine for RL)."""
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(list(ops))
        question, answer = make_problem(a, op, b)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": question}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": index, "a": a, "b": b, "op": op, "question": question},
            }
        )
    return rows


def write_dataset(
    out_dir: str,
    n_train: int = 1024,
    n_val: int = 64,
    seed: int = 0,
    max_operand: int = 9,
    ops: Sequence[str] = ("+",),
) -> tuple[str, str]:
    """Write ``train.parquet`` and ``val.parquet`` to ``out_dir``; return their paths.

    Columns: ``data_source``, ``prompt`` (list of chat messages), ``ability``, ``reward_model``
    (``{"style": "rule", "ground_truth": "<int>"}``), ``extra_info`` (split, index, operands, question).
    The two splits use different random streams of the same distribution.
    """
    import pandas as pd

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("val", n_val)):
        path = os.path.join(out_dir, f"{split}.parquet")
        pd.DataFrame(make_rows(n, seed, split, max_operand, ops)).to_parquet(path, index=False)
        paths.append(path)
    return paths[0], paths[1]


def compute_score(
    data_source: Optional[str],
    solution_str: str,
    ground_truth: str,
    extra_info: Optional[dict] = None,
    format_score: float = 0.1,
    **kwargs,
) -> float:
    """1.0 for exactly the right integer, ``format_score`` for another bare integer, 0.0 otherwise.

    The response must be *only* the integer (surrounding whitespace and a literal ``<|im_end|>`` are
    ignored): the tiny model should answer and stop, and "3+5=8" style echoes are not rewarded. The
    small credit for a well-formed wrong number is there because a randomly initialised model almost never
    hits the answer: "emit digits, then EOS" is learnable first and gives GRPO non-zero reward variance
    early; set ``format_score=0`` (``reward_kwargs``) for pure exact match. ``data_source``, ``extra_info``
    and extra keyword arguments (verl may pass reward-router ones) are accepted and ignored.
    """
    answer = solution_str.replace("<|im_end|>", "").strip()
    if not _INTEGER.fullmatch(answer):
        return 0.0
    return 1.0 if int(answer) == int(str(ground_truth).strip()) else float(format_score)
