"""cuflash's GPU host path on a machine without a GPU: CuPy arrays over made-up device addresses,
every CUDA runtime/driver call the path makes replaced by a stand-in (an allocation is a fresh
address, a kernel a dummy handle, a tensor map its address and layout in 128 bytes, a launch
recorded with the bytes of the params it was given).
Planning, the params structs, kept plans and their replays run as on a GPU; nothing is computed.

Run as a script (``python tests/fake_gpu.py``, what test_host_path.py does, in a process of its
own: the stand-ins replace module attributes of CuPy and cuflash for good) it checks that calls
with score modifiers, a bias, a 2-D mask and dropout, dense and packed, plan once and then replay, each launch
carrying its own call's dropout seed; that a replay on new arrays launches exactly what the full
path launches for them (dense, packed and kv-cache calls, the Hopper kernels' tensor maps
included: ``_check_replays_launch_as_planned``); that every dtype's calls with each option plan
once and replay; that kept plans refuse a foreign dropout seed before launching; or, with
``--torch``, that cuflash.torch's training path and kv-cache decoding loop do (``install_torch``:
CPU tensors standing for CUDA ones). Host-time harnesses may ``install()`` it too.
"""
from __future__ import annotations

import collections
import ctypes
import sys
import types

import numpy

LAUNCHES: list = []  # Launch records, in launch order
FULL_PATHS = {"forward": 0, "backward": 0, "kvcache": 0}  # the full paths' calls: plan.forward, plan.backward,
# _kvcache._attention_with_kvcache


# One launch: the function handle (one per kernel spec), the launch's shape (grid, block, shared
# bytes, stream), the params bytes (the whole argument buffer; None for a helper kernel) and a
# helper kernel's scalars (None for the others).
Launch = collections.namedtuple("Launch", "function shape params scalars")


# Device addresses: arrays count up from 2^40; a plan's own device tables (plan_constant) from
# 2^44, apart from the call that planned them (``_launched``: what a call allocates).
_NEXT_ADDRESS = [1 << 40]
_NEXT_CONSTANT = [1 << 44]
_CALL_ALLOCATIONS: list = []  # (address, size) of the allocations since ``_launched`` began a call
_CONSTANTS: list = []  # (address, size, the content's index in _CONTENTS) of each plan_constant upload
_CONTENTS: dict = {}  # an uploaded table's bytes (with its dtype and shape) -> its index


def install(compute_capability: str = "90", sms: int = 132):
    """Replace CuPy's and cuflash's device calls with stand-ins; returns ``array(shape, dtype)``,
    a maker of CuPy arrays over made-up addresses (C order)."""
    import cupy
    from cupy_backends.cuda.api import driver

    from cuflash._gpu import decode, kernels, launch_args, plan, tma

    args = launch_args.ARGS

    def launch(function, *rest):
        argv = rest[8]  # (grid x, y, z, block x, y, z, shared bytes, stream, argv, extra)
        helper = argv == args.slots_argv_ptr
        LAUNCHES.append(Launch(function, rest[:8], None if helper else bytes(args.bytes),
                               bytes(args.slots) if helper else None))

    driver.launchKernel = launch
    driver.occupancyMaxActiveBlocksPerMultiprocessor = lambda *a: 2
    driver.funcSetAttribute = lambda *a: None
    stream = types.SimpleNamespace(ptr=0, is_capturing=lambda: False)
    cupy.cuda.get_current_stream = lambda *a: stream
    cupy.cuda.runtime.getDevice = lambda: 0
    cupy.cuda.runtime.setDevice = lambda i: None
    cupy.cuda.runtime.streamIsCapturing = lambda stream: False

    def alloc(size, counter=_NEXT_ADDRESS):
        address = counter[0]
        counter[0] += (size + 255) // 256 * 256
        if counter is _NEXT_ADDRESS:
            _CALL_ALLOCATIONS.append((address, size))
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(address, size, None, 0), 0)

    cupy.cuda.alloc = alloc
    cupy.cuda.set_allocator(alloc)

    class Device:
        def __init__(self, index=0):
            self.id, self.compute_capability = 0, compute_capability

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cupy.cuda.Device = Device
    handles = {}

    def get_kernel(spec, device=None):  # (helper kernels pass no device)
        if spec not in handles:
            handles[spec] = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=len(handles) + 1))
        return handles[spec]

    kernels.get_kernel = get_kernel
    kernels.device_attribute = lambda name: sms
    plan._device_attribute = lambda name: sms
    tma._library = lambda: _FakeTensorMaps  # (libcuda's two tensor-map calls: the TMA Variants are planned)
    plan.CupyMemory.copy = staticmethod(lambda target, source: None)  # device copies
    decode._rows_into = lambda cupy, target, x, lead: None  # (the decode kernel's per-row slopes and sinks: a copy)
    plan._per_row = lambda x, lead_shape, dtype: array((int(numpy.prod(lead_shape)),), dtype)
    def plan_constant(host):  # (a plan's device table: an upload, remembered by its content)
        uploaded = array(host.shape, host.dtype, _NEXT_CONSTANT)
        content = (host.dtype.str, host.shape, host.tobytes())
        _CONSTANTS.append((uploaded.data.ptr, max(1, host.nbytes), _CONTENTS.setdefault(content, len(_CONTENTS))))
        return uploaded

    plan.plan_constant = plan_constant
    cupy.zeros = lambda shape, dtype=float, order="C": array(shape if isinstance(shape, tuple) else (shape,), dtype)
    from cuflash import _kvcache

    for module, function, name in ((plan, "forward", "forward"), (plan, "backward", "backward"),
                                   (_kvcache, "_attention_with_kvcache", "kvcache")):
        real = getattr(module, function)

        def counted(*a, _real=real, _name=name, **k):
            FULL_PATHS[_name] += 1
            return _real(*a, **k)

        setattr(module, function, counted)

    def array(shape, dtype, counter=_NEXT_ADDRESS):
        dtype = numpy.dtype(dtype)
        size = max(1, int(numpy.prod(shape)) * dtype.itemsize)
        return cupy.ndarray(shape, dtype, alloc(size, counter))

    return array


class _FakeTensorMaps:
    """libcuda's cuTensorMapEncodeTiled and cuTensorMapReplaceAddress: a map's first 8 bytes hold
    its device address (so a launch's record shows which tensor each map points at), the rest its
    layout (data type, rank, dimensions, strides, box, swizzle)."""

    @staticmethod
    def cuTensorMapEncodeTiled(out, dtype, rank, address, dims, strides, box, steps, interleave, swizzle, l2, fill):
        words = (ctypes.c_uint64 * 16).from_address(out)
        words[0] = address.value
        words[1] = dtype | rank << 8 | swizzle << 16 | l2 << 24 | fill << 32
        for i in range(rank):
            words[2 + i], words[7 + i] = dims[i], box[i]
            if i < rank - 1:
                words[12 + i] = strides[i]
        return 0

    @staticmethod
    def cuTensorMapReplaceAddress(map_address, address):  # (the map's host address: a c_void_p or an int)
        ctypes.c_uint64.from_address(getattr(map_address, "value", map_address)).value = address.value
        return 0


def install_torch():
    """After ``install()``: CPU tensors stand for CUDA ones in cuflash.torch (``is_cuda`` true for
    every tensor, device 0 current, torch's stream 0), their memory seen by CuPy at its addresses;
    a result handed back to torch is a fresh zero tensor (nothing was computed). Plans run on
    torch's memory (the adapter's allocations are CPU tensors). Returns the torch module."""
    import contextlib

    import ml_dtypes
    import torch

    import cuflash.torch as ct

    torch.Tensor.is_cuda = property(lambda self: True)
    torch.cuda.current_device = lambda: 0
    ct._current_raw_stream = lambda index: 0
    ct._running_on = lambda tensor: contextlib.nullcontext()
    numpy_dtypes = {torch.float16: numpy.dtype(numpy.float16), torch.bfloat16: numpy.dtype(ml_dtypes.bfloat16),
                    torch.float32: numpy.dtype(numpy.float32), torch.float64: numpy.dtype(numpy.float64),
                    torch.int32: numpy.dtype(numpy.int32)}
    torch_dtypes = {value: key for key, value in numpy_dtypes.items()}
    ct._to_cuflash = lambda tensor, axes=None: ct._cupy_view(tensor, numpy_dtypes[tensor.dtype], 0, axes)
    ct._to_torch = lambda array: torch.zeros(array.shape, dtype=torch_dtypes[numpy.dtype(array.dtype)])
    return torch


def _planned_since(before, kinds=("forward", "backward")):
    """The full paths' calls of ``kinds`` since ``before`` (a copy of FULL_PATHS)."""
    return {kind: FULL_PATHS[kind] - before[kind] for kind in kinds}


def _launched(call):
    """``call()``'s launches, the argument buffers poisoned first, each address inside an
    allocation of the call written as (that allocation's size, the offset into it): two calls that
    launch alike record equal launches (kernels, shapes, argument bytes, where in their own
    buffers they point), whatever ran before them and in whichever order each allocated."""
    from cuflash._gpu import launch_args

    launch_args.ARGS.bytes[:] = 0xA5
    launch_args.ARGS.slots[:] = -0x5A5A5A5A5A5A5A5B
    LAUNCHES.clear()
    _CALL_ALLOCATIONS.clear()
    call()
    launched = [launch._replace(params=_relative(launch.params), scalars=_relative(launch.scalars))
                for launch in LAUNCHES]
    LAUNCHES.clear()
    return launched


def _relative(raw):
    """``raw`` bytes with each 8-byte word that points into one of the call's allocations written
    as (its size, the offset), and one into a plan's uploaded table as (its content, the offset):
    a tag bit, the size or the content's index from bit 28 up, the offset below."""
    if raw is None:
        return None
    words = numpy.frombuffer(raw, numpy.uint64).copy()
    for tag, regions in ((1 << 63, [(address, size, size) for address, size in _CALL_ALLOCATIONS]),
                         (1 << 62, _CONSTANTS)):
        for address, size, name in regions:
            inside = (words >= address) & (words < address + size)
            words[inside] = numpy.uint64(tag) | numpy.uint64(name << 28) | (words[inside] - numpy.uint64(address))
    return words.tobytes()


def _check_replays_launch_as_planned(name, call, kinds, make_inputs):
    """``call(inputs)`` plans on a first set of arrays (each of ``kinds``' full paths runs once);
    on a second set of the same signature it replays (no full path); with the kept plans then
    forgotten, the full path on that second set launches exactly what the replay did: kernels,
    shapes, argument bytes, tensor maps and pointers re-pointed at the new arrays, outputs."""
    from cuflash import _kvcache
    from cuflash._gpu import plan

    before = dict(FULL_PATHS)
    planned = _launched(lambda: call(make_inputs()))
    assert _planned_since(before, kinds) == dict.fromkeys(kinds, 1), f"{name}: the first call did not plan"
    assert planned, f"{name}: nothing launched"
    inputs = make_inputs()
    before = dict(FULL_PATHS)
    replayed = _launched(lambda: call(inputs))
    assert _planned_since(before, kinds) == dict.fromkeys(kinds, 0), f"{name}: the second call planned again"
    for kept in (plan.PLANS, plan.FAMILIES, _kvcache._KNOWN):
        kept.clear()
    before = dict(FULL_PATHS)
    fresh = _launched(lambda: call(inputs))
    assert _planned_since(before, kinds) == dict.fromkeys(kinds, 1), f"{name}: the forgotten plans were kept"
    assert len(replayed) == len(fresh), f"{name}: {len(fresh)} launches planned, {len(replayed)} replayed"
    for i, (a, b) in enumerate(zip(fresh, replayed)):
        assert a == b, f"{name}: launch {i} of {len(fresh)} differs between the replay and the full path"
    print(f"ok {name}")


def _params(kind):
    """The dropout fields of each params launch recorded since the last call of this: (seed,
    threshold) per launch, of the forward struct (a backward struct's ``fwd``)."""
    from cuflash._gpu import params

    dtype = params.BWD_PARAMS_DTYPE if kind == "backward" else params.FWD_PARAMS_DTYPE
    fields = []
    for launch in LAUNCHES:
        raw = launch.params
        if raw is not None:
            struct = numpy.frombuffer(raw[:dtype.itemsize], dtype)[0]
            fwd = struct["fwd"] if kind == "backward" else struct
            fields.append((int(fwd["dropout_seed"]), int(fwd["dropout_threshold"])))
    LAUNCHES.clear()
    return fields


def _check_calls(name, forward, backward, seeds):
    """Three calls with seeds ``seeds``: the first plans (the full path), the others replay; every
    params launch carries its call's seed (and one threshold throughout)."""
    thresholds = set()
    for i, seed in enumerate(seeds):
        before = dict(FULL_PATHS)
        out, lse = forward(seed)
        launched = _params("forward")
        if backward is not None:
            backward(seed, out, lse)
        grads_launched = _params("backward") if backward is not None else []
        planned = _planned_since(before)
        expected = {"forward": int(i == 0), "backward": int(i == 0 and backward is not None)}
        assert planned == expected, f"{name} call {i}: full paths {planned}, expected {expected}"
        assert launched and (backward is None or grads_launched), f"{name} call {i}: no launch"
        for seed_launched, threshold in launched + grads_launched:
            assert seed_launched == (seed or 0), f"{name} call {i}: launched with seed {seed_launched}, not {seed}"
            thresholds.add(threshold)
    assert len(thresholds) == 1 and (0 in thresholds) == (seeds[0] is None), f"{name}: thresholds {thresholds}"
    print(f"ok {name}")


def _sweep(array):
    """Every dtype x {plain, causal, window, softcap, ALiBi, dropout (, fp32's precisions)} x both
    backward modes, dense (GQA, Lq 97 and Lq 3 (the decode kernel's route), Lk 1025) and packed (five sequences, one empty, the (B, Hq)
    slopes), d 40 (rows the kernels read in place: a copy would be GPU work): a call plans (or
    replays an earlier call's plan), its second run replays both directions without planning."""
    import ml_dtypes

    import cuflash

    lengths = [0, 97, 300, 1, 200]
    cu = array((len(lengths) + 1,), numpy.int32)
    total = sum(lengths)
    count = 0
    for dtype in (numpy.float16, ml_dtypes.bfloat16, numpy.float32, numpy.float64):
        q, k, v, dout = (array(shape, dtype) for shape in ((2, 4, 97, 40), (2, 2, 1025, 40), (2, 2, 1025, 40),
                                                           (2, 4, 97, 40)))
        q_few, dout_few = array((2, 4, 3, 40), dtype), array((2, 4, 3, 40), dtype)
        pq, pk, pv, pdout = (array(shape, dtype) for shape in ((total, 4, 40), (total, 2, 40), (total, 2, 40),
                                                               (total, 4, 40)))
        param = numpy.float64 if dtype == numpy.float64 else numpy.float32
        cases = [{}, dict(causal=True), dict(window=(50, 10)), dict(softcap=10.0),
                 dict(alibi_slopes=array((4,), param), causal="top_left"), dict(dropout_p=0.1, dropout_seed=3)]
        if dtype == numpy.float32:
            cases += [dict(precision="ieee"), dict(precision="tf32", causal=True)]
        packed_cases = cases + [dict(alibi_slopes=array((len(lengths), 4), param), causal=True)]
        calls = [("dense", options, lambda d, o: cuflash.attention(q, k, v, return_lse=True, **o),
                  lambda d, o, out, lse: cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=d, **o))
                 for options in cases]
        # A few query rows per kv head: 16-bit forwards take the decode kernel (decode.dense_reason)
        calls += [("dense few rows", options, lambda d, o: cuflash.attention(q_few, k, v, return_lse=True, **o),
                   lambda d, o, out, lse: cuflash.attention_backward(dout_few, q_few, k, v, out, lse, deterministic=d,
                                                                     **o))
                  for options in cases]
        hints = dict(max_seqlen_q=300, max_seqlen_k=300)
        calls += [("packed", options,
                   lambda d, o: cuflash.attention_varlen(pq, pk, pv, cu, cu, return_lse=True, **hints, **o),
                   lambda d, o, out, lse: cuflash.attention_varlen_backward(pdout, pq, pk, pv, out, lse, cu, cu,
                                                                            deterministic=d, **hints, **o))
                  for options in packed_cases]
        for layout, options, forward, backward in calls:
            for deterministic in (False, True):
                for run in range(2):
                    before = dict(FULL_PATHS)
                    out, lse = forward(deterministic, options)
                    backward(deterministic, options, out, lse)
                    spelled = {key: f"array{value.shape}" if hasattr(value, "shape") else value
                               for key, value in options.items()}  # (an array's repr would read the device)
                    name = f"{layout} {numpy.dtype(dtype).name} {spelled} deterministic={deterministic}"
                    assert LAUNCHES, f"{name}: nothing launched"
                    LAUNCHES.clear()
                    planned = _planned_since(before)
                    assert run == 0 or planned == {"forward": 0, "backward": 0}, f"{name}: planned again {planned}"
                count += 1
    print(f"ok sweep of {count} signatures")


def _check_torch_calls(name, torch, call, seeds):
    """Three training steps' attention (``call()`` runs forward and backward, the seed drawn from
    torch's generator after ``torch.manual_seed(seed)``): the first plans, the next replay (the
    backward through the forward plan's followers on the third); the forward's and the backward's
    launches carry the seed that step drew."""
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what the adapter draws (_dropout_arguments)
        torch.manual_seed(seed)
        before = dict(FULL_PATHS)
        LAUNCHES.clear()
        forward_launched = call(lambda: _params("forward"))
        backward_launched = _params("backward")
        planned = _planned_since(before)
        expected = {"forward": int(i == 0), "backward": int(i == 0)}
        assert planned == expected, f"{name} step {i}: full paths {planned}, expected {expected}"
        assert forward_launched and backward_launched, f"{name} step {i}: nothing launched"
        for launched, _ in forward_launched + backward_launched:
            assert launched == drawn, f"{name} step {i}: launched with seed {launched}, the step drew {drawn}"
    print(f"ok {name}")


def _torch_scenarios(torch):
    """cuflash.torch's training path: dense attention with softcap, ALiBi and dropout (autograd
    Function, kept plans on torch's memory, backward followers) and flash_attn_varlen_func with the
    same (the packed kept plans)."""
    import cuflash.torch as ct

    def leaf(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16, requires_grad=True)

    q, k, v, dout = leaf(2, 4, 300, 64), leaf(2, 2, 500, 64), leaf(2, 2, 500, 64), torch.zeros(2, 4, 300, 64,
                                                                                             dtype=torch.bfloat16)
    slopes = torch.rand(4)

    def dense(forward_params):
        out = ct.attention(q, k, v, causal=True, softcap=20.0, alibi_slopes=slopes, dropout_p=0.1)
        launched = forward_params()
        torch.autograd.grad(out, (q, k, v), dout)
        return launched

    _check_torch_calls("torch attention softcap + ALiBi + dropout", torch, dense, [11, 12, 13])
    lengths = [0, 97, 300, 1, 200]
    cu = torch.tensor(numpy.concatenate([[0], numpy.cumsum(lengths)]), dtype=torch.int32)
    total = int(cu[-1])
    pq, pk, pv, pdout = leaf(total, 4, 64), leaf(total, 2, 64), leaf(total, 2, 64), torch.zeros(total, 4, 64,
                                                                                               dtype=torch.bfloat16)
    per_sequence = torch.rand(len(lengths), 4)

    def packed(forward_params):
        out = ct.flash_attn_varlen_func(pq, pk, pv, cu, cu, 300, 300, dropout_p=0.1, causal=True, softcap=20.0,
                                        alibi_slopes=per_sequence)
        launched = forward_params()
        torch.autograd.grad(out, (pq, pk, pv), pdout)
        return launched

    _check_torch_calls("torch flash_attn_varlen_func softcap + ALiBi + dropout", torch, packed, [21, 22, 23])

    # A few query rows per kv head (a decoding step without a cache object): the forward runs on the
    # decode kernel (a DenseDecodePlan on torch's memory, kept from the calls without grad for those
    # with), the backward on the backward kernels.
    q_few, dout_few = leaf(2, 4, 3, 64), torch.zeros(2, 4, 3, 64, dtype=torch.bfloat16)
    for grad in (False, True):
        for step in range(3):
            before = dict(FULL_PATHS)
            LAUNCHES.clear()
            with torch.set_grad_enabled(grad):
                out = ct.attention(q_few, k, v, causal=True, alibi_slopes=slopes)
            if grad:
                torch.autograd.grad(out, (q_few, k, v), dout_few)
            planned = _planned_since(before)
            expected = {"forward": int(step == 0 and not grad), "backward": int(step == 0 and grad)}
            assert planned == expected, f"torch few rows grad={grad} step {step}: full paths {planned}"
            assert LAUNCHES, f"torch few rows grad={grad} step {step}: nothing launched"
    print("ok torch attention, a few query rows (decode kernel)")

    # flash_attn_with_kvcache's decoding loop (flash-attn's (B, L, H, D) layouts): contiguous with
    # the new key appended, paged with a block table; the first step takes the full path, the
    # next replay the known signature, launching as many kernels.
    def half(*shape):
        return torch.zeros(*shape, dtype=torch.float16)

    lengths = torch.full((2,), 300, dtype=torch.int32)
    table = torch.zeros(2, 10, dtype=torch.int32)
    steps = {"contiguous, appended": dict(k_cache=half(2, 600, 2, 64), v_cache=half(2, 600, 2, 64),
                                          k=half(2, 1, 2, 64), v=half(2, 1, 2, 64)),
             "paged": dict(k_cache=half(20, 64, 2, 64), v_cache=half(20, 64, 2, 64), block_table=table)}
    for label, arguments in steps.items():
        counts = []
        for step in range(3):
            before = dict(FULL_PATHS)
            LAUNCHES.clear()
            ct.flash_attn_with_kvcache(half(2, 1, 8, 64), cache_seqlens=lengths, causal=True, **arguments)
            planned = _planned_since(before, ("kvcache",))
            assert planned == {"kvcache": int(step == 0)}, f"torch kv cache {label} step {step}: full paths {planned}"
            counts.append(len(LAUNCHES))
        assert counts[0] and len(set(counts)) == 1, f"torch kv cache {label}: launches per step {counts}"
    print("ok torch flash_attn_with_kvcache, contiguous and paged")


def _dense_replays(array):
    """Dense and packed calls, forward and backward, each in a signature of its own: a replay on
    new arrays launches what the full path launches for them (kept plans, the backward's
    included; the TMA Variants' maps re-pointed)."""
    import cuflash

    half = numpy.float16
    # (sizes of their own: D 48, Dv 40, Lq != Lk; where two allocations share a size their
    # order is not checked)
    shapes = dict(q=(2, 6, 130, 48), k=(2, 3, 260, 48), v=(2, 3, 260, 40), dout=(2, 6, 130, 40))

    def dense_inputs():
        inputs = {name: array(shape, half) for name, shape in shapes.items()}
        inputs.update(bias=array((1, 6, 130, 260), numpy.float32), mask=array((2, 1, 130, 260), numpy.bool_),
                      slopes=array((6,), numpy.float32))
        return inputs

    dense = {"causal": lambda x: dict(causal=True),
             "softcap + ALiBi, window": lambda x: dict(softcap=15.0, alibi_slopes=x["slopes"], window=(70, 5)),
             "bias + 2-D mask + dropout": lambda x: dict(bias=x["bias"], mask=x["mask"], dropout_p=0.2,
                                                         dropout_seed=77),
             "top-left causal, deterministic": lambda x: dict(causal="top_left", deterministic=True)}
    for label, options_of in dense.items():
        def call(x, options_of=options_of):
            options = options_of(x)
            deterministic = options.pop("deterministic", False)
            out, lse = cuflash.attention(x["q"], x["k"], x["v"], return_lse=True, **options)
            return cuflash.attention_backward(x["dout"], x["q"], x["k"], x["v"], out, lse,
                                              deterministic=deterministic, **options)

        _check_replays_launch_as_planned(f"replay dense {label}", call, ("forward", "backward"), dense_inputs)
    lengths = [5, 0, 130, 64]
    total = sum(lengths)
    hints = dict(max_seqlen_q=130, max_seqlen_k=130, causal=True, softcap=9.0)

    def packed_inputs():
        return [array((total, heads, width), half) for heads, width in ((6, 48), (3, 48), (3, 40), (6, 40))] + [
            array((len(lengths) + 1,), numpy.int32)]

    def packed(x):
        pq, pk, pv, pdout, cu = x
        out, lse = cuflash.attention_varlen(pq, pk, pv, cu, cu, return_lse=True, **hints)
        return cuflash.attention_varlen_backward(pdout, pq, pk, pv, out, lse, cu, cu, **hints)

    _check_replays_launch_as_planned("replay packed causal softcap", packed, ("forward", "backward"), packed_inputs)


def _check_kept_plans_refuse_foreign_seeds(array):
    """Every plan the sweep kept for a dense call refuses a replay with a seed it was not made for,
    or without the seed it was made for (the decode kernel's dense plans included: cbf05e1),
    before any launch."""
    from cuflash._gpu import plan

    kinds = set()
    stand_in = array((1,), numpy.float16)  # (the inputs' addresses are all a refused replay reads)
    for key, kept in list(plan.PLANS.items()):
        if key[0] not in ("attention", "attention_backward"):
            continue
        dropping = getattr(kept, "seed_word", None) is not None
        inputs = (stand_in,) * (6 if key[0] == "attention_backward" else 3)
        LAUNCHES.clear()
        try:
            kept.run(plan.CUPY_MEMORY, *inputs, dropout_seed=None if dropping else 5)
        except RuntimeError as error:
            assert "dropout seed it was" in str(error), f"{type(kept).__name__}: {error}"
        else:
            raise AssertionError(f"{type(kept).__name__} replayed with a foreign seed")
        assert not LAUNCHES, f"{type(kept).__name__} {key[1]}: a refused replay launched {LAUNCHES[0][:2]}"
        kinds.add(type(kept).__name__)
    assert {"ForwardPlan", "BackwardPlan", "DenseDecodePlan"} <= kinds, kinds
    print(f"ok kept plans refuse foreign seeds ({', '.join(sorted(kinds))})")


def _kvcache_calls(array):
    """attention_with_kvcache's decode-kernel route (contiguous and paged caches, lengths on the
    device or an int, new keys appended, GQA, the score modifiers, a window, few query rows, lse,
    forced splits): a signature's first call takes the full path, a call on new arrays the known
    signature's replay, launching what the full path would; a float32 call (the composition of
    dense calls) launches; a known signature's call with a new int length replays."""
    import cuflash

    half = numpy.float16
    batch, heads_q, heads_k, capacity, dim = 3, 8, 2, 700, 64
    q1, q4 = array((batch, heads_q, 1, dim), half), array((batch, heads_q, 4, dim), half)
    k_cache, v_cache = (array((batch, heads_k, capacity, dim), half) for _ in range(2))
    pages, page = 24, 64
    k_pages, v_pages = (array((pages, heads_k, page, dim), half) for _ in range(2))
    table = array((batch, -(-capacity // page)), numpy.int32)
    lengths = array((batch,), numpy.int32)
    k_new, v_new = (array((batch, heads_k, 1, dim), half) for _ in range(2))
    slopes, sinks = array((heads_q,), numpy.float32), array((heads_q,), numpy.float32)
    cases = {
        "contiguous, device lengths": dict(q=q1, cache_seqlens=lengths),
        "contiguous, int length, causal": dict(q=q1, cache_seqlens=500, causal=True),
        "contiguous, appended keys, lse": dict(q=q1, k=k_new, v=v_new, cache_seqlens=lengths, return_lse=True),
        "paged, device lengths, 4 rows, causal": dict(q=q4, cache_seqlens=lengths, block_table=table, causal=True),
        "paged, appended keys, 5 splits": dict(q=q1, k=k_new, v=v_new, cache_seqlens=lengths, block_table=table,
                                               num_splits=5),
        "contiguous, softcap + ALiBi + sinks + window": dict(q=q4, cache_seqlens=lengths, softcap=30.0,
                                                             alibi_slopes=slopes, sinks=sinks, window=(100, 0)),
    }
    def fresh(x):  # a new array of x's shape and dtype (None stays None)
        return x if x is None or not hasattr(x, "shape") else array(x.shape, x.dtype)

    for label, options in cases.items():
        paged = "block_table" in options
        given = dict(options, k_cache=k_pages if paged else k_cache, v_cache=v_pages if paged else v_cache)
        _check_replays_launch_as_planned(f"kv cache {label}", lambda x: cuflash.attention_with_kvcache(**x),
                                         ("kvcache",), lambda given=given: {name: fresh(x) for name, x in given.items()})
    for length in (299, 300, 301, 699):  # a decoding loop's growing int length: the signature's replays
        before = dict(FULL_PATHS)
        cuflash.attention_with_kvcache(q1, k_cache, v_cache, cache_seqlens=length, causal=True)
        assert LAUNCHES, f"kv cache int length {length}: nothing launched"
        LAUNCHES.clear()
        planned = _planned_since(before, ("kvcache",))
        assert planned == {"kvcache": int(length == 299)}, f"kv cache int length {length}: full paths {planned}"
    print("ok kv cache, a known signature's new int lengths")
    single = numpy.float32  # not the decode kernel's: dense calls over the cache (int length, contiguous)
    q_single, k_single, v_single = array((batch, heads_q, 1, dim), single), *(
        array((batch, heads_k, capacity, dim), single) for _ in range(2))
    for _ in range(2):
        cuflash.attention_with_kvcache(q_single, k_single, v_single, cache_seqlens=400, causal=True)
        assert LAUNCHES, "kv cache float32: nothing launched"
        LAUNCHES.clear()
    print("ok kv cache float32 (dense calls)")


def main():
    array = install()
    if "--torch" in sys.argv[1:]:  # (the torch adapter's scenarios alone)
        _torch_scenarios(install_torch())
        return 0
    import cuflash

    rng = numpy.random.default_rng()
    seeds = [int(s) for s in rng.integers(0, 2**63, 3, dtype=numpy.int64)]
    seeds[1] |= 1 << 63  # (a seed's high bit reaches the kernels too)
    half = numpy.float16

    q, k, v, dout = array((2, 4, 300, 64), half), array((2, 2, 500, 64), half), array((2, 2, 500, 64), half), \
        array((2, 4, 300, 64), half)
    slopes, sinks = array((4,), numpy.float32), array((4,), numpy.float32)
    for label, options in (("dense dropout", dict(causal=True)),
                           ("dense softcap + ALiBi + dropout", dict(causal=True, softcap=20.0, alibi_slopes=slopes))):
        _check_calls(label,
                     lambda seed, o=options: cuflash.attention(q, k, v, return_lse=True, dropout_p=0.1,
                                                               dropout_seed=seed, **o),
                     lambda seed, out, lse, o=options: cuflash.attention_backward(
                         dout, q, k, v, out, lse, dropout_p=0.1, dropout_seed=seed, **o),
                     seeds)
    _check_calls("dense sinks (forward)",
                 lambda seed: cuflash.attention(q, k, v, return_lse=True, sinks=sinks, causal=True), None, [None] * 3)
    # A bias shared over the batch (its gradient summed over it) and a 2-D mask shared by the heads
    # (its tile spans made on the device each call: plan.ScoreInputs)
    bias, mask = array((1, 4, 300, 500), numpy.float32), array((2, 1, 300, 500), numpy.bool_)
    for label, options in (("dense bias", dict(bias=bias)), ("dense 2-D mask", dict(mask=mask)),
                           ("dense bias + 2-D mask + dropout", dict(bias=bias, mask=mask, dropout_p=0.1))):
        call_seeds = seeds if "dropout_p" in options else [None] * 3
        _check_calls(label,
                     lambda seed, o=options: cuflash.attention(q, k, v, return_lse=True, dropout_seed=seed, **o),
                     lambda seed, out, lse, o=options: cuflash.attention_backward(dout, q, k, v, out, lse,
                                                                                  dropout_seed=seed, **o),
                     call_seeds)

    lengths = [0, 97, 300, 1, 200]
    cu = numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int32)
    total, batch = int(cu[-1]), len(lengths)
    cu_d = array((batch + 1,), numpy.int32)
    pq, pk, pv, pdout = array((total, 4, 64), half), array((total, 2, 64), half), array((total, 2, 64), half), \
        array((total, 4, 64), half)
    hints = dict(max_seqlen_q=300, max_seqlen_k=300)
    per_sequence = array((batch, 4), numpy.float32)
    for label, options in (("packed plain", {}), ("packed softcap", dict(softcap=20.0)),
                           ("packed ALiBi (B, Hq) + softcap", dict(alibi_slopes=per_sequence, softcap=20.0)),
                           ("packed dropout", dict(dropout_p=0.1)),
                           ("packed ALiBi (Hq,) + softcap + dropout", dict(alibi_slopes=slopes, softcap=5.0,
                                                                          dropout_p=0.2))):
        call_seeds = seeds if "dropout_p" in options else [None] * 3
        _check_calls(label,
                     lambda seed, o=options: cuflash.attention_varlen(
                         pq, pk, pv, cu_d, cu_d, causal=True, return_lse=True, dropout_seed=seed, **hints, **o),
                     lambda seed, out, lse, o=options: cuflash.attention_varlen_backward(
                         pdout, pq, pk, pv, out, lse, cu_d, cu_d, causal=True, dropout_seed=seed, **hints, **o),
                     call_seeds)
    _check_calls("packed sinks (forward)",
                 lambda seed: cuflash.attention_varlen(pq, pk, pv, cu_d, cu_d, sinks=sinks, return_lse=True, **hints),
                 None, [None] * 3)
    _dense_replays(array)
    _kvcache_calls(array)
    _sweep(array)
    _check_kept_plans_refuse_foreign_seeds(array)
    return 0


if __name__ == "__main__":
    sys.exit(main())
