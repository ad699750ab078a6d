"""benchmarks/bench_ab.py without a GPU: its arguments, how it finds the trees, and the medians and
ratios it reports (the timing itself needs a GPU: ``python benchmarks/bench_ab.py A=DIR B=DIR``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_ab.py"
sys.path.insert(0, str(REPO))

from benchmarks import bench_ab  # noqa: E402


def _row(tree, fwd, bwd=None, mod="plain", causal=False):
    row = {"tree": tree, "dtype": "bf16", "D": 128, "L": 4096, "causal": causal, "mod": mod, "fwd_ms": fwd}
    if bwd is not None:
        row["bwd_ms"] = bwd
    return row


def test_medians_over_rounds_and_ratios_to_the_first_tree():
    rows = [_row("main", 2.0, 6.0), _row("new", 1.0, 3.0), _row("main", 4.0, 8.0), _row("new", 1.5, 5.0),
            _row("main", 3.0, 7.0), _row("new", 9.0, 4.0), _row("main", 5.0, mod="alibi"), _row("new", 4.0, mod="alibi")]
    summary = {entry["mod"]: entry for entry in bench_ab.summarize(rows, ["main", "new"])}
    plain = summary["plain"]
    assert plain["main:fwd_ms"] == 3.0 and plain["new:fwd_ms"] == 1.5
    assert plain["new:fwd_ms_ratio"] == pytest.approx(0.5) and plain["main:fwd_ms_ratio"] == 1.0
    assert plain["main:bwd_ms"] == 7.0 and plain["new:bwd_ms_ratio"] == pytest.approx(4.0 / 7.0)
    alibi = summary["alibi"]
    assert alibi["new:fwd_ms_ratio"] == pytest.approx(0.8) and "main:bwd_ms" not in alibi
    text = bench_ab.table(bench_ab.summarize(rows, ["main", "new"]), ["main", "new"])
    assert "| bf16 | 128 | 4096 | no | plain | 3.000 | 1.500 (0.500) | 7.000 | 4.000 (0.571) |" in text
    assert "| alibi | 5.000 | 4.000 (0.800) | - | - |" in text


def test_a_point_missing_from_the_baseline_has_no_ratio():
    summary = bench_ab.summarize([_row("new", 1.0)], ["main", "new"])
    assert summary[0]["new:fwd_ms"] == 1.0 and "new:fwd_ms_ratio" not in summary[0]


def test_trees_are_directories_holding_cuflash_or_revisions(tmp_path):
    (tmp_path / "tree" / "cuflash").mkdir(parents=True)
    assert bench_ab.parse_tree(f"base={tmp_path / 'tree'}", tmp_path) == ("base", (tmp_path / "tree").resolve())
    with pytest.raises(SystemExit, match="neither a directory holding cuflash/ nor a revision"):
        bench_ab.parse_tree("x=no-such-revision-anywhere", tmp_path)


@pytest.mark.parametrize("args, message", [
    ([], "at least two trees"),
    (["a=."], "at least two trees"),
    (["a=.", "b=.", "--mods", "plain,bogus"], "--mods takes plain, alibi, softcap; got bogus"),
])
def test_bad_arguments_are_refused_before_anything_runs(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and message in done.stderr


def test_equal_labels_are_refused(tmp_path):
    (tmp_path / "cuflash").mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), f"a={tmp_path}", f"a={tmp_path}"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "tree labels must differ" in done.stderr


def test_unknown_bias_cases_are_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "a=.", "b=.", "--cases", "swin,bogus"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "--cases takes triangle256" in done.stderr and "got bogus" in done.stderr


def test_the_bias_cases_shapes_broadcast_and_the_window_mask_cuts_each_window():
    """Each BIAS_CASES bias broadcasts to its q's (..., Lq, Lk); Swin's mask gives every token its
    own region's tokens (itself included), at most four regions a window."""
    numpy = pytest.importorskip("numpy")
    for name, (q_shape, bias_shape, _) in bench_ab.BIAS_CASES.items():
        scores = q_shape[:-1] + (q_shape[-2],)
        assert numpy.broadcast_shapes(scores, bias_shape) == scores, name
    mask = bench_ab.window_mask(numpy, 64, 7, numpy.random.default_rng(0))
    assert mask.shape == (64, 1, 49, 49) and mask.dtype == bool
    assert mask[:, 0].diagonal(axis1=-2, axis2=-1).all()
    assert (mask == mask.transpose(0, 1, 3, 2)).all()
    regions = [len({row.tobytes() for row in window[0]}) for window in mask]
    assert 1 <= min(regions) and max(regions) <= 4 and max(regions) > 1
