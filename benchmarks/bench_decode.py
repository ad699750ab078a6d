"""Split-KV decoding: GB/s of K+V read by cuflash's decode kernel against torch SDPA's cuDNN and
FLASH backends, on the same inputs.

Decoding reads the whole cache for a few query rows, so the figure of merit is bandwidth: the
bytes of K and V that must be read (B Hk Lk (D + Dv) x 2 bytes) over the time of one call. cuflash
is timed on its launches alone (``cuflash._gpu.decode``'s plan, run again and again: the
``attention_with_kvcache`` argument checks read the lengths on the host, a sync that is no part of
the kernel's bandwidth); SDPA (``torch.nn.attention.sdpa_kernel``) on a (B, Hq, Lq, D) query and
(B, Hk, Lk, D) keys and values, with ``enable_gqa`` when Hq > Hk. Every sequence holds Lk keys and
no mask (SDPA's causal is top-left; bottom-right decoding with Lq > 1 reads the same bytes).
Contiguous caches are (B, Hk, Lk, D); paged ones (num_pages, Hk, page_size, D) in a random page
order (page size 256 unless --page-size). ``--layout dense``: the same (B, Hk, Lk, D) keys and
values through the dense API, ``cuflash.attention(q, k, v)`` (host path included: what a decoding
step through transformers' own cache calls), whichever kernel it picks. Caches under four L2s rotate among copies so that no
call finds its keys in L2. Each cuflash result is checked against the cuDNN one (max abs diff).

    python benchmarks/bench_decode.py [--full] [--dtype bf16,fp16] [--headdim 64,128] [--lq 1,16]

The default grid runs in under two minutes on an H200; --full sweeps Lq 1/4/16, Lk 4k..256k,
B*Hk 8..2048, both dtypes, D 64/128, MHA and GQA 8:1, contiguous and paged (points whose cache
exceeds --max-gib are left out). Writes benchmarks/results/<UTC>_<gpu>_decode.json and prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks import record as records  # noqa: E402

DEFAULT_SHAPES = [(8, 262144), (64, 65536), (256, 16384), (2048, 4096), (32, 4096)]  # (B * Hk, Lk)
FULL_LK = [4096, 16384, 65536, 131072, 262144]
FULL_BHK = [8, 64, 256, 2048]
KV_HEADS = 8  # Hk; B = (B * Hk) / Hk, or 1 with Hk = B * Hk below 8


def _heads(bhk: int) -> tuple[int, int]:
    heads_k = min(KV_HEADS, bhk)
    return bhk // heads_k, heads_k


def _random(torch, shape, dtype):
    return torch.randn(shape, device="cuda", dtype=dtype)


def _as_cupy(cupy, tensor, numpy_dtype):
    """The tensor's memory as a CuPy array of ``numpy_dtype`` (bits shared, no copy): through
    DLPack as 16-bit integers (CuPy knows bfloat16 only by name), then viewed."""
    import torch

    return cupy.from_dlpack(tensor.view(torch.int16)).view(numpy_dtype)


class Point:
    """One configuration's inputs: ``copies`` sets of (q, k, v) as torch tensors, and the cuflash
    plans over them (contiguous or paged; dense: cuflash.attention calls)."""

    def __init__(self, libs, *, dtype, lq, lk, bhk, group, d, layout, page_size, copies):
        import numpy

        torch, cupy = libs.torch, libs.cupy
        self.batch, self.heads_k = _heads(bhk)
        self.heads_q = self.heads_k * group
        tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        ndtype = numpy.dtype(dtype)
        self.sdpa_inputs, self.plans = [], []
        from cuflash._gpu import decode

        paged = layout == "paged"
        for _ in range(copies):
            q = _random(torch, (self.batch, self.heads_q, lq, d), tdtype)
            if paged:
                pages_per_seq = -(-lk // page_size)
                num_pages = self.batch * pages_per_seq
                k_pages = _random(torch, (num_pages, self.heads_k, page_size, d), tdtype)
                v_pages = _random(torch, (num_pages, self.heads_k, page_size, d), tdtype)
                order = torch.randperm(num_pages, device="cuda").to(torch.int32).reshape(self.batch, pages_per_seq)
                # SDPA's dense copy of the same keys, gathered in page order
                k = k_pages[order.long()].permute(0, 2, 1, 3, 4).reshape(self.batch, self.heads_k, -1, d)[:, :, :lk]
                v = v_pages[order.long()].permute(0, 2, 1, 3, 4).reshape(self.batch, self.heads_k, -1, d)[:, :, :lk]
                k_cache, v_cache = _as_cupy(cupy, k_pages, ndtype), _as_cupy(cupy, v_pages, ndtype)
                table, capacity = cupy.asarray(order), pages_per_seq * page_size
            else:
                k = _random(torch, (self.batch, self.heads_k, lk, d), tdtype)
                v = _random(torch, (self.batch, self.heads_k, lk, d), tdtype)
                k_cache, v_cache = _as_cupy(cupy, k, ndtype), _as_cupy(cupy, v, ndtype)
                table, capacity = None, lk
            self.sdpa_inputs.append((q, k.contiguous() if paged else k, v.contiguous() if paged else v))
            if layout == "dense":
                self.plans.append(_DenseCall(libs.cuflash, _as_cupy(cupy, q, ndtype), k_cache, v_cache))
                continue
            lengths = cupy.full((self.batch,), lk, dtype=cupy.int32)
            self.plans.append(decode.plan(
                _as_cupy(cupy, q, ndtype), k_cache, v_cache, cache_seqlens=lengths, seqlen_fixed=lk, new_keys=0,
                block_table=table, capacity=capacity, scale=d ** -0.5, window_left=-1, window_right=-1,
                bottom_right=True, softcap=None, alibi_slopes=None, sinks=None, num_splits=0))
            del k, v
        self.kv_bytes = self.batch * self.heads_k * lk * 2 * d * torch.finfo(tdtype).bits // 8


class _DenseCall:
    """``cuflash.attention(q, k, v)`` in a plan's clothes (``run``, ``splits``)."""

    splits = "-"

    def __init__(self, cuflash, q, k, v):
        self.cuflash, self.q, self.k, self.v = cuflash, q, k, v

    def run(self):
        return self.cuflash.attention(self.q, self.k, self.v), None


def _rotating(calls):
    state = {"i": 0}

    def call():
        calls[state["i"] % len(calls)]()
        state["i"] += 1

    return call


def _time_gbs(cupy, calls, kv_bytes, repeats):
    ms = records.timed_ms(cupy, _rotating(calls), repeats)
    return kv_bytes / (ms * 1e-3) / 1e9, ms


def bench_point(libs, point: Point, repeats: int) -> dict:
    torch, cupy = libs.torch, libs.cupy
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    result = {}
    gbs, ms = _time_gbs(cupy, [plan.run for plan in point.plans], point.kv_bytes, repeats)
    result["cuflash"] = {"gbs": gbs, "ms": ms, "splits": point.plans[0].splits}
    reference = None
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        gqa = point.heads_q != point.heads_k

        def runner(inputs, backend=backend, gqa=gqa):
            def call():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(*inputs, enable_gqa=gqa)
            return call

        calls = [runner(x) for x in point.sdpa_inputs]
        try:
            out = calls[0]()
            torch.cuda.synchronize()
        except Exception as exc:  # the backend refuses these inputs
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            continue
        if reference is None:
            reference = out
        gbs, ms = _time_gbs(cupy, calls, point.kv_bytes, repeats)
        result[name] = {"gbs": gbs, "ms": ms}
    if reference is not None:
        mine, _ = point.plans[0].run()
        torch.cuda.synchronize()
        diff = (torch.as_tensor(mine.view(cupy.int16), device="cuda").view(reference.dtype).float() -
                reference.float()).abs().max().item()
        result["max_abs_diff_vs_sdpa"] = diff
    return result


def configurations(args):
    dtypes = [records.NUMPY_DTYPES[x] for x in args.dtype.split(",")]
    dims = [int(x) for x in args.headdim.split(",")]
    lqs = [int(x) for x in args.lq.split(",")]
    groups = [int(x) for x in args.group.split(",")]
    layouts = args.layout.split(",")
    shapes = list(itertools.product(FULL_BHK, FULL_LK)) if args.full else DEFAULT_SHAPES
    for dtype, d, lq, group, layout, (bhk, lk) in itertools.product(dtypes, dims, lqs, groups, layouts, shapes):
        if bhk * lk * 2 * d * 2 > args.max_gib * 2**30:
            continue
        yield dict(dtype=dtype, d=d, lq=lq, group=group, layout=layout, paged=layout == "paged", bhk=bhk, lk=lk)


def _cell(entry):
    return f"{entry['gbs']:.0f}" if entry and "gbs" in entry else "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole grid of the issue (long)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--headdim", default="128")
    parser.add_argument("--lq", default=None, help="default 1,16 (--full: 1,4,16)")
    parser.add_argument("--group", default="1,8", help="query heads per kv head: 1 MHA, 8 GQA 8:1")
    parser.add_argument("--layout", default="contiguous,paged",
                        help="comma-separated: contiguous, paged (the decode kernel's plan), dense (cuflash.attention)")
    parser.add_argument("--page-size", type=int, default=256)
    parser.add_argument("--max-gib", type=float, default=16.0, help="largest K+V cache in GiB")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    unknown = set(args.layout.split(",")) - {"contiguous", "paged", "dense"}
    if unknown:
        parser.error(f"--layout: {sorted(unknown)} not among contiguous, paged, dense")
    if args.lq is None:
        args.lq = "1,4,16" if args.full else "1,16"
    if args.full:
        args.dtype, args.headdim = ("bf16,fp16", "64,128") if args.dtype == "bf16" else (args.dtype, args.headdim)

    libs = harness.load_libraries()
    if libs.torch is None or libs.cuflash is None:
        raise SystemExit(f"bench_decode: needs torch with CUDA and cuflash ({libs.torch_note} {libs.cuflash_note})")
    environment = harness.collect_environment(libs)
    l2 = environment["l2_cache_bytes"]
    rows = []
    started = time.perf_counter()
    with harness.shared_stream(libs):
        for config in configurations(args):
            kv_bytes = config["bhk"] * config["lk"] * 2 * config["d"] * 2
            copies = max(1, min(8, -(-4 * l2 // kv_bytes)))
            point = None
            try:
                point = Point(libs, dtype=config["dtype"], lq=config["lq"], lk=config["lk"], bhk=config["bhk"],
                              group=config["group"], d=config["d"], layout=config["layout"], page_size=args.page_size,
                              copies=copies)
                measured = bench_point(libs, point, args.repeats)
            except Exception as exc:  # out of memory, a refused launch: recorded, the sweep goes on
                measured = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
            finally:
                point = None
                harness.release_memory(libs)
            row = dict(config, kv_gib=kv_bytes / 2**30, **measured)
            rows.append(row)
            print(_line(row), flush=True)
    record = {"environment": environment, "sweep": "decode", "page_size": args.page_size, "full": args.full,
              "seconds": time.perf_counter() - started, "rows": rows}
    path = records.write(record, records.record_path(args.out, environment["date_utc"], environment["device"], "decode"))
    print(f"\n{table(rows)}\n\nwrote {path}")
    return 0


HEADER = ("| dtype | D | Lq | heads | layout | B*Hk | Lk | K+V GiB | splits | cuflash GB/s | cuDNN GB/s | FLASH GB/s "
          "| vs cuDNN | vs FLASH |")


def _ratio(row, name):
    mine, other = row.get("cuflash"), row.get(name)
    if mine and other and "gbs" in mine and "gbs" in other:
        return f"{mine['gbs'] / other['gbs']:.2f}x"
    return "n/a"


def _line(row) -> str:
    if "error" in row:
        return f"| {row['dtype']} | {row['d']} | {row['lq']} | {row['group']}:1 | ... | {row['bhk']} | {row['lk']} | error: {row['error']} |"
    layout = row.get("layout") or ("paged" if row["paged"] else "contiguous")
    heads = "MHA" if row["group"] == 1 else f"GQA {row['group']}:1"
    return (f"| {row['dtype']} | {row['d']} | {row['lq']} | {heads} "
            f"| {layout} | {row['bhk']} | {row['lk']} | {row['kv_gib']:.2f} | {row['cuflash']['splits']} "
            f"| {_cell(row.get('cuflash'))} | {_cell(row.get('cudnn'))} | {_cell(row.get('flash'))} "
            f"| {_ratio(row, 'cudnn')} | {_ratio(row, 'flash')} |")


def table(rows) -> str:
    return "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [_line(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
