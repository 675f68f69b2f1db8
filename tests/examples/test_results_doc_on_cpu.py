"""docs/results.md is the study's report rebuilt from the committed record: ``python -m verl_mtp_example.study
--report-only --data docs/results/data`` (what CI runs here) gives every block docs/results.md and docs/mtp_rl.md
(its metric ranges) hold between their ``<!-- study:NAME -->`` markers, the published ``docs/results/report.md`` and ``results.json``, and every number
the doc's prose quotes. A number edited by hand, or a record changed without rebuilding the doc, fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from verl_mtp_example import study, study_report

ROOT = Path(__file__).resolve().parents[2]
DOC, PUBLISHED, DATA = ROOT / "docs" / "results.md", ROOT / "docs" / "results", ROOT / "docs" / "results" / "data"
USER_GUIDE = ROOT / "docs" / "mtp_rl.md"  # the metric table's ranges
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
RECORD_LIMIT_BYTES = 4_000_000


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert study.main(["--report-only", "--data", str(DATA), "--out", str(out)]) == 0
    return out


def test_the_docs_hold_the_rebuilt_report_blocks(rebuilt):
    blocks = study_report.doc_blocks((rebuilt / "report.md").read_text())
    in_docs = {doc: study_report.doc_blocks(doc.read_text()) for doc in (DOC, USER_GUIDE)}
    assert set(in_docs[USER_GUIDE]) == {"metric_ranges"}
    assert set(in_docs[DOC]) | set(in_docs[USER_GUIDE]) == set(blocks)
    for doc, held in in_docs.items():
        for name, text in held.items():
            assert text == blocks[name], f"{doc.name} block {name!r} differs from the rebuilt report"


def _floats_to_ulps(value, rel: float = 1e-12):
    """``value`` with every float wrapped in ``pytest.approx``: a least-squares fit (``np.polyfit``) may differ in
    its last bit between BLAS builds and CPUs, far below any printed digit."""
    if isinstance(value, dict):
        return {k: _floats_to_ulps(v, rel) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_to_ulps(v, rel) for v in value]
    return pytest.approx(value, rel=rel, abs=0.0) if isinstance(value, float) else value


def test_the_published_report_is_the_rebuilt_one(rebuilt):
    assert (PUBLISHED / "report.md").read_text() == (rebuilt / "report.md").read_text()
    published = json.loads((PUBLISHED / "results.json").read_text())
    assert json.loads((rebuilt / "results.json").read_text()) == _floats_to_ulps(published)


def prose(markdown: str) -> str:
    """The doc without its report blocks, code, link and image targets: the hand-written text."""
    for pattern in (r"<!-- study:([\w-]+) -->\n.*?<!-- /study:\1 -->", r"```.*?```", r"`[^`]*`", r"\]\([^)]*\)"):
        markdown = re.sub(pattern, " ", markdown, flags=re.S)
    return markdown


def test_every_number_in_the_prose_is_one_of_the_report(rebuilt):
    reported = set(NUMBER.findall((rebuilt / "report.md").read_text()))
    quoted = set(NUMBER.findall(prose(DOC.read_text())))
    assert quoted - reported == set(), "numbers in docs/results.md that the rebuilt report does not contain"


def test_the_record_is_small_enough_to_commit():
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < RECORD_LIMIT_BYTES
