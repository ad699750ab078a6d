"""benchmarks/sanitize.py without a GPU: it imports, --help, --list and --dry-run work, every case
dict is well formed, the child's code runs every case (on the CPU backend, through a stand-in
``cupy`` whose arrays are NumPy's), and compute-sanitizer's summaries are read right. The run
itself needs a GPU and compute-sanitizer: ``python benchmarks/sanitize.py --out DIR``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "sanitize.py"
sys.path.insert(0, str(REPO))

from benchmarks import sanitize  # noqa: E402

# A stand-in for cupy whose arrays are NumPy's: cuflash then runs its CPU backend on both sides.
FAKE_CUPY = textwrap.dedent("""\
    import numpy
    asarray = asnumpy = numpy.asarray
    class ndarray:  # nothing is a CuPy array here
        pass
    class _Device:
        def synchronize(self):
            pass
    class cuda:
        Device = _Device
        set_allocator = set_pinned_memory_allocator = staticmethod(lambda allocator: None)
""")


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


def test_help_list_and_dry_run_need_no_gpu():
    done = _run("--help")
    assert done.returncode == 0 and "--tools" in done.stdout and "--quick" in done.stdout
    full, quick = _run("--list"), _run("--list", "--quick")
    assert full.returncode == 0 and quick.returncode == 0
    assert len(quick.stdout.splitlines()) < len(full.stdout.splitlines())
    dry = _run("--dry-run", "--quick", "--tools", "racecheck,initcheck")
    lines = dry.stdout.splitlines()
    assert dry.returncode == 0 and len(lines) == 2 * len(sanitize.select_cases(True, None))
    assert all("--error-exitcode 1" in line and "--child" in line for line in lines)
    assert _run("--list", "--tools", "bogus").returncode == 2


def test_a_missing_sanitizer_is_said_plainly(tmp_path):
    if Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        pytest.skip("a toolkit in /usr/local/cuda is always found")
    env = dict(os.environ, PATH=str(tmp_path), CUDA_HOME=str(tmp_path), CUDA_PATH=str(tmp_path))
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--quick",
                           "--sanitizer", str(tmp_path / "none")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "compute-sanitizer not found" in done.stderr


def test_the_cases_cover_every_kernel_family():
    cases = sanitize.select_cases(False, None)
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names))
    assert {c["dtype"] for c in cases} == set(sanitize.DTYPES)
    assert {c["dtype"] for c in sanitize.select_cases(True, None)} == set(sanitize.DTYPES)
    odd = [c for c in cases if c.get("q") == (1, 2, 97, 59) and c.get("k") == (1, 2, 1025, 59)]
    assert {(c["dtype"], tuple(sorted(c["options"]))) for c in odd} >= {
        (d, m) for d in sanitize.DTYPES for m in ((), ("causal",), ("window",), ("causal", "window"))}
    assert any(c.get("q", (0,) * 4)[-2] > c.get("k", (0,) * 4)[-2] for c in cases)  # Lq > Lk
    assert any(c.get("q", (0, 0))[1] > c.get("k", (0, 0))[1] for c in cases)  # GQA
    assert {c["dtype"] for c in cases if c.get("deterministic")} == set(sanitize.DTYPES)
    assert any(c.get("api") == "varlen" for c in cases)
    # the kernels that came with bias/mask (bias_grad, key_bounds, staged d32 tiles), TF32 and decode
    options = [c.get("options", {}) for c in cases]
    assert any("bias" in o for o in options) and any(str(o.get("mask", "")).endswith("padding") for o in options)
    assert any("bias" in o and c.get("q", (0,) * 4)[-1] <= 32 for o, c in zip(options, cases))
    assert any(o.get("precision") == "tf32" for o in options)
    assert {c["page_size"] is None for c in cases if c.get("api") == "kvcache"} == {True, False}
    # attention dropout: every dtype, dense and packed (the kDropout forms of each family)
    dropping = [c for c, o in zip(cases, options) if o.get("dropout_p")]
    assert {c["dtype"] for c in dropping} == set(sanitize.DTYPES) and any(c.get("api") == "varlen" for c in dropping)
    with pytest.raises(ValueError, match="unknown keys"):
        sanitize.check_case(dict(name="typo", dtype="float16", q=(1, 1, 2, 2), k=(1, 1, 2, 2), option={}))


def test_every_case_runs_through_the_child_code(tmp_path):
    """The child's code on every case, with a stand-in cupy whose arrays are NumPy's: cuflash then
    runs its CPU backend on both sides, so this checks the case handling, not the kernels."""
    (tmp_path / "cupy.py").write_text(FAKE_CUPY)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks import sanitize\n"
            "print(json.dumps({c['name']: sanitize.run_case(c) for c in sanitize.CASES}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = json.loads(done.stdout.splitlines()[-1])
    bad = {name: v for name, v in verdicts.items() if v["status"] not in ("ok", "unsupported")}
    assert not bad
    assert len(verdicts) == len(sanitize.CASES)


def test_sanitizer_summaries_are_read():
    memcheck = "========= COMPUTE-SANITIZER\n" + sanitize.RESULT_TAG + '{"status": "ok"}\n' \
               "========= ERROR SUMMARY: 0 errors\n"
    parsed = sanitize.parse_log(memcheck)
    assert parsed["errors"] == 0 and parsed["child"] == {"status": "ok"} and not parsed["device_refused"]
    race = ("========= Error: Race reported between Write access at planted+0x30\n"
            "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
            "========= ERROR SUMMARY: 1 error\n")
    parsed = sanitize.parse_log(race)
    assert (parsed["errors"], parsed["hazards"], parsed["race_errors"], parsed["race_warnings"]) == (1, 3, 1, 2)
    assert parsed["child"] is None
    assert sanitize.parse_log("killed")["errors"] is None
    assert sanitize.parse_log("========= Error: Device not supported\n")["device_refused"]
    result = dict(sanitize.parse_log(memcheck), rc=0)
    assert not sanitize.failed(result, "memcheck")
    assert sanitize.failed(dict(result, errors=2), "memcheck") and sanitize.failed(dict(result, errors=None), "memcheck")
    assert sanitize.failed(dict(result, child={"status": "mismatch"}), "memcheck")
    assert not sanitize.failed(dict(result, child={"status": "unsupported"}), "memcheck")


def test_the_driver_end_to_end_with_a_stand_in_sanitizer(tmp_path):
    """The whole driver (self-test, warm-up, tools, summary, archive) with a stand-in
    compute-sanitizer that runs the child and reports 0 errors (1 for the planted bugs), and the
    stand-in cupy of test_every_case_runs_through_the_child_code."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cupy.py").write_text(FAKE_CUPY)
    sanitizer = fake / "compute-sanitizer"
    sanitizer.write_text(textwrap.dedent("""\
        #!/bin/sh
        for last; do :; done
        case "$last" in planted-*) echo "========= ERROR SUMMARY: 1 error"; exit 1;; esac
        while [ "$#" -gt 0 ]; do case "$1" in */python*|python*) break;; esac; shift; done
        "$@"; rc=$?
        echo "========= ERROR SUMMARY: 0 errors"
        exit $rc
    """))
    sanitizer.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(fake))
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--tools", "memcheck,racecheck",
                           "--sanitizer", str(sanitizer), "--jobs", "8"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "sanitize.json").read_text())
    quick = [c["name"] for c in sanitize.select_cases(True, None)]
    assert set(report["warmup"]) == set(quick) and not report["warmup_failed"]
    for tool in ("memcheck", "racecheck"):
        assert report["selftest"][tool]["errors"] == 1
        assert set(report["results"][tool]) == set(quick)
        assert report["summary"][tool] == {"errors": 0, "failed_cases": [], "unsupported_cases": [],
                                           "unjudged_cases": []}
        assert all(r["child"]["status"] == "ok" for r in report["results"][tool].values())
    assert (out / "logs.tar.gz").is_file()


def test_coverage_names_the_kernels_no_case_loaded():
    """The report's coverage: every cuda_src/*.cu kernel is either loaded by some case's child or
    listed as never loaded (a family the cases do not reach is named, not assumed covered)."""
    runs = {"a": {"child": {"status": "ok", "kernels": ["fwd_tc", "bwd_delta", "not_a_kernel"]}},
            "b": {"child": {"status": "ok", "kernels": ["fwd_tc", "bwd_dkdv_wgmma_ws"]}}, "c": {"child": None}}
    report = sanitize.coverage(runs)
    stems = sorted(path.stem for path in (REPO / "cuda_src").glob("*.cu"))
    assert report["loaded"] == ["bwd_delta", "bwd_dkdv_wgmma_ws", "fwd_tc"]
    assert sorted(report["loaded"] + report["never_loaded"]) == stems and "fwd_wgmma_ws" in report["never_loaded"]


def test_racecheck_leaves_mbarrier_handoffs_unjudged_only_when_its_probe_reports_hazards():
    """A run whose child loaded a kernel that hands shared memory over through mbarriers
    (bwd_dkdv_wgmma_ws) is unjudged by racecheck when racecheck reported hazards on the correct
    mbarrier ring and reported something on the run; a clean run is judged (and passes); a wrong
    answer from such a case still fails; other tools still judge."""
    ws = {"rc": 1, "errors": 12, "child": {"status": "ok", "kernels": ["bwd_delta", "bwd_dkdv_wgmma_ws"]}}
    plain = {"rc": 1, "errors": 12, "child": {"status": "ok", "kernels": ["bwd_delta", "bwd_dkdv_wgmma"]}}
    blind = {"racecheck_models_mbarriers": False}
    assert sanitize.unjudged(blind, "racecheck", ws)
    assert not sanitize.unjudged(blind, "racecheck", plain)
    assert not sanitize.unjudged(blind, "racecheck", {"rc": 1, "errors": 3, "child": None})
    assert not sanitize.unjudged(blind, "memcheck", ws)
    assert not sanitize.unjudged({"racecheck_models_mbarriers": True}, "racecheck", ws)
    clean = {**ws, "rc": 0, "errors": 0, "hazards": 0, "race_errors": 0}
    assert not sanitize.unjudged(blind, "racecheck", clean) and not sanitize.failed(clean, "racecheck")
    assert sanitize.unjudged(blind, "racecheck", {**clean, "hazards": 200})  # warnings only, rc 0
    hazards = ws
    assert not sanitize.failed(hazards, "racecheck", unjudged_by_tool=True)
    assert sanitize.failed(hazards, "racecheck")
    assert sanitize.failed({**hazards, "child": {"status": "mismatch"}}, "racecheck", unjudged_by_tool=True)
