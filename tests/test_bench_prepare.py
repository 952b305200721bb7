"""The prepare benchmarks run end to end on a handful of images (their figures computed, not judged: this is no benchmark machine)."""

from __future__ import annotations

from bench import cache_reuse, prepare_throughput


def test_prepare_throughput_benchmark_runs(tmp_path, capsys):
    result = prepare_throughput.main(["--images", "4", "--rounds", "2", "--rss-images", "4", "--workdir", str(tmp_path)])
    assert result["ratio"] > 0 and len(result["prepare"]) == len(result["naive"]) == 2
    assert [m["images"] for m in result["memory"]] == [4] and all(m["peak_rss_mib"] > 50 for m in result["memory"])
    out = capsys.readouterr().out
    assert "| prepare stage" in out and "| naive PIL loop" in out
    assert out.strip().splitlines()[-1].startswith("prepare_throughput: ") and "peak RSS" in out.strip().splitlines()[-1]


def test_cache_reuse_benchmark_runs(tmp_path, tiny_model, capsys):
    result = cache_reuse.main(["--images", "4", "--rounds", "1", "--model", tiny_model, "--workdir", str(tmp_path)])
    assert 0 < result["fraction"] < 1 and result["changed"] > 0
    out = capsys.readouterr().out
    assert "| second run (folder unchanged)" in out
    assert out.strip().splitlines()[-1].startswith("cache_reuse: second run takes ")
