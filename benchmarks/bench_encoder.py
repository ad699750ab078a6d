"""Bidirectional encoders with padded batches through ``transformers``: cuflash against SDPA.

The encoder workload (BERT-like models, embedding and reranking models, ModernBERT) is padded
batches of unequal sequences under a bidirectional mask: every query sees its row's real keys
(ModernBERT's local layers: within a band, ``|i - j| <= 64``, too). cuflash.hf gets such a batch's
padding as a ``(B, 1, 1, L)`` key mask (its kernels cut each row's keys at its length) and a
band as a window; SDPA gets the padding broadcast over the queries: its default choice, and
pinned to its EFFICIENT, CUDNN and FLASH backends (FLASH takes no mask: "unsupported"). Same process, same weights
(random, from a config: no download), same inputs.

Per shape ``BxL`` (B sequences padded to L; row 0 is L tokens long, the others' lengths drawn
uniformly from [L/4, L], seeded, right padding as tokenizers pad) and backend:

* ``forward_ms``: the model's forward under ``torch.no_grad`` (inference: embedding a batch);
* ``step_ms``: forward + a loss over the real positions (a fixed random projection of the last
  hidden states) + backward, gradients zeroed before each (no optimizer);
* ``tokens_per_s``: real (unpadded) tokens per training step second; ``peak_gib``: the training
  step's peak of torch's allocator (cuflash's buffers come from it too);
* ``calls_cuflash`` / ``calls_fallback``: cuflash.hf.COUNTS over one eager forward (cuflash only;
  a fallback to SDPA would be counted and named);
* ``max_abs_diff``: the last hidden states at the real positions against the first backend's.

``--train-dropout P`` fine-tunes as BERT-style training does: the attention dropout rate P in the
config (BERT's ``attention_probs_dropout_prob``, ModernBERT's ``attention_dropout``) and the
training step in train mode, so attention drops probabilities (cuflash's kernels, SDPA's
dropping backends; those that cannot drop under a mask fail as "unsupported"); the forward and
the states compared stay eval mode's.

Medians of ``--steps`` timed calls after ``--warmup``; CUDA events on the GPU. ``--compile``
compiles the model (``--compile-backend``, inductor by default) for every backend: the routing
and the differences are still the eager forward's. Results: ``benchmarks/results/<UTC>_<device>_
encoder.json``, and a Markdown table. ``--device cpu --tiny`` is the smoke test (float32, NumPy
backend).

    python benchmarks/bench_encoder.py                                  # BERT-base, bf16
    python benchmarks/bench_encoder.py --family modernbert --shapes 8x2048
    python benchmarks/bench_encoder.py --train-dropout 0.1                 # fine-tuning with dropout
    python benchmarks/bench_encoder.py --device cpu --tiny --steps 1
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    GIB, SDPA_PINNED, Clock, collect_environment, compiled_afresh, failure)
from benchmarks.tables import cell  # noqa: E402

# (config class, model class, sizes): BERT-base and ModernBERT-base as published (hidden 768,
# 12 heads of 64); ModernBERT's local layers see |i - j| <= 64, one layer in three is global.
FAMILIES = {
    "bert": ("BertConfig", "BertModel", dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                             intermediate_size=3072, vocab_size=30522)),
    "modernbert": ("ModernBertConfig", "ModernBertModel", dict(
        hidden_size=768, num_attention_heads=12, num_hidden_layers=22, intermediate_size=1152, vocab_size=50368,
        local_attention=128, global_attn_every_n_layers=3)),
}
# Each family's config name of its attention dropout rate.
ATTENTION_DROPOUT = {"bert": "attention_probs_dropout_prob", "modernbert": "attention_dropout"}
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=128)
TINY_EXTRA = {"modernbert": dict(local_attention=6, global_attn_every_n_layers=2, pad_token_id=0, eos_token_id=1,
                                 bos_token_id=2, cls_token_id=2, sep_token_id=1)}


def build(torch, transformers, args, length: int):
    """The family's model (random weights, seed 0, eval mode: no dropout) on the device, SDPA's;
    its attention dropout rate ``--train-dropout`` (what the training step, in train mode, drops)."""
    config_class, model_class, sizes = FAMILIES[args.family]
    sizes = dict(TINY, **TINY_EXTRA.get(args.family, {})) if args.tiny else dict(sizes)
    sizes[ATTENTION_DROPOUT[args.family]] = args.train_dropout
    config = getattr(transformers, config_class)(**sizes, max_position_embeddings=max(512, length))
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).to(dtype=args.torch_dtype, device=args.device).eval()
    model.set_attn_implementation("sdpa")
    return model


def padded_batch(torch, vocab: int, batch: int, length: int, device: str):
    """(ids, attention_mask) of ``batch`` right-padded sequences of lengths in [L/4, L], row 0 L long."""
    generator = torch.Generator().manual_seed(batch * 1_000_003 + length)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=generator)
    lengths[0] = length
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def median_ms(clock: Clock, call, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        clock.sync()
        start = clock.mark()
        call()
        end = clock.mark()
        clock.sync()
        times.append(clock.elapsed_ms(start, end))
    return statistics.median(times)


def run_guarded(torch, transformers, hf, args, backend: str, batch: int, length: int, reference):
    """(result, states or None): run_backend, or its failure recorded (oom, unsupported: SDPA's
    pinned FLASH backend takes no mask; error) and the next backend run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = SDPA_PINNED.get(backend)
    try:
        with sdpa_kernel([getattr(SDPBackend, pinned)]) if pinned else contextlib.nullcontext():
            return run_backend(torch, transformers, hf, args, backend, batch, length, reference)
    except Exception as error:  # noqa: BLE001 - record and go on with the next backend
        return dict(failure(torch, error), backend=backend, shape=f"{batch}x{length}"), None
    finally:
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def run_backend(torch, transformers, hf, args, backend: str, batch: int, length: int, reference):
    model = build(torch, transformers, args, length)
    if backend == "cuflash":
        model.set_attn_implementation(hf.register())
    ids, mask = padded_batch(torch, model.config.vocab_size, batch, length, args.device)
    real = mask.bool()
    weights = torch.randn(batch, length, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    weights = (weights * mask.cpu()[..., None]).to(device=args.device, dtype=args.torch_dtype)
    clock = Clock(torch, args.device == "cuda")
    result = {"status": "ok", "backend": backend, "shape": f"{batch}x{length}", "real_tokens": int(mask.sum())}

    hf.reset_counts()
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask).last_hidden_state
    result.update(calls_cuflash=hf.COUNTS["cuflash"], calls_fallback=hf.COUNTS["fallback"],
                  fallback_reasons=dict(hf.COUNTS["fallback_reasons"]))
    states = hidden[real].float()
    result["max_abs_diff"] = None if reference is None else float((states - reference).abs().max())

    run = compiled_afresh(torch, model, args.compile_backend) if args.compile else model

    def forward():
        with torch.no_grad():
            run(ids, attention_mask=mask)

    def step():
        model.zero_grad(set_to_none=True)
        model.train(args.train_dropout > 0)  # (dropout drops in train mode only)
        (run(ids, attention_mask=mask).last_hidden_state * weights).float().sum().backward()
        model.eval()

    result["forward_ms"] = median_ms(clock, forward, args.warmup, args.steps)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["step_ms"] = median_ms(clock, step, args.warmup, args.steps)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else None
    result["tokens_per_s"] = result["real_tokens"] / (result["step_ms"] / 1e3)
    return result, states


def format_table(rows: list[dict]) -> str:
    lines = ["| shape | backend | forward ms | step ms | step vs first | real tokens/s | peak GiB | max abs diff | "
             "cuflash calls / fallbacks |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    first = {}
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['shape']} | {row['backend']} | {row['status']}: {row['note'][:80]} |" + " |" * 7)
            continue
        base = first.setdefault(row["shape"], row["step_ms"])
        lines.append(f"| {row['shape']} | {row['backend']} | {cell(row['forward_ms'])} | {cell(row['step_ms'])} | "
                     f"{base / row['step_ms']:.2f}x | {row['tokens_per_s']:.0f} | {cell(row['peak_gib'])} | "
                     f"{cell(row['max_abs_diff'], '.2e')} | {row['calls_cuflash']} / {row['calls_fallback']} |")
    lines += ["", "Step = forward + a loss over the real positions + backward (no optimizer); step vs first = the "
              "first backend's step time / this one's (> 1: faster); max abs diff = last hidden states at the real "
              "positions against the first backend's; medians of CUDA-event timings (perf_counter on the CPU)."]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="bert")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model (2 layers, hidden 64), float32")
    parser.add_argument("--shapes", type=lambda s: [tuple(int(n) for n in p.split("x")) for p in s.split(",")],
                        default=None, help="BxL,... (default 64x512,8x4096; --tiny: 3x13)")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["sdpa", *SDPA_PINNED, "cuflash"],
                        help=f"from sdpa, {', '.join(SDPA_PINNED)}, cuflash (default: all); the first is the "
                             "reference")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model per backend")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (with --compile)")
    parser.add_argument("--train-dropout", type=float, default=0.0,
                        help="the attention dropout rate of the training step (train mode); 0: eval mode")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = [(3, 13)] if args.tiny else [(64, 512), (8, 4096)]
    known = {"sdpa", "cuflash", *SDPA_PINNED}
    unknown = set(args.backends) - known
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; choose from {', '.join(sorted(known))}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    import torch
    import transformers

    import cuflash.hf as hf

    args.torch_dtype = torch.float32 if args.tiny or args.device == "cpu" else torch.bfloat16
    environment = collect_environment(torch, args.device)
    record = {"sweep": "encoder", "environment": environment, "family": args.family, "tiny": args.tiny,
              "dtype": str(args.torch_dtype), "compile": args.compile_backend if args.compile else None,
              "train_dropout": args.train_dropout,
              "results": []}
    path = records.record_path(args.out_dir, environment["date_utc"], environment["device"], "encoder")
    for batch, length in args.shapes:
        reference = None
        for backend in args.backends:
            result, states = run_guarded(torch, transformers, hf, args, backend, batch, length, reference)
            reference = states if reference is None else reference
            record["results"].append(result)
            records.write(record, path)
            print(f"{result['shape']} {backend}: " + (
                f"step {result['step_ms']:.2f} ms, forward {result['forward_ms']:.2f} ms, diff {result['max_abs_diff']}"
                if result["status"] == "ok" else f"{result['status']}: {result['note'][:200]}"), flush=True)
    print(format_table(record["results"]))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
