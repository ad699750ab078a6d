"""A real model: a Llama-like (or Gemma-2-like) transformers model, cuflash (via cuflash.hf) against
torch SDPA's backends, transformers' eager attention and FlexAttention.

One model is built from a config with random weights (no download) and every attention backend
runs on it in the same process, with the same weights and the same token ids; only the attention
implementation changes (``model.set_attn_implementation``; the SDPA backends are pinned with
``torch.nn.attention.sdpa_kernel``, ``sdpa`` is torch's own choice):

* ``cuflash``      ``attn_implementation=cuflash.hf.register()``;
* ``sdpa``         ``attn_implementation="sdpa"``, torch's default backend choice;
* ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``: ``"sdpa"`` under ``sdpa_kernel([SDPBackend.X])``;
* ``eager``        ``attn_implementation="eager"``: the model's own matmul-softmax-matmul;
* ``flex_attention`` ``attn_implementation="flex_attention"``: torch's FlexAttention, compiled by
  ``torch.compile`` on its first calls (counted in ``first_step_s``); CUDA only here.

``--family`` picks the model (``benchmarks/model_families.py``): ``llama`` (default; backends
sdpa, cuflash and SDPA's three pinned ones, checked against ``sdpa``) or ``gemma2``: Gemma-2's
attention (logit softcap 50, final-logit softcap 30, sliding window 4096 on every other layer,
``query_pre_attn_scalar`` = head dim) at the same sizes, intermediate 8192; backends eager,
cuflash, flex_attention and sdpa, checked against ``eager``. SDPA cannot softcap (transformers
drops the softcap silently), so for gemma2 the SDPA backends compute other math: they run as a
speed reference, marked ``(other math)``, their differences recorded but not judged. At 2 x 4096
the window covers every causal key; transformers then gives SDPA and eager a materialised mask on
the sliding layers (what a real Gemma-2 gets), so ``sdpa_flash`` cannot run them.

Default model: 8 layers, hidden 2048, 16 query heads and 8 key/value heads of dim 128 (GQA;
``--mha``: 16/16; ``--kv-heads N``: 16/N), intermediate 5632, vocab 32000, bfloat16; shapes
``2x4096`` and ``1x32768``
(batch x tokens). ``--compile`` times the model compiled as a whole (``torch.compile``, backend
``--compile-backend``, default inductor), as most training runs do: steps, peak and prefill;
the first step stays eager (the correctness check; the first compiled step's wall time is
``first_compiled_step_s``) and the attention-time and host-time instruments, eager by nature,
are not used. For each shape and backend:

* ``step_ms``: one training step = forward with the LM loss (labels = inputs) + backward, with
  ``zero_grad(set_to_none=True)`` first and **no optimizer step**; median of ``--steps`` after
  ``--warmup``, timed with CUDA events (``perf_counter`` on the CPU); ``tokens_per_s`` from it;
* ``prefill_ms``: forward under ``torch.inference_mode`` in eval mode, ``use_cache=False`` and
  ``logits_to_keep=1`` (what generation's prefill computes), median likewise;
* ``first_step_s``: wall time of the backend's very first training step at that shape (kernel
  compilation or cache loading, cuDNN plan building, ...). One SDPA step at the shape runs
  before any backend, so CUDA/cuBLAS start-up is not charged to whichever backend goes first;
* ``attention_ms_per_step``: GPU time inside the attention calls of a training step, forward and
  backward (``attention_fwd_ms``/``attention_bwd_ms``), from CUDA events recorded by a wrapper
  around the attention function: forward around the call, backward by identity autograd
  functions on its inputs and output, whose backward records an event just before and just after
  the attention's backward. Median over a few separate instrumented steps (the timed steps run
  without the wrapper). Includes the ``(B,H,L,D) -> (B,L,H,D)`` copy both backends make;
* ``host_us_fwd`` / ``host_us_fwd_bwd``: wall time of the Python call of the attention function
  alone (layer 0's module, the shape's q/k/v, and the mask and keyword arguments the model passed
  layer 0 in the instrumented steps: scale; Gemma-2's softcap and window), forward, and forward +
  ``backward()``; the device is synchronized *between* calls, never inside the timed region, so
  this is the launch/host overhead (a hidden synchronization would show up as GPU time here).
  Median of ``--host-calls``;
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` over a training step (reset before), plus,
  for cuflash, the growth of CuPy's memory pool over that step (cuflash's outputs and workspaces
  live there, emptied before): ``peak_torch_gib`` + ``peak_cupy_gib``, an upper bound as the two
  peaks need not coincide;
* correctness, on the first step: ``max_abs_diff_logits``, ``loss_diff`` and
  ``grad_rel_diff`` (layer 0's q_proj weight gradient, max abs difference over max abs) against
  the family's reference backend (``sdpa``; gemma2: ``eager``); and ``attn_max_abs_diff`` /
  ``attn_grad_max_abs_diff``: the attention function alone (the host-time call) on
  standard-normal q, k, v of the shape (peaky scores, unlike the model's near-uniform attention
  at init) against the reference's. ``correct`` is False (``!`` in the table) when a difference
  exceeds a loose bf16 bound; None for a backend that computes other math.

Results go to ``benchmarks/results/<UTC>_<device>_model.json`` (rewritten after every backend,
so an interrupted run keeps what it measured) and a Markdown table per shape is printed.
``--device cpu --tiny`` runs the whole thing on the CPU (tiny model, float32, cuflash's NumPy
backend; flex_attention skipped) as a smoke test.

    python benchmarks/bench_model.py                       # H100/H200: default model and shapes
    python benchmarks/bench_model.py --mha --shapes 2x4096
    python benchmarks/bench_model.py --kv-heads 2 --shapes 2x4096   # GQA 16/2 (MQA: --kv-heads 1)
    python benchmarks/bench_model.py --family gemma2 --shapes 2x4096
    python benchmarks/bench_model.py --flattened --compile --shapes 8x1024   # padding-free training, compiled
    python benchmarks/bench_model.py --device cpu --tiny --steps 1 [--family gemma2]
"""
from __future__ import annotations

import argparse
import gc
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402
from benchmarks.tables import cell  # noqa: E402
from benchmarks.model_families import FAMILIES  # noqa: E402

SDPA_PINNED = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
               "sdpa_efficient": "EFFICIENT_ATTENTION"}
GIB = 1024 ** 3
# Loose bounds for "correct" (bf16 on GPU, float32 on the CPU): max abs differences against the reference.
# Relative ones (max abs difference over max abs of the reference) except the loss's.
BOUNDS = {"bf16": dict(logits=0.05, loss=0.05, grad=0.1, attn=0.03, attn_grad=0.05),
          "fp32": dict(logits=1e-4, loss=1e-4, grad=1e-3, attn=1e-4, attn_grad=1e-4)}


# --- small helpers ---------------------------------------------------------------------------------


class Clock:
    """CUDA events on the GPU, perf_counter on the CPU; ``elapsed_ms(start, end)`` after ``sync()``."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def compiled_afresh(torch, function, backend: str, mode: str | None = None, fullgraph: bool = False):
    """``torch.compile(function)`` after ``torch._dynamo.reset()``: each backend and shape of a sweep
    compiled afresh (a model compiled for another backend would leave its graphs and guards, and
    dynamo's recompile limit, to this one). ``mode`` applies to inductor only."""
    torch._dynamo.reset()
    options = dict(mode=mode) if mode is not None and backend == "inductor" else {}
    return torch.compile(function, backend=backend, fullgraph=fullgraph, **options)


# --- environment -----------------------------------------------------------------------------------


def collect_environment(torch, device: str) -> dict:
    import numpy
    import transformers

    import cuflash

    env = {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__,
           "cuflash": getattr(cuflash, "__version__", "unknown"), "cuflash_path": cuflash.__file__}
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except Exception as error:  # noqa: BLE001 - CPU runs need no CuPy
        env["cupy"] = None
        env["cupy_note"] = f"{type(error).__name__}: {error}"[:200]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                   torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver_version=records.command_output("nvidia-smi", "--query-gpu=driver_version",
                                                         "--format=csv,noheader", "--id=0") or "unknown")
    else:
        env.update(device="cpu", cpu=platform.processor() or platform.machine())
    env.update(**records.source_commit(), date_utc=records.now_utc())
    return env


# --- model and backends ----------------------------------------------------------------------------


def model_config(args) -> dict:
    config = FAMILIES[args.family].config(args)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    config["max_position_embeddings"] = max(4096, max(length for _, length in args.shapes))
    return config


def build_model(torch, transformers, family, config: dict, dtype, device: str):
    torch.manual_seed(0)
    model_config = getattr(transformers, family.config_class)(**config, attention_dropout=0.0)
    model = transformers.AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device)


def token_ids(torch, config: dict, batch: int, length: int, device: str):
    """(batch, length) random token ids, the same for every backend (and run) at that shape."""
    generator = torch.Generator().manual_seed(batch * 1_000_003 + length)
    return torch.randint(0, config["vocab_size"], (batch, length), generator=generator).to(device)


def attention_backends(hf, model, cuflash_name: str) -> dict:
    """backend -> (attention implementation, its attention function, its mask function): what
    ``set_attn_implementation`` selects and what the instrumented copies wrap. ``eager`` is the
    model's own module-level function (transformers has no ``"eager"`` entry in its interface)."""
    import inspect

    from transformers import masking_utils
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eager = inspect.getmodule(type(model.model.layers[0].self_attn)).eager_attention_forward
    sdpa = ("sdpa", sdpa_attention_forward, masking_utils.sdpa_mask)
    return {"cuflash": (cuflash_name, hf.attention_forward, hf.mask_function),
            "eager": ("eager", eager, masking_utils.eager_mask),
            "flex_attention": ("flex_attention", flex_attention_forward, masking_utils.flex_attention_mask),
            **{name: sdpa for name in ("sdpa", *SDPA_PINNED)}}


def timed_name(implementation: str) -> str:
    return f"bench_timed_{implementation}"


def register_timed(transformers, backends: dict, layer0, layer0_call: dict, timings: list, clock: Clock, torch):
    """Register an instrumented copy of each backend's attention function under timed_name (see the
    docstring), with the backend's mask function; the copies keep layer 0's last call's mask and
    keyword arguments in ``layer0_call`` (for host_attention)."""

    class _Enter(torch.autograd.Function):  # backward: after the attention's backward
        @staticmethod
        def forward(ctx, q, k, v):
            return q.view_as(q), k.view_as(k), v.view_as(v)

        @staticmethod
        def backward(ctx, dq, dk, dv):
            timings[-1]["bwd_end"].append(clock.mark())
            return dq, dk, dv

    class _Exit(torch.autograd.Function):  # backward: before the attention's backward
        @staticmethod
        def forward(ctx, out):
            return out.view_as(out)

        @staticmethod
        def backward(ctx, dout):
            timings[-1]["bwd_start"].append(clock.mark())
            return dout

    def timed(function):
        def wrapper(module, query, key, value, attention_mask, **kwargs):
            record = timings[-1]
            if module is layer0:
                layer0_call.update(mask=attention_mask, kwargs=dict(kwargs))
            if torch.is_grad_enabled():
                query, key, value = _Enter.apply(query, key, value)
            record["fwd_start"].append(clock.mark())
            out, weights = function(module, query, key, value, attention_mask, **kwargs)
            record["fwd_end"].append(clock.mark())
            if torch.is_grad_enabled():
                out = _Exit.apply(out)
            return out, weights
        return wrapper

    for implementation, function, mask in {entry[0]: entry for entry in backends.values()}.values():
        transformers.AttentionInterface.register(timed_name(implementation), timed(function))
        transformers.masking_utils.AttentionMaskInterface.register(timed_name(implementation), mask)


# --- one backend at one shape ----------------------------------------------------------------------


def run_backend(ctx, backend: str, batch: int, length: int, ids, reference: dict) -> dict:
    torch, model, clock, args = ctx["torch"], ctx["model"], ctx["clock"], ctx["args"]
    hf, family = ctx["hf"], ctx["family"]
    implementation, function, _ = ctx["backends"][backend]
    context = ctx["kernel_context"](backend)
    mask = torch.ones_like(ids) if args.attention_mask == "ones" else None
    cache_option = {"use_cache": False} if args.no_cache else {}
    documents = {}
    if args.flattened:  # the B sequences as documents of one row, as DataCollatorWithFlattening gives them
        ids, mask, documents = flattened(torch, ids)
        cache_option = {"use_cache": False}  # (SDPA's model masks the documents from position_ids only then)
    result: dict = {"status": "ok"}
    hf.reset_counts()

    # --compile: the timed steps, the peak and prefill run the compiled model; the first step (the
    # correctness check), the attention-time instrumentation and the host-time calls stay eager.
    runner = model if ctx["compile"] is None else compiled_afresh(torch, model, ctx["compile"])

    def train_step(run=runner):
        model.zero_grad(set_to_none=True)
        output = run(ids, attention_mask=mask, labels=ids, **cache_option, **documents)
        output.loss.backward()
        return output

    def prefill():
        with torch.inference_mode():
            return runner(ids, attention_mask=mask, use_cache=False, logits_to_keep=1, **documents)

    def timed_median(step, count):
        times = []
        for _ in range(count):
            start = clock.mark()
            step()
            end = clock.mark()
            clock.sync()
            times.append(clock.elapsed_ms(start, end))
        return statistics.median(times), times

    with context:
        model.set_attn_implementation(implementation)
        model.train()
        clock.sync()
        # First step: cold, and the correctness check.
        begin = time.perf_counter()
        output = train_step(model)
        clock.sync()
        result["first_step_s"] = time.perf_counter() - begin
        if ctx["compile"] is not None:
            begin = time.perf_counter()
            train_step()
            clock.sync()
            result["first_compiled_step_s"] = time.perf_counter() - begin
        logits = output.logits.detach()
        loss = output.loss.detach().float().item()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.detach().float()
        del output
        if backend == family.reference:  # the logits wait on the host: they would count in the others' peaks
            reference.update(logits=logits.cpu(), loss=loss, grad=grad,
                             logits_max=logits.abs().max().float().item())
        if reference:
            result["max_abs_diff_logits"] = max_abs_diff(logits, reference["logits"])
            result["rel_diff_logits"] = result["max_abs_diff_logits"] / max(reference["logits_max"], 1e-30)
            result["loss"] = loss
            result["loss_diff"] = abs(loss - reference["loss"])
            result["grad_rel_diff"] = ((grad - reference["grad"]).abs().max()
                                       / reference["grad"].abs().max().clamp_min(1e-30)).item()
        del logits, grad

        for _ in range(args.warmup):
            train_step()
        clock.sync()
        # Peak memory of one step (torch's allocator, plus CuPy's pool for cuflash).
        if ctx["cuda"]:
            pool = ctx["cupy_pool"]
            model.zero_grad(set_to_none=True)
            gc.collect()
            if pool is not None:
                pool.free_all_blocks()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cupy_before = pool.total_bytes() if pool is not None else 0
            train_step()
            torch.cuda.synchronize()
            result["peak_torch_gib"] = torch.cuda.max_memory_allocated() / GIB
            result["peak_cupy_gib"] = ((pool.total_bytes() - cupy_before) / GIB) if pool is not None else 0.0
            result["peak_gib"] = result["peak_torch_gib"] + result["peak_cupy_gib"]

        result["step_ms"], result["step_ms_all"] = timed_median(train_step, args.steps)
        result["tokens_per_s"] = batch * length / (result["step_ms"] / 1e3)
        calls_per_step = ctx["hf"].COUNTS["cuflash"]

        if ctx["compile"] is not None:  # (the instruments are eager: they would break the graph)
            result.update(attention_fwd_ms=None, attention_bwd_ms=None, attention_ms_per_step=None,
                          attention_share=None)
        else:
            attention_time(ctx, train_step, implementation, result)

        model.zero_grad(set_to_none=True)
        model.eval()
        for _ in range(max(1, args.warmup)):
            prefill()
        result["prefill_ms"], result["prefill_ms_all"] = timed_median(prefill, args.steps)
        result["prefill_tokens_per_s"] = batch * length / (result["prefill_ms"] / 1e3)
        model.train()

        if ctx["compile"] is None and not args.flattened:  # (its calls' mask and documents are the model's shape)
            host_attention(ctx, function, batch, length, result, reference, backend)
        else:
            result.update(host_us_fwd=None, host_us_fwd_bwd=None)
    return finish_result(ctx, backend, result, calls_per_step)


def flattened(torch, ids):
    """(ids, mask, keyword arguments) of ``ids``' B rows as documents flattened into one row, as
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` makes them: (1, B L) tokens,
    position_ids restarting per document, cu_seq_lens_q/_k and max_length_q/_k; no mask."""
    batch, length = ids.shape
    cu = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device=ids.device)
    positions = torch.arange(length, device=ids.device).repeat(batch)[None]
    return ids.reshape(1, -1), None, dict(position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                          max_length_q=length, max_length_k=length)


def attention_time(ctx, train_step, implementation, result):
    """GPU time inside the attention calls of a training step (instrumented steps, eager)."""
    model, clock, args = ctx["model"], ctx["clock"], ctx["args"]
    model.set_attn_implementation(timed_name(implementation))
    fwd, bwd = [], []
    for _ in range(args.attn_steps):
        ctx["timings"].append({"fwd_start": [], "fwd_end": [], "bwd_start": [], "bwd_end": []})
        train_step()
        clock.sync()
        record = ctx["timings"][-1]
        fwd.append(sum(clock.elapsed_ms(a, b) for a, b in zip(record["fwd_start"], record["fwd_end"])))
        # Backward runs the layers in reverse: pair the i-th start with the i-th end.
        if len(record["bwd_start"]) == len(record["bwd_end"]) == len(record["fwd_start"]):
            bwd.append(sum(clock.elapsed_ms(a, b) for a, b in zip(record["bwd_start"], record["bwd_end"])))
    ctx["timings"].clear()
    result["attention_fwd_ms"] = statistics.median(fwd)
    result["attention_bwd_ms"] = statistics.median(bwd) if bwd else None
    result["attention_ms_per_step"] = result["attention_fwd_ms"] + (result["attention_bwd_ms"] or 0.0)
    result["attention_share"] = result["attention_ms_per_step"] / result["step_ms"]
    model.set_attn_implementation(implementation)


def finish_result(ctx, backend, result, calls_per_step):
    """The routing check (cuflash.hf's counts of eager calls) and the correctness verdict."""
    family = ctx["family"]
    counts = ctx["hf"].COUNTS
    if backend == "cuflash":
        result["cuflash_kernels"] = kernel_families()
    result["attention_calls_cuflash"] = counts["cuflash"]
    result["attention_calls_fallback"] = counts["fallback"]
    result["fallback_reasons"] = dict(counts["fallback_reasons"])
    if backend == "cuflash" and (calls_per_step == 0 or counts["fallback"]):
        result["status"] = "error"
        result["note"] = (f"cuflash was not called ({calls_per_step} cuflash calls in the eager steps, "
                          f"{counts['fallback']} fallbacks: {counts['fallback_reasons']})")
    if backend in family.other_math:
        result["computes"] = family.other_math[backend]
    result["correct"] = None if backend in family.other_math else is_correct(result, ctx["bounds"])
    return result


def run_guarded(ctx, backend: str, batch: int, length: int, ids, reference: dict) -> dict:
    """run_backend, its failure recorded (oom, unsupported, error), the state it left cleared."""
    torch = ctx["torch"]
    try:
        return run_backend(ctx, backend, batch, length, ids, reference)
    except Exception as error:  # noqa: BLE001 - record and go on with the next backend
        result = failure(torch, error)
        if result["status"] == "error":
            traceback.print_exc()
        return result
    finally:
        ctx["timings"].clear()
        ctx["layer0_call"].clear()
        ctx["model"].zero_grad(set_to_none=True)
        gc.collect()
        if ctx["cuda"]:
            if ctx["cupy_pool"] is not None:
                ctx["cupy_pool"].free_all_blocks()
            torch.cuda.empty_cache()


def host_attention(ctx, function, batch, length, result, reference, backend):
    """Host wall time of the attention function alone (layer 0's call as the model made it, on new
    q, k, v), and its output/grads against the reference's."""
    torch, model, args, config = ctx["torch"], ctx["model"], ctx["args"], ctx["config"]
    module = model.model.layers[0].self_attn
    if not ctx["layer0_call"]:
        raise RuntimeError("host_attention: no call of layer 0's attention was recorded")
    mask, kwargs = ctx["layer0_call"]["mask"], ctx["layer0_call"]["kwargs"]
    heads, heads_kv, dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    generator = torch.Generator(device=ctx["device"]).manual_seed(1234)

    def draw(h):
        return torch.randn(batch, h, length, dim, generator=generator, device=ctx["device"], dtype=ctx["dtype"])

    q, k, v = draw(heads), draw(heads_kv), draw(heads_kv)
    dout = torch.randn(batch, length, heads, dim, generator=generator, device=ctx["device"], dtype=ctx["dtype"])
    module.train()

    def call(query, key, value):
        return function(module, query, key, value, mask, **kwargs)[0]

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = call(qg, kg, vg)
    out.backward(dout)
    grads = [t.grad.detach() for t in (qg, kg, vg)]
    out = out.detach()
    if backend == ctx["family"].reference:
        reference["attn_out"], reference["attn_grads"] = out, grads
    if "attn_out" in reference:
        result["attn_max_abs_diff"] = (out.float() - reference["attn_out"].float()).abs().max().item()
        result["attn_grad_max_abs_diff"] = max((g.float() - r.float()).abs().max().item()
                                               for g, r in zip(grads, reference["attn_grads"]))
        result["attn_rel_diff"] = result["attn_max_abs_diff"] / max(
            reference["attn_out"].abs().max().float().item(), 1e-30)
        result["attn_grad_rel_diff"] = max(
            (g.float() - r.float()).abs().max().item() / max(r.abs().max().float().item(), 1e-30)
            for g, r in zip(grads, reference["attn_grads"]))
    del out, grads

    def host_times(call):
        times = []
        for _ in range(args.host_calls):
            ctx["clock"].sync()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e6)
        ctx["clock"].sync()
        return statistics.median(times)

    with torch.no_grad():
        result["host_us_fwd"] = host_times(lambda: call(q, k, v))

    def forward_backward():
        call(*(t.detach().requires_grad_() for t in (q, k, v))).backward(dout)

    result["host_us_fwd_bwd"] = host_times(forward_backward)


def kernel_families() -> list[str]:
    """The kernel families cuflash's cached plans launch (which forward and backward kernels the
    model's calls took: e.g. fwd_wgmma_ws, or fwd_wgmma where tensor maps could not describe the
    layout); empty on the CPU backend."""
    try:
        from cuflash._gpu import plan
    except ImportError:
        return []
    names = {getattr(launch.kernel, "name", "?") for entry in list(plan.PLANS.values())
             for launch in getattr(entry, "launches", ())}
    return sorted({name.split("<")[0].split("::")[-1] for name in names})


def max_abs_diff(a, b) -> float:
    """max |a - b| in float32, a slice of the sequence at a time (b may live on the host)."""
    worst = 0.0
    for begin in range(0, a.shape[1], 4096):
        part_a = a[:, begin:begin + 4096].float()
        part_b = b[:, begin:begin + 4096].to(a.device).float()
        worst = max(worst, (part_a - part_b).abs().max().item())
    return worst


def is_correct(result: dict, bounds: dict) -> bool:
    checks = [("rel_diff_logits", "logits"), ("loss_diff", "loss"), ("grad_rel_diff", "grad"),
              ("attn_rel_diff", "attn"), ("attn_grad_rel_diff", "attn_grad")]
    return all(result.get(key) is None or result[key] <= bounds[bound] for key, bound in checks)


def failure(torch, error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    note = " ".join(text)[:400]
    if isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in note.lower():
        status = "oom"
    elif isinstance(error, NotImplementedError) or "No available kernel" in note or "No viable backend" in note:
        status = "unsupported"
    else:
        status = "error"
    return {"status": status, "note": note}


# --- table -----------------------------------------------------------------------------------------


def format_tables(rows: list[dict], dtype_name: str, family, cuda: bool = True, compiled: str | None = None,
                  attention_mask: str = "none", no_cache: bool = False, flattened: bool = False) -> str:
    out = []
    for row in rows:
        results = row["results"]
        out += [f"### {row['shape']} (batch {row['batch']} x {row['seqlen']} tokens)", "",
                "| backend | step ms | prefill ms | tokens/s | attn ms/step (fwd+bwd) | host us/call fwd | "
                "host us/call fwd+bwd | peak GiB | first step s | logits diff | "
                + " | ".join(f"x vs {other}" for other in family.compare) + " |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(family.compare)]
        notes = []
        for name, result in results.items():
            if result.get("status") != "ok":
                out.append(f"| {name} | {result.get('status')} |" + " |" * (9 + len(family.compare)))
                notes.append(f"- {name}: {result.get('status')}: {result.get('note', '')}")
                continue
            step = result["step_ms"]

            def ratio(other):
                ok = other.get("status") == "ok" and other.get("step_ms")
                return f"{other['step_ms'] / step:.2f}" if ok else "-"

            attn = result.get("attention_ms_per_step")
            attn_cell = "-" if attn is None else (
                f"{attn:.1f} ({result['attention_fwd_ms']:.1f}+{cell(result.get('attention_bwd_ms'), '.1f')})")
            diff = cell(result.get("max_abs_diff_logits"), ".1e") + (" !" if result.get("correct") is False else "")
            label = f"{name} (other math)" if "computes" in result else name
            out.append(
                f"| {label} | {step:.1f} | {result['prefill_ms']:.1f} | {result['tokens_per_s']:,.0f} | {attn_cell} | "
                f"{cell(result.get('host_us_fwd'), '.0f')} | {cell(result.get('host_us_fwd_bwd'), '.0f')} | "
                f"{cell(result.get('peak_gib'), '.2f')} | {result['first_step_s']:.2f} | {diff} | "
                + " | ".join(ratio(results.get(other, {})) for other in family.compare) + " |")
            if "computes" in result:
                notes.append(f"- {name}: {result['computes']}")
            if result.get("correct") is False:
                notes.append(f"- {name}: differs from {family.reference} beyond the {dtype_name} bounds "
                             f"{BOUNDS[dtype_name]}: logits (rel) {result.get('rel_diff_logits')}, "
                             f"loss {result.get('loss_diff')}, q_proj grad (rel) {result.get('grad_rel_diff')}, "
                             f"attention (rel) {result.get('attn_rel_diff')} / its grads (rel) "
                             f"{result.get('attn_grad_rel_diff')}")
        out += ["", *notes, ""] if notes else [""]
    out += ["Training step = forward + LM loss + backward, no optimizer; median of "
            + ("CUDA-event timings. " if cuda else "perf_counter timings (CPU). ") +
            "Attn ms/step = GPU time in the attention calls of a step (forward+backward). "
            "Prefill = inference-mode forward, logits of the last token only. "
            "x vs ... = that backend's step time / this one's (> 1: this one is faster). "
            f"Logits diff = max |logits - {family.reference}'s| on the first step ('!' = a difference beyond a "
            "loose bound, see the notes and the JSON). "
            "Peak GiB includes CuPy's pool for cuflash."
            + (f" Compiled (torch.compile, backend {compiled}): steps, peak and prefill of the compiled model; "
               "the first step (eager) is the correctness check, the first compiled step's wall time is "
               "first_compiled_step_s in the JSON; attention and host time are eager measurements, not taken."
               if compiled else "")
            + (" Every step and prefill passes attention_mask = ones (as a data collator does for an unpadded "
               "batch)." if attention_mask == "ones" else "")
            + (" Training steps pass use_cache=False." if no_cache else "")
            + (" Padding-free (--flattened): each shape's B sequences are B documents of one row (position_ids "
               "restarting, cu_seq_lens and max_length keywords as DataCollatorWithFlattening gives them), "
               "use_cache=False." if flattened else "")]
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BATCHxTOKENS, e.g. 2x4096")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model (2 layers, hidden 64), float32; "
                        "default shapes 2x64 and 1x128: a smoke test")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                        help="the model: llama (default) or gemma2 (softcaps, sliding layers; see model_families.py)")
    parser.add_argument("--mha", action="store_true", help="16 key/value heads (no GQA)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (a divisor of the query heads: 16, or 4 with --tiny); "
                             "default 8 (tiny: 2), --mha: all")
    parser.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")], default=None,
                        help="comma-separated BATCHxTOKENS (default 2x4096,1x32768)")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=None,
                        help="comma-separated, the family's reference included. " + "; ".join(
                            f"{f.name}: default {','.join(f.backends)}, any of {','.join(f.allowed)}"
                            for f in FAMILIES.values()))
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn-steps", type=int, default=3, help="instrumented steps for attention time")
    parser.add_argument("--host-calls", type=int, default=30, help="calls for the host-time medians")
    parser.add_argument("--compile", action="store_true",
                        help="time the model compiled (torch.compile of the whole model): training steps, peak and "
                             "prefill; the first step stays eager (the correctness check), attention time and host "
                             "time are not measured (their instruments are eager)")
    parser.add_argument("--attention-mask", choices=("none", "ones"), default="none",
                        help="what the steps pass as attention_mask: none, or a mask of ones as a data collator "
                             "gives an unpadded batch (transformers then builds a full causal mask inside "
                             "torch.compile; eager calls skip it)")
    parser.add_argument("--no-cache", action="store_true",
                        help="training steps call the model with use_cache=False, as training scripts do (inside "
                             "torch.compile transformers then adds its packed-sequence test of position_ids to the "
                             "mask, which it cannot skip there)")
    parser.add_argument("--flattened", action="store_true",
                        help="padding-free training: each shape's B sequences are documents of one row, as "
                             "DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them (position_ids "
                             "restarting, cu_seq_lens and max_length keywords), use_cache=False (SDPA's model then "
                             "masks the documents from position_ids; cuflash reads cu_seq_lens)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend with --compile (default inductor; aot_eager for a quick check)")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = [(2, 64), (1, 128)] if args.tiny else [(2, 4096), (1, 32768)]
    family = FAMILIES[args.family]
    args.backends = args.backends or list(family.backends)
    unknown = set(args.backends) - set(family.allowed)
    if unknown or family.reference not in args.backends:
        parser.error(f"--backends: {sorted(unknown)} not among {args.family}'s {','.join(family.allowed)}" if unknown
                     else f"--backends must include {family.reference} ({args.family}'s correctness reference)")
    # The reference first: the correctness checks compare against it.
    args.backends = [family.reference] + [b for b in args.backends if b != family.reference]
    args.steps, args.attn_steps, args.host_calls = max(1, args.steps), max(1, args.attn_steps), max(1, args.host_calls)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import torch
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash.hf as hf

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_model: --device cuda but torch sees no CUDA device (use --device cpu --tiny)")
    dtype = torch.float32 if args.tiny or not cuda else torch.bfloat16
    dtype_name = "fp32" if dtype == torch.float32 else "bf16"
    cupy_pool = None
    if cuda:
        try:
            import cupy

            cupy_pool = cupy.get_default_memory_pool()
        except Exception:  # noqa: BLE001 - then cuflash itself will fail and say why
            cupy_pool = None

    family = FAMILIES[args.family]
    config = model_config(args)
    model = build_model(torch, transformers, family, config, dtype, args.device)
    clock = Clock(torch, cuda)
    timings: list = []
    layer0_call: dict = {}
    backends = attention_backends(hf, model, hf.register())
    register_timed(transformers, backends, model.model.layers[0].self_attn, layer0_call, timings, clock, torch)

    def kernel_context(backend):
        if backend in SDPA_PINNED:
            return sdpa_kernel([getattr(SDPBackend, SDPA_PINNED[backend])])
        import contextlib

        return contextlib.nullcontext()

    ctx = dict(torch=torch, model=model, compile=args.compile_backend if args.compile else None, clock=clock,
               args=args, hf=hf, family=family, backends=backends,
               kernel_context=kernel_context, timings=timings, layer0_call=layer0_call,
               cuda=cuda, cupy_pool=cupy_pool, config=config, device=args.device, dtype=dtype,
               bounds=BOUNDS[dtype_name])
    env = collect_environment(torch, args.device)
    record = {"sweep": "model", **env, "dtype": dtype_name, "family": family.name,
              "config_class": family.config_class, "model_config": config, "reference": family.reference,
              "other_math": {name: note for name, note in family.other_math.items() if name in args.backends},
              "backends": args.backends, "steps": args.steps, "warmup": args.warmup,
              "attn_steps": args.attn_steps, "host_calls": args.host_calls,
              "compile": args.compile_backend if args.compile else None,
              "attention_mask": args.attention_mask, "use_cache_in_steps": not (args.no_cache or args.flattened),
              "flattened": args.flattened,
              "train_step": "forward + LM loss (labels = inputs) + backward; zero_grad, no optimizer",
              "prefill": "inference_mode forward, eval, use_cache=False, logits_to_keep=1",
              "rows": []}
    path = records.record_path(args.out_dir, record["date_utc"], record["device"], "model")
    print(f"[model] {record['device']} torch {env['torch']} transformers {env['transformers']} "
          f"cuflash {env['cuflash']} {dtype_name} {family.name} {config}", file=sys.stderr, flush=True)

    def save():
        record["table"] = format_tables(record["rows"], dtype_name, family, cuda, record["compile"],
                                        args.attention_mask, args.no_cache, args.flattened)
        records.write(record, path)

    def rows():
        for batch, length in args.shapes:
            ids = token_ids(torch, config, batch, length, args.device)
            row = {"shape": f"{batch}x{length}", "batch": batch, "seqlen": length, "results": {}}
            record["rows"].append(row)
            # Start-up (CUDA context, cuBLAS, allocator) on no backend's account.
            model.set_attn_implementation("sdpa")
            model.train()
            try:
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids).loss.backward()
                clock.sync()
            except Exception as error:  # noqa: BLE001 - the backends will report it too
                print(f"[model] warm-up failed: {error}", file=sys.stderr)
            reference: dict = {}
            for backend in args.backends:
                print(f"[model] {row['shape']} {backend}", file=sys.stderr, flush=True)
                if backend in family.cuda_only and not cuda:
                    result = {"status": "skipped", "note": family.cuda_only[backend]}
                else:
                    result = run_guarded(ctx, backend, batch, length, ids, reference)
                row["results"][backend] = result
                records.log_result("model", row["shape"], backend, result)
                save()
            reference.clear()

    return records.run_rows(record, path, save, rows)

if __name__ == "__main__":
    main()
