"""The cost figure reads what the two benchmarks really print (their own printing code makes the input here)."""


from benchmarks.cost_figure import draw, parse_counts, parse_times
from benchmarks.mtp_actor_step import RatioSpread
from benchmarks.mtp_flops import MODELS, StepCost, report


def counted(flops: int, nbytes: int, peak: int) -> StepCost:
    cost = StepCost(fake_mode=None)
    cost.flops, cost.attention_flops, cost.bytes, cost.peak = flops, 0, nbytes, peak
    return cost


def test_counts_and_times_round_trip_through_the_benchmarks_printing(capsys, tmp_path):
    report("mimo-7b", MODELS["mimo-7b"], 8192, 1024,
           {"detach": counted(1000, 400, 200), "rl_occ": counted(1000, 404, 190)})
    counts = parse_counts(capsys.readouterr().out)
    assert counts == {"mimo-7b": {"rl_occ": {"flops": 1.0, "bytes": 1.01, "peak": 0.95}}}

    spread = RatioSpread.of([1.1, 1.2, 1.0, 1.1], [1.0, 1.0, 1.0, 1.0])
    line = f"vocab=151936 seq=512 rl_occ/detach: step_time {spread} peak_mem 0.809x"
    times = parse_times(line)
    assert times == {"151k / 512": {"rl_occ": (round(spread.median, 3), round(spread.low, 3), round(spread.high, 3))}}

    out = tmp_path / "cost.png"
    draw(counts, times, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lines_of_anything_else_are_not_read():
    assert parse_counts("mimo-7b seq=8192 (config): detach step 517.2 TFLOP\n# model: hidden 256") == {}
    assert parse_times("vocab=32000 seq=512 detach: step 0.549s peak_tensor_mem 381MiB") == {}
