"""cuflash.hf: cuflash as a Hugging Face transformers attention implementation, on CPU tensors.

Tiny random models built from configs (no download) run once with ``attn_implementation="sdpa"``
and once with cuflash's registered name, same weights and inputs; logits, loss and parameter
gradients must agree to fp32/fp64 rounding. ``cuflash.hf.COUNTS`` proves each call really went
through cuflash (or through the SDPA fallback where the test expects one). Also smoke-tests
benchmarks/bench_model.py and bench_encoder.py on the CPU. Skipped without torch or transformers.
"""
from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import numpy
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cuflash.hf as hf  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = hf.register()
LAYERS = 2
VOCAB = 128
# Larger than the default 0.02 so that attention is far from uniform and a wrong mask shows.
INIT = 0.3
TOLERANCE = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


@pytest.fixture(autouse=True)
def _counts():
    hf.reset_counts()
    yield
    hf.reset_counts()


def llama_config(heads_kv=2, **extra):
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=heads_kv,
                                    intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                    initializer_range=INIT, **extra)


def model_pair(config, dtype, seed=0):
    """(sdpa model, cuflash model) with the same weights; each gets its own config copy
    (from_config writes the implementation into the config it is given)."""
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa",
                                                              dtype=dtype)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=NAME,
                                                         dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    assert reference.config._attn_implementation == "sdpa"
    assert ours.config._attn_implementation == NAME
    return reference, ours


def step(model, ids, **kwargs):
    """Forward with the LM loss, backward; (logits, loss, {parameter name: grad})."""
    model.zero_grad(set_to_none=True)
    output = model(ids, labels=ids, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach(), output.loss.detach(), grads


def assert_steps_match(reference, ours, ids, dtype, **kwargs):
    logits_ref, loss_ref, grads_ref = step(reference, ids, **kwargs)
    logits, loss, grads = step(ours, ids, **kwargs)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(logits, logits_ref, **tolerance)
    torch.testing.assert_close(loss, loss_ref, **tolerance)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item() or 1.0  # grads of tiny magnitude: relative to the tensor
        torch.testing.assert_close(grads[name] / scale, grads_ref[name] / scale, **tolerance, msg=name)


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


# --- registration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuflash", "my_flash_attention", "flash"])
def test_name_with_flash_is_refused(name):
    with pytest.raises(ValueError, match="flash"):
        hf.register(name)


@pytest.mark.parametrize("name", ["org/repo", "paged|cuattn", "sdpa", "eager"])
def test_names_transformers_would_not_route_are_refused(name):
    with pytest.raises(ValueError):
        hf.register(name)


def test_register_returns_the_name_and_set_attn_implementation_routes():
    assert hf.register("cuattn_other") == "cuattn_other"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="sdpa")
    model.set_attn_implementation("cuattn_other")
    model(random_ids(1, 8))
    assert hf.COUNTS["cuflash"] == LAYERS and hf.COUNTS["fallback"] == 0


# --- whole models against SDPA ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("heads_kv", [4, 2], ids=["mha", "gqa"])
def test_llama_training_step_matches_sdpa(dtype, heads_kv):
    reference, ours = model_pair(llama_config(heads_kv), dtype)
    assert_steps_match(reference, ours, random_ids(2, 19), dtype)
    # One forward and its backward: every layer's attention went through cuflash, nothing fell back.
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}


def test_prefill_then_decode_matches_sdpa():
    """Prefill (causal, Lq == Lk) and single-token decode steps (Lq == 1: no causal mask) with a cache."""
    dtype = torch.float64
    reference, ours = model_pair(llama_config(), dtype)
    ids = random_ids(2, 12)
    with torch.no_grad():
        results = []
        for model in (reference, ours):
            out = model(ids[:, :9], use_cache=True)
            logits = [out.logits]
            cache = out.past_key_values
            for position in range(9, 12):
                out = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits)
            results.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(results[1], results[0], **TOLERANCE[dtype])
    assert hf.COUNTS["cuflash"] == 4 * LAYERS and hf.COUNTS["fallback"] == 0


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_model_matches_sdpa(family):
    """Sequences longer than the window: SDPA gets a materialised mask, cuflash gets window=(w-1, 0)."""
    dtype = torch.float64
    window = 5
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=LAYERS, vocab_size=VOCAB, initializer_range=INIT, sliding_window=window)
    if family == "mistral":
        config = transformers.MistralConfig(**common)
    else:  # layer 0 full attention, layer 1 sliding: both masks in one model
        config = transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
        assert config.layer_types == ["full_attention", "sliding_attention"]
    reference, ours = model_pair(config, dtype)
    ids = random_ids(2, 23)
    assert_steps_match(reference, ours, ids, dtype)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}

    # The window matters at this length: with a window wider than the sequence, other logits.
    wide_config = copy.deepcopy(config)
    wide_config.sliding_window = 10_000
    wide = transformers.AutoModelForCausalLM.from_config(wide_config, attn_implementation=NAME, dtype=dtype)
    wide.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert not torch.allclose(wide(ids).logits, ours(ids).logits, rtol=1e-6, atol=1e-6)


def test_mask_function_skips_only_the_sliding_causal_pattern():
    from transformers.masking_utils import (chunked_causal_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)

    window, length = 4, 10
    assert hf.mask_function(1, length, length, mask_function=sliding_window_causal_mask_function(window),
                            local_size=window) is None
    chunked = chunked_causal_mask_function(window, torch.zeros(1, dtype=torch.long))
    got = hf.mask_function(1, length, length, mask_function=chunked, local_size=window)
    want = sdpa_mask(1, length, length, mask_function=chunked, local_size=window)
    assert got is not None and torch.equal(got, want)
    padded = torch.ones(1, length, dtype=torch.bool)
    padded[0, 0] = False
    got = hf.mask_function(1, length, length, mask_function=sliding_window_causal_mask_function(window),
                           local_size=window, attention_mask=padded)
    assert got is not None and got.shape == (1, 1, length, length)


# --- fallbacks -------------------------------------------------------------------------------------


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def on(device, *modules):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return [module.to(device) for module in modules]


def _padding_mask(ids, left=3, right=4):
    """Left padding in the first sequence, right padding in the second, none in the rest."""
    mask = torch.ones_like(ids)
    mask[0, :left] = 0
    if ids.shape[0] > 1:
        mask[1, ids.shape[1] - right:] = 0
    return mask


PADDING_CONFIGS = [
    pytest.param(lambda: llama_config(), id="llama"),
    pytest.param(lambda: transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=128, num_hidden_layers=LAYERS,
                                                    vocab_size=VOCAB, initializer_range=INIT, sliding_window=5),
                 id="mistral-sliding"),
    pytest.param(lambda: transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=128, num_hidden_layers=LAYERS,
                                                  vocab_size=VOCAB, initializer_range=INIT), id="qwen2"),
]


def assert_padded_steps_match(reference, ours, ids, dtype):
    """A training step on ``ids`` padded by _padding_mask (padded labels ignored) gives the same
    logits at the real positions, loss and gradients in both models; returns ours' gradients."""
    mask = _padding_mask(ids)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        output = model(ids, attention_mask=mask, labels=labels)
        output.loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output.logits.detach(), output.loss.detach(), grads))
    (logits_ref, loss_ref, grads_ref), (logits, loss, grads) = results
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], logits_ref[valid], **TOLERANCE[dtype])
    torch.testing.assert_close(loss, loss_ref, **TOLERANCE[dtype])
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item() or 1.0
        torch.testing.assert_close(grads[name] / scale, grads_ref[name] / scale, **TOLERANCE[dtype], msg=name)
    return grads


@pytest.mark.parametrize("config", PADDING_CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_padded_batch_runs_in_cuflash(config, device):
    """Left- and right-padded sequences in one batch: each element runs on its valid tokens
    (SDPA's mask checked to be exactly that pattern); logits at the valid positions, the loss with
    padded labels ignored, and every gradient match the model's own SDPA implementation."""
    dtype = torch.float64
    reference, ours = on(device, *model_pair(config(), dtype))
    assert_padded_steps_match(reference, ours, random_ids(3, 13).to(device), dtype)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}


@pytest.mark.parametrize("config", PADDING_CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_packed_batch_runs_in_cuflash(config, device):
    """Documents packed back to back (position_ids restarting, as DataCollatorWithFlattening makes
    them): every document attends only to itself, as in the model's own SDPA implementation."""
    dtype = torch.float64
    reference, ours = on(device, *model_pair(config(), dtype))
    lengths = [[5, 7, 4], [9, 1, 6]]
    ids = random_ids(2, 16).to(device)
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths], device=device)
    assert_steps_match(reference, ours, ids, dtype, position_ids=position_ids, use_cache=False)  # packing: no cache
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}
    # The packed mask reached cuflash (transformers builds it only without a cache) and was read as
    # the documents above.
    assert hf._LAST_SEGMENTS[0][3][1] == [(0, 9, 0, 9, "top_left"), (9, 10, 9, 10, "top_left"),
                                          (10, 16, 10, 16, "top_left")]


def _flattened_batch(lengths=(5, 7, 4, 9)):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s batch of documents of ``lengths``:
    the (1, total) tokens, labels, position_ids restarting per document, cu_seq_lens_q/_k,
    max_length_q/_k."""
    ids = random_ids(1, sum(lengths))[0].tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    features = [{"input_ids": ids[a:a + n]} for a, n in zip(starts, lengths)]
    return transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)


@pytest.mark.parametrize("config", PADDING_CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_flattened_batch_attends_within_its_documents(config, device, monkeypatch):
    """A padding-free batch (DataCollatorWithFlattening with flash-attention kwargs, the cache left
    on as by default): every document attends to itself only, as transformers' flash-attention
    integration computes it, from cu_seq_lens in one packed call per layer, no mask read; loss and
    gradients as SDPA's model with use_cache=False (where transformers masks the documents from
    position_ids). SDPA with the cache on attends across documents."""
    dtype = torch.float64
    reference, ours = on(device, *model_pair(config(), dtype))
    batch = {name: (value.to(device) if torch.is_tensor(value) else value) for name, value in _flattened_batch().items()}
    monkeypatch.setattr(hf, "_segments", lambda *args: pytest.fail("the mask was read"))
    results = []
    for model, extra in ((reference, dict(use_cache=False)), (ours, {})):
        model.zero_grad(set_to_none=True)
        output = model(**batch, **extra)
        output.loss.backward()
        results.append((output.logits.detach(), output.loss.detach(),
                        {name: p.grad.detach().clone() for name, p in model.named_parameters()}))
    (logits_ref, loss_ref, grads_ref), (logits, loss, grads) = results
    torch.testing.assert_close(logits, logits_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(loss, loss_ref, **TOLERANCE[dtype])
    assert_gradients_match(grads, grads_ref)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}
    with torch.no_grad():  # (why: SDPA given the same batch with the cache on)
        assert (reference(**batch).logits - logits_ref).abs().max() > 1e-3


def test_compiled_flattened_batch_runs_one_packed_call_per_layer():
    """The same padding-free batch in a compiled training step (fullgraph): one graph whose
    attention is cuflash's packed op, one per layer (no B x L x L mask reaches an attention call),
    with the loss and gradients of SDPA's use_cache=False model."""
    reference, ours = model_pair(llama_config(), torch.float64)
    batch = _flattened_batch()
    results = []
    for model, extra in ((reference, dict(use_cache=False)), (ours, {})):
        step, counter, _ = _compile_counting(lambda batch, model=model, extra=extra: model(**batch, **extra).loss)
        loss = step(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counter))
    (loss_ref, grads_ref, _), (loss, grads, counter) = results
    torch.testing.assert_close(loss, loss_ref, **TOLERANCE[torch.float64])
    assert_gradients_match(grads, grads_ref)
    targets = [target for target, _, _ in counter.calls]
    assert targets.count("cuflash.attention_varlen_fwd") == LAYERS and "cuflash.attention_fwd" not in targets
    assert counter.frame_count == 1


CONTINUOUS_BATCHING = [
    pytest.param(lambda: llama_config(), "sdpa", id="llama"),
    pytest.param(lambda: transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                    intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                                    initializer_range=INIT, sliding_window=5), "sdpa",
                 id="mistral-sliding"),
    # (SDPA drops Gemma-2's softcap, and so do transformers' paged|sdpa and paged|eager: the plain
    # eager model is the reference)
    pytest.param(lambda: transformers.Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                   intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                                   initializer_range=INIT, sliding_window=5, head_dim=16,
                                                   attn_logit_softcapping=2.0), "eager", id="gemma2-softcap"),
]


@pytest.mark.parametrize("config, reference_name", CONTINUOUS_BATCHING)
@pytest.mark.parametrize("device", DEVICES)
def test_continuous_batching_runs_in_cuflash(config, reference_name, device, monkeypatch):
    """transformers' continuous batching (generate_batch) with a model built with cuflash's name:
    it switches the model to "paged|" + the name, which register() also made (a ValueError
    before). Three requests of different lengths, prompts longer than the sliding window: every
    attention call in cuflash, each generated token the reference model's greedy choice and its
    log-probability the reference's (the plain model over prompt and tokens, no cache)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import cache as paged_cache

    # (without psutil transformers counts no free memory on the CPU and refuses to size the cache)
    monkeypatch.setattr(paged_cache.PagedAttentionMemoryHandler, "get_available_memory", lambda self: 1 << 30)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15]]
    torch.manual_seed(0)
    model, = on(device, transformers.AutoModelForCausalLM.from_config(config(), attn_implementation=NAME,
                                                                      dtype=torch.float32))
    reference = copy.deepcopy(model).eval()
    reference.set_attn_implementation(reference_name)
    outputs = model.eval().generate_batch(
        inputs=prompts, warmup=False,
        generation_config=transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1,
                                                        pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(block_size=8, num_blocks=16, max_batch_tokens=32,
                                                            use_cuda_graph=False, return_logprobs=True))
    assert hf.COUNTS["cuflash"] > 0 and hf.COUNTS["fallback"] == 0
    for request, prompt in zip(sorted(outputs), prompts):
        tokens, logprobs = outputs[request].generated_tokens, torch.tensor(outputs[request].logprobs)
        assert len(tokens) == 6
        with torch.no_grad():
            scores = reference(torch.tensor([prompt + tokens], device=device), use_cache=False).logits[
                0, len(prompt) - 1:-1].cpu()
        scores = scores.log_softmax(-1)
        assert scores.argmax(-1).tolist() == tokens
        torch.testing.assert_close(logprobs, scores[torch.arange(6), tokens], **TOLERANCE[torch.float32])


def test_paged_attention_forward_says_it_needs_transformers_paged_cache():
    """Called outside continuous batching (no paged cache): a ValueError naming what it needs,
    before anything runs."""
    module, q, k, v = _layer_call()
    with pytest.raises(ValueError, match="without a paged attention cache.*continuous batching"):
        hf.paged_attention_forward(module, q, k, v, None)
    assert hf.COUNTS["cuflash"] == 0


def assert_generation_matches(reference, ours, ids, mask, new_tokens, monkeypatch):
    """Greedy generation over a KV cache with ``mask`` (padding): the same tokens and the same
    scores at every step as the model's own SDPA, every attention call in cuflash and none of
    them one call per sequence (the prefill is one packed call, each decoding step one call with
    a key mask hiding each row's padding, causal bottom-right)."""
    monkeypatch.setattr(hf, "_attention_of_sequences", lambda *a, **k: pytest.fail("one call per sequence"))
    runs = []
    for model in (reference, ours):
        model.generation_config.pad_token_id = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers warns of right padding, and generates anyway
            runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                       output_scores=True, return_dict_in_generate=True))
    torch.testing.assert_close(runs[1].sequences, runs[0].sequences, rtol=0, atol=0)
    for step_ours, step_ref in zip(runs[1].scores, runs[0].scores):
        torch.testing.assert_close(step_ours, step_ref, **TOLERANCE[torch.float64])
    assert hf.COUNTS["fallback"] == 0 and hf.COUNTS["cuflash"] == new_tokens * LAYERS


@pytest.mark.parametrize("config", PADDING_CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_generation_from_left_padded_prompts_runs_in_cuflash(config, device, monkeypatch):
    reference, ours = on(device, *model_pair(config(), torch.float64))
    ids = random_ids(3, 9).to(device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    assert_generation_matches(reference, ours, ids, mask, 5, monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_from_right_padded_prompts_runs_in_cuflash(device, monkeypatch):
    """The new tokens follow the padding in the cache, so each row's real keys have a hole: still
    one call per decoding step (the key mask takes any set of keys)."""
    reference, ours = on(device, *model_pair(llama_config(), torch.float64))
    ids = random_ids(3, 9).to(device)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 8:] = 0
    assert_generation_matches(reference, ours, ids, mask, 4, monkeypatch)


def _layer_call(dtype=torch.float64, length=9):
    """A Llama layer's attention module (GQA 4/2) and random (B, H, L, D) query/key/value."""
    reference, ours = model_pair(llama_config(), dtype)
    q = torch.randn(2, 4, length, 16, dtype=dtype)
    k, v = (torch.randn(2, 2, length, 16, dtype=dtype) for _ in range(2))
    return ours.model.layers[0].self_attn, q, k, v


def _spy_attention(monkeypatch):
    """The keywords of every cuflash.torch.attention call cuflash.hf makes."""
    calls, real = [], hf._cuflash_torch.attention
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(hf._cuflash_torch, "attention", spy)
    return calls


def test_a_mask_of_another_pattern_runs_in_cuflash_as_given(monkeypatch):
    """A boolean mask of no pattern cuflash.hf knows (a causal mask with a hole), and an additive
    float mask, run in cuflash as SDPA reads them (True = visible; added to the scores), with no
    warning; a mask of another dtype falls back to SDPA (which refuses it), warned once, counted."""
    module, q, k, v = _layer_call()
    calls = _spy_attention(monkeypatch)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[5, 2] = False  # a hole: no padding pattern has it
    mask = mask[None, None].expand(2, 1, 9, 9)
    additive = torch.randn(2, 1, 9, 9, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    for given in (mask, additive, additive.float()):  # float32 beside float64 queries: converted
        want = hf.sdpa_attention_forward(module, q, k, v, given, scaling=0.25)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = hf.attention_forward(module, q, k, v, given, scaling=0.25)[0]
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert [sorted(c) for c in calls] == [["mask", "scale", "sinks", "softcap"]] + [["bias", "scale", "sinks",
                                                                                     "softcap"]] * 2
    assert calls[0]["mask"] is mask and calls[1]["bias"] is additive and calls[2]["bias"].dtype == torch.float64
    assert hf.COUNTS == {"cuflash": 3, "fallback": 0, "fallback_reasons": {}}
    # An integer mask goes to SDPA, which refuses it with its own error (warned once, counted).
    integers = mask.to(torch.int8)
    with pytest.warns(UserWarning, match="dtype torch.int8"), pytest.raises(RuntimeError, match="attn_mask dtype"):
        hf.attention_forward(module, q, k, v, integers, scaling=0.25)
    assert hf.COUNTS["cuflash"] == 3 and hf.COUNTS["fallback"] == 1
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("error")
        hf.attention_forward(module, q, k, v, integers, scaling=0.25)
    assert hf.COUNTS["fallback"] == 2
    # An all-ones padding mask is no padding: the mask function skips it and cuflash runs.
    hf.reset_counts()
    model_pair(llama_config(), torch.float64)[1](random_ids(2, 11), attention_mask=torch.ones(2, 11, dtype=torch.long))
    assert hf.COUNTS["cuflash"] == LAYERS


def _band_keys_mask(real, left, right, length):
    """(B, 1, L, L): key j visible to query i iff real[b, j] and i - left <= j <= i + right."""
    index = torch.arange(length)
    offset = index[None, :] - index[:, None]
    band = (offset >= -left) & (offset <= right)
    return (real[:, None, None, :] & band).contiguous()


@pytest.mark.parametrize("left,right,window", [(12, 12, None), (3, 3, (3, 3)), (0, 12, (0, -1)), (2, 0, (2, 0)),
                                               (12, 5, (-1, 5))])
def test_a_bidirectional_padded_mask_runs_as_keys_and_a_window(left, right, window, monkeypatch):
    """Real keys x a band holding the diagonal (BERT's padded batch: no band; ModernBERT's local
    layers: |i - j| <= w) reach cuflash as that window and a (B, 1, 1, Lk) key mask, read once per
    mask; the result is SDPA's on the mask itself."""
    module, q, k, v = _layer_call(length=13)
    real = torch.ones(2, 13, dtype=torch.bool)
    real[0, 9:] = False
    real[1, :2] = False
    mask = _band_keys_mask(real, left, right, 13)
    calls = _spy_attention(monkeypatch)
    reads = []
    real_keys_in_band = hf._keys_in_band
    monkeypatch.setattr(hf, "_keys_in_band", lambda m: reads.append(1) or real_keys_in_band(m))
    want = hf.sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0]
    for _ in range(2):  # (the second call of the same mask: no second read)
        got = hf.attention_forward(module, q, k, v, mask, scaling=0.25)[0]
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert len(reads) == 1
    assert calls[0]["window"] == window and calls[0]["mask"].shape == (2, 1, 1, 13)
    assert torch.equal(calls[0]["mask"][:, 0, 0], real)
    # Every key real: the window alone (no mask at all without a band).
    calls.clear()
    whole = _band_keys_mask(torch.ones(2, 13, dtype=torch.bool), left, right, 13)
    torch.testing.assert_close(hf.attention_forward(module, q, k, v, whole, scaling=0.25)[0],
                               hf.sdpa_attention_forward(module, q, k, v, whole, scaling=0.25)[0],
                               **TOLERANCE[torch.float64])
    assert calls[0]["window"] == window and calls[0]["mask"] is None


def test_masks_that_are_not_keys_in_a_band_run_as_given():
    """_keys_in_band refuses what is not exactly real keys x a band holding the diagonal."""
    real = torch.ones(2, 10, dtype=torch.bool)
    real[0, 7:] = False
    strictly_past = _band_keys_mask(real, 3, -1, 10)        # j < i: the diagonal hidden
    holed = _band_keys_mask(real, 2, 2, 10)
    holed[1, 0, 4, 5] = False
    row_hidden = _band_keys_mask(real, 2, 2, 10)
    row_hidden[1, 0, 6] = False                              # a query seeing nothing among real keys
    assert [hf._keys_in_band(m) for m in (strictly_past, holed, row_hidden)] == [None] * 3
    # Fewer queries than keys: the keys alone (no band is read there).
    keys_only = real[:, None, None, :].expand(2, 1, 4, 10)
    window, keys = hf._keys_in_band(keys_only)
    assert window is None and torch.equal(keys[:, 0, 0], real)
    assert hf._keys_in_band(_band_keys_mask(real, 2, 2, 10)[:, :, :4]) is None
    for empty in ((0, 1, 5, 5), (2, 1, 0, 0), (2, 1, 3, 0)):  # nothing to read: the mask as given
        assert hf._keys_in_band(torch.ones(empty, dtype=torch.bool)) is None


@pytest.mark.parametrize("batch, length", [(0, 5), (2, 0)], ids=["empty-batch", "empty-sequence"])
def test_an_empty_masked_call_runs_as_sdpa_does(batch, length):
    """A masked call with nothing in it (an empty batch; no tokens) returns SDPA's empty output
    (the mask analyses read nothing; they raised on an empty batch before)."""
    module, *_ = _layer_call()
    q = torch.randn(batch, 4, length, 16, dtype=torch.float64)
    k = torch.randn(batch, 2, length, 16, dtype=torch.float64)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    got = hf.attention_forward(module, q, k, k, mask, scaling=0.25)[0]
    want = hf.sdpa_attention_forward(module, q, k, k, mask, scaling=0.25)[0]
    assert got.shape == want.shape == (batch, length, 4, 16)


ENCODERS = [
    pytest.param(lambda: (transformers.BertModel, transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
        initializer_range=INIT)), id="bert"),
    pytest.param(lambda: (transformers.ModernBertModel, transformers.ModernBertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
        initializer_range=INIT, local_attention=6, global_attn_every_n_layers=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, cls_token_id=2, sep_token_id=1)), id="modernbert-local"),
]


def _model_pair_of(cls, config, device, dtype=torch.float64):
    """(sdpa model, cuflash model) of ``cls`` with the same weights, in eval mode (no dropout)."""
    torch.manual_seed(0)
    # (_from_config: set_attn_implementation does not reach T5's encoder and decoder stacks)
    reference = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(dtype).eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation=NAME).to(dtype).eval()
    ours.load_state_dict(reference.state_dict())
    return on(device, reference, ours)


def assert_states_and_gradients_match(reference, ours, run, valid):
    """``run(model)`` gives hidden states (..., L, hidden); at the ``valid`` positions they, and the
    gradients of a random projection of them, are the same in both models (float64)."""
    results = []
    for model in (reference, ours):
        model.zero_grad(set_to_none=True)
        hidden = run(model)
        # (a random projection: a sum of squares of layer-normed states is constant, its gradient noise)
        weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2), dtype=hidden.dtype)
        (hidden * weights.to(hidden.device) * valid[..., None]).sum().backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((hidden.detach()[valid], grads))
    (hidden_ref, grads_ref), (hidden, grads) = results
    torch.testing.assert_close(hidden, hidden_ref, **TOLERANCE[torch.float64])
    assert_gradients_match(grads, grads_ref)


def assert_gradients_match(grads, grads_ref):
    """Each parameter's gradient as the reference's (float64), relative to the tensor but to at
    least a thousandth of the largest gradient: the keys' bias has none in exact arithmetic (a
    row's scores all shift by q.b), only rounding noise to compare."""
    assert grads.keys() == grads_ref.keys() and grads
    floor = 1e-3 * max(g.abs().max().item() for g in grads_ref.values())
    for name in grads_ref:
        scale = max(grads_ref[name].abs().max().item(), floor)
        torch.testing.assert_close(grads[name] / scale, grads_ref[name] / scale, **TOLERANCE[torch.float64], msg=name)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("device", DEVICES)
def test_an_encoders_padded_batch_runs_in_cuflash(encoder, device, monkeypatch):
    """A bidirectional encoder's padded batch (right padding in one row, left in another; BERT, and
    ModernBERT whose second layer is local): every layer in cuflash with the keys' mask (and the
    local layer's band as a window), the real positions' hidden states and every gradient as the
    model's own SDPA implementation."""
    cls, config = encoder()
    reference, ours = _model_pair_of(cls, config, device)
    calls = _spy_attention(monkeypatch)
    ids = random_ids(3, 13).to(device)
    mask = _padding_mask(ids, left=2, right=5)
    assert_states_and_gradients_match(reference, ours, lambda model: model(ids, attention_mask=mask).last_hidden_state,
                                      mask.bool())
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}
    assert all(c["mask"].shape == (3, 1, 1, 13) for c in calls)
    assert [c.get("window") for c in calls] == ([None, None] if cls is transformers.BertModel else [None, (3, 3)])


ENCODER_DECODERS = [
    pytest.param(lambda: (transformers.BartModel, transformers.BartConfig(
        d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_layers=LAYERS, decoder_layers=LAYERS, vocab_size=VOCAB, max_position_embeddings=64, init_std=INIT,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)), id="bart"),
    pytest.param(lambda: (transformers.T5Model, transformers.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4, vocab_size=VOCAB,
        dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)), id="t5"),
]


@pytest.mark.parametrize("model", ENCODER_DECODERS)
@pytest.mark.parametrize("device", DEVICES)
def test_an_encoder_decoders_padded_batch_runs_in_cuflash(model, device, monkeypatch):
    """BART and T5 with padded encoder and decoder inputs: the encoder's self-attention, the
    decoder's causal self-attention and its cross-attention to the encoder (the encoder's padding
    as a key mask) all in cuflash, with SDPA's decoder states and every gradient; T5's learned
    relative-position bias is cuflash's bias, its gradient (the embedding's) cuflash's dbias."""
    reference, ours = _model_pair_of(*model(), device)
    calls = _spy_attention(monkeypatch)
    ids = random_ids(3, 13).to(device)
    mask = _padding_mask(ids, left=3, right=4)
    decoder_ids = random_ids(3, 7, seed=3).to(device)
    decoder_mask = _padding_mask(decoder_ids, left=0, right=2)
    assert_states_and_gradients_match(reference, ours, lambda model: model(
        input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
        decoder_attention_mask=decoder_mask).last_hidden_state, decoder_mask.bool())
    assert hf.COUNTS == {"cuflash": 3 * LAYERS, "fallback": 0, "fallback_reasons": {}}
    key_masks = [c["mask"].shape for c in calls if "mask" in c]
    assert key_masks.count((3, 1, 1, 13)) == 2 * LAYERS  # the encoder's layers and the cross-attentions


def _tiny(config_class, **sizes):
    return lambda: getattr(transformers, config_class)(**sizes)


_SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB)
_SEQ2SEQ = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                encoder_layers=LAYERS, decoder_layers=LAYERS, vocab_size=VOCAB)
_VISION = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=LAYERS, image_size=32, patch_size=8)
# (model class, config, inputs): "text" a padded batch, "seq2seq" padded encoder and decoder inputs,
# "image" pixels, "audio" Whisper's features and a padded decoder batch.
ARCHITECTURES = [
    pytest.param("RobertaModel", _tiny("RobertaConfig", **_SMALL, max_position_embeddings=64, pad_token_id=1), "text",
                 id="roberta"),
    pytest.param("DistilBertModel", _tiny("DistilBertConfig", dim=64, n_heads=4, hidden_dim=128, n_layers=LAYERS,
                                          vocab_size=VOCAB), "text", id="distilbert"),
    pytest.param("ElectraModel", _tiny("ElectraConfig", **_SMALL, embedding_size=64), "text", id="electra"),
    pytest.param("AlbertModel", _tiny("AlbertConfig", **_SMALL, embedding_size=32), "text", id="albert"),
    pytest.param("GPT2Model", _tiny("GPT2Config", n_embd=64, n_head=4, n_layer=LAYERS, vocab_size=VOCAB,
                                    n_positions=64), "text", id="gpt2"),
    pytest.param("GPTNeoXModel", _tiny("GPTNeoXConfig", **_SMALL), "text", id="gpt-neox"),
    pytest.param("Phi3Model", _tiny("Phi3Config", **_SMALL, num_key_value_heads=2, pad_token_id=0), "text", id="phi3"),
    pytest.param("CLIPTextModel", _tiny("CLIPTextConfig", **_SMALL, max_position_embeddings=64), "text",
                 id="clip-text"),
    pytest.param("SiglipTextModel", _tiny("SiglipTextConfig", **_SMALL, max_position_embeddings=64), "text",
                 id="siglip-text"),
    pytest.param("MBartModel", _tiny("MBartConfig", **_SEQ2SEQ, max_position_embeddings=64), "seq2seq", id="mbart"),
    pytest.param("MT5Model", _tiny("MT5Config", d_model=64, d_kv=16, d_ff=128, num_layers=LAYERS, num_heads=4,
                                   vocab_size=VOCAB, decoder_start_token_id=0), "seq2seq", id="mt5"),
    pytest.param("WhisperModel", _tiny("WhisperConfig", **_SEQ2SEQ, num_mel_bins=16, max_source_positions=32,
                                       max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       decoder_start_token_id=1), "audio", id="whisper"),
    pytest.param("ViTModel", _tiny("ViTConfig", **_VISION, intermediate_size=128), "image", id="vit"),
    pytest.param("Dinov2Model", _tiny("Dinov2Config", **_VISION), "image", id="dinov2"),
]


@pytest.mark.parametrize("model_class, config, inputs", ARCHITECTURES)
def test_architectures_run_every_attention_call_in_cuflash(model_class, config, inputs):
    """Encoders, decoders, encoder-decoders, vision and audio models built with cuflash's name: every
    attention call (self, causal, cross; padded batches) in cuflash, none in SDPA, and the model's
    last hidden states at the real positions as with its SDPA implementation (float64)."""
    reference, ours = _model_pair_of(getattr(transformers, model_class), config(), "cpu")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 13), generator=generator)
    decoder_ids = torch.randint(3, 100, (3, 7), generator=generator)
    mask, decoder_mask = _padding_mask(ids, left=0, right=4), _padding_mask(decoder_ids, left=0, right=2)
    arguments, valid, calls = {
        "text": (dict(input_ids=ids, attention_mask=mask), mask.bool(), LAYERS),
        "seq2seq": (dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                         decoder_attention_mask=decoder_mask), decoder_mask.bool(), 3 * LAYERS),
        "audio": (dict(input_features=torch.randn(3, 16, 64, generator=generator, dtype=torch.float64),
                       decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask), decoder_mask.bool(),
                  3 * LAYERS),
        "image": (dict(pixel_values=torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)), None, LAYERS),
    }[inputs]
    want, got = (model(**arguments).last_hidden_state.detach() for model in (reference, ours))
    if valid is not None:
        want, got = want[valid], got[valid]
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert hf.COUNTS == {"cuflash": calls, "fallback": 0, "fallback_reasons": {}}


def test_an_sdpa_model_under_sdpa_override_runs_cuflash():
    """A model built with transformers' own "sdpa" implementation, run inside
    cuflash.torch.sdpa_override(): every F.scaled_dot_product_attention call it makes is cuflash's,
    with the same loss and gradients as outside the block."""
    import cuflash.torch as ct

    reference, _ = model_pair(llama_config(), torch.float64)
    ids = random_ids(2, 9)
    outside = step(reference, ids)
    ct.SDPA_COUNTS.update(cuflash=0, torch=0, torch_reasons={})
    with ct.sdpa_override():
        inside = step(reference, ids)
    assert ct.SDPA_COUNTS == {"cuflash": LAYERS, "torch": 0, "torch_reasons": {}}
    ct.SDPA_COUNTS.update(cuflash=0, torch=0, torch_reasons={})
    torch.testing.assert_close(inside[0], outside[0], **TOLERANCE[torch.float64])
    torch.testing.assert_close(inside[1], outside[1], **TOLERANCE[torch.float64])
    assert_gradients_match(inside[2], outside[2])


def _dropping_sdpa(seeds, documents=None):
    """torch's SDPA as transformers' SDPA integration calls it, but dropping exactly the keep mask
    cuflash drew for the same call (``seeds``: cuflash's seeds in call order; cuflash._dropout's
    mask over (batch x head, query, key)), so that a reference model drops what cuflash dropped.
    ``documents``: the cu_seq_lens of a flattened batch (one row): document b's block is then
    dropped as cuflash's packed call drops it (rows b * H + h, indices from the document's start)."""
    from cuflash import _dropout

    real = torch.nn.functional.scaled_dot_product_attention
    calls = iter(seeds)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not dropout_p:
            return real(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        seed, heads = next(calls), query.shape[1]
        if documents is None:
            rows = numpy.arange(query.shape[0] * heads, dtype=numpy.uint64).reshape(query.shape[:2])
            keep = _dropout.keep_mask(seed, dropout_p, rows[..., None, None], numpy.arange(query.shape[2])[:, None],
                                      numpy.arange(key.shape[2])[None, :])
        else:  # (one row of documents: hidden pairs across documents need no keep bit)
            keep = numpy.zeros((1, heads, query.shape[2], key.shape[2]), bool)
            for b, (start, stop) in enumerate(zip(documents[:-1], documents[1:])):
                rows = numpy.arange(b * heads, (b + 1) * heads, dtype=numpy.uint64)[None, :, None, None]
                keep[..., start:stop, start:stop] = _dropout.keep_mask(
                    seed, dropout_p, rows, numpy.arange(stop - start)[:, None], numpy.arange(stop - start)[None, :])
        return (scores.softmax(-1) * torch.from_numpy(keep) * _dropout.keep_scale(dropout_p)) @ value

    return sdpa


def test_training_with_attention_dropout_runs_in_cuflash(monkeypatch):
    """A model in training mode with attention dropout runs in cuflash (no fallback), a fresh seed
    from torch's generator per call: its loss and gradients are those of the SDPA model dropping
    exactly cuflash's masks; in eval mode nothing is dropped."""
    reference, ours = model_pair(llama_config(attention_dropout=0.3), torch.float64)
    ids = random_ids(2, 9)
    seeds, draw = [], torch.randint
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: (lambda value: seeds.append(int(value)) or value)(
        draw(*args, **kwargs)))  # (cuflash's seed draws: the only randint calls of a forward)
    ours.train()
    mine = ours(ids, labels=ids).loss
    mine.backward()
    assert hf.COUNTS["cuflash"] == LAYERS and not hf.COUNTS["fallback_reasons"]
    assert len(set(seeds)) == LAYERS
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _dropping_sdpa(list(seeds)))
    reference.train()
    theirs = reference(ids, labels=ids).loss
    theirs.backward()
    torch.testing.assert_close(mine, theirs, **TOLERANCE[torch.float64])
    assert_gradients_match({name: x.grad for name, x in ours.named_parameters()},
                           {name: x.grad for name, x in reference.named_parameters()})
    ours.eval()
    reference.eval()
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, **TOLERANCE[torch.float64])


def test_a_flattened_batch_with_attention_dropout_runs_in_cuflash(monkeypatch):
    """Padding-free training with attention dropout: one packed call per layer in cuflash (no
    fallback), each document dropped as the same documents padded would be; loss and gradients
    as SDPA's use_cache=False model dropping exactly those masks."""
    reference, ours = model_pair(llama_config(attention_dropout=0.3), torch.float64)
    batch = _flattened_batch()
    seeds, draw = [], torch.randint
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: (lambda value: seeds.append(int(value)) or value)(
        draw(*args, **kwargs)))
    ours.train()
    mine = ours(**batch).loss
    mine.backward()
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}} and len(set(seeds)) == LAYERS
    documents = batch["cu_seq_lens_q"].tolist()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _dropping_sdpa(list(seeds), documents))
    reference.train()
    theirs = reference(**batch, use_cache=False).loss
    theirs.backward()
    torch.testing.assert_close(mine, theirs, **TOLERANCE[torch.float64])
    assert_gradients_match({name: x.grad for name, x in ours.named_parameters()},
                           {name: x.grad for name, x in reference.named_parameters()})


@pytest.mark.parametrize("is_causal", [None, True, False])
@pytest.mark.parametrize("lengths", [(7, 7), (1, 6), (4, 9)], ids=["square", "decode", "static-prefill"])
def test_attention_function_mirrors_sdpa_integration(is_causal, lengths):
    """The function alone: is_causal keyword vs module attribute, Lq == 1, Lk > Lq, GQA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    q_length, kv_length = lengths
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, q_length, 8, dtype=torch.float64, generator=generator)
    k = torch.randn(2, 2, kv_length, 8, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 2, kv_length, 8, dtype=torch.float64, generator=generator)
    want, _ = sdpa_attention_forward(Module(), q, k, v, None, scaling=0.3, is_causal=is_causal)
    got, weights = hf.attention_forward(Module(), q, k, v, None, scaling=0.3, is_causal=is_causal)
    assert weights is None and got.shape == want.shape == (2, q_length, 4, 8) and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert hf.COUNTS["cuflash"] == 1


# --- the model benchmark, on the CPU ----------------------------------------------------------------


def _benchmark(name="bench_model"):
    import importlib

    sys.path.insert(0, str(REPO_ROOT))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(str(REPO_ROOT))


@pytest.mark.parametrize("family", ["bert", "modernbert"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bench_encoder_runs_on_cpu(tmp_path, capsys, family, compiled):
    """benchmarks/bench_encoder.py, tiny, on the CPU (compiled through aot_eager): both backends
    timed, every cuflash layer routed to cuflash, the states as SDPA's."""
    bench_encoder = _benchmark("bench_encoder")
    path = bench_encoder.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--family", family,
                               "--out-dir", str(tmp_path)]
                              + (["--compile", "--compile-backend", "aot_eager"] if compiled else []))
    record = json.loads(Path(path).read_text())
    assert record["sweep"] == "encoder" and record["compile"] == ("aot_eager" if compiled else None)
    results = {result["backend"]: result for result in record["results"]}
    sdpa, cuflash = results["sdpa"], results["cuflash"]
    assert list(results) == ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "cuflash"]
    assert all(r["status"] in ("ok", "unsupported") for r in results.values())  # (pinned SDPA backends on a CPU)
    assert sdpa["status"] == cuflash["status"] == "ok"
    assert sdpa["calls_cuflash"] == 0 and sdpa["max_abs_diff"] is None
    assert cuflash["calls_cuflash"] == 2 and cuflash["calls_fallback"] == 0 and cuflash["max_abs_diff"] < 1e-4
    assert all(r["step_ms"] > 0 and r["forward_ms"] > 0 and r["real_tokens"] < 3 * 13 for r in (sdpa, cuflash))
    assert "| 3x13 | cuflash |" in capsys.readouterr().out


def test_bench_encoder_trains_with_attention_dropout_on_cpu(tmp_path, monkeypatch):
    """--train-dropout: the training step runs in train mode with the config's attention dropout,
    cuflash's layers dropping (their calls carry the rate), SDPA's too; the forward and the states
    compared stay eval mode's (no dropout: cuflash's equal SDPA's)."""
    import cuflash.torch as ct

    bench_encoder = _benchmark("bench_encoder")
    rates = []
    original = ct.attention

    def spy(*args, **kwargs):
        rates.append(kwargs.get("dropout_p", 0.0))
        return original(*args, **kwargs)

    monkeypatch.setattr(ct, "attention", spy)
    path = bench_encoder.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--backends",
                               "sdpa,cuflash", "--train-dropout", "0.25", "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["train_dropout"] == 0.25
    results = {result["backend"]: result for result in record["results"]}
    assert results["sdpa"]["status"] == results["cuflash"]["status"] == "ok"
    assert results["cuflash"]["max_abs_diff"] < 1e-4  # (the eval-mode states)
    assert 0.25 in rates and 0.0 in rates  # the steps dropped, the eval forwards did not


def test_bench_model_runs_on_cpu(tmp_path, capsys):
    bench_model = _benchmark()
    path = bench_model.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1",
                             "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["sweep"] == "model" and record["rows"]
    for row in record["rows"]:
        results = row["results"]
        assert results["cuflash"]["status"] == "ok", results["cuflash"]
        assert results["cuflash"]["attention_calls_cuflash"] > 0
        assert results["cuflash"]["max_abs_diff_logits"] < 1e-3
        assert results["cuflash"]["correct"] is True
    assert "| backend" in capsys.readouterr().out


@pytest.mark.parametrize("attention_mask, no_cache", [("none", False), ("ones", False), ("none", True)])
def test_bench_model_compiled_runs_on_cpu(tmp_path, capsys, attention_mask, no_cache):
    """--compile: the model compiled as a whole times its steps and prefill (here through
    aot_eager, no code generation); the eager first step still checks the logits; the eager
    instruments report nothing rather than eager numbers. --attention-mask ones: the steps pass
    a mask of ones, as a data collator does; --no-cache: use_cache=False, as training scripts do."""
    bench_model = _benchmark()
    path = bench_model.main(["--device", "cpu", "--tiny", "--shapes", "2x64", "--backends", "sdpa,cuflash",
                             "--steps", "1", "--warmup", "1", "--compile", "--compile-backend", "aot_eager",
                             "--attention-mask", attention_mask, "--out-dir", str(tmp_path)]
                            + (["--no-cache"] if no_cache else []))
    record = json.loads(Path(path).read_text())
    assert record["compile"] == "aot_eager" and record["attention_mask"] == attention_mask
    assert record["use_cache_in_steps"] is not no_cache
    result = record["rows"][0]["results"]["cuflash"]
    assert result["status"] == "ok" and result["correct"] is True and result["attention_calls_cuflash"] > 0
    assert result["first_compiled_step_s"] > 0 and result["step_ms"] > 0 and result["prefill_ms"] > 0
    assert result["host_us_fwd"] is None and result["attention_ms_per_step"] is None
    assert "Compiled (torch.compile, backend aot_eager)" in capsys.readouterr().out


@pytest.mark.parametrize("compiled", [False, True])
def test_bench_model_flattened_runs_on_cpu(tmp_path, capsys, compiled):
    """--flattened: each shape's sequences as documents of one row with the collator's keywords
    (cuflash reads cu_seq_lens, SDPA's model masks the documents from position_ids): the same
    logits as SDPA's, eagerly and compiled (aot_eager)."""
    bench_model = _benchmark()
    path = bench_model.main(["--device", "cpu", "--tiny", "--shapes", "3x32", "--backends", "sdpa,cuflash",
                             "--steps", "1", "--warmup", "1", "--flattened", "--out-dir", str(tmp_path)]
                            + (["--compile", "--compile-backend", "aot_eager"] if compiled else []))
    record = json.loads(Path(path).read_text())
    assert record["flattened"] is True and record["use_cache_in_steps"] is False
    result = record["rows"][0]["results"]["cuflash"]
    assert result["status"] == "ok" and result["correct"] is True and result["attention_calls_cuflash"] > 0
    assert result["max_abs_diff_logits"] < 1e-4 and result["host_us_fwd"] is None
    assert "Padding-free (--flattened)" in capsys.readouterr().out


def _cuflash_result_with(monkeypatch, tmp_path, tweak, argv):
    """bench_model.main(argv) with cuflash.hf's attention function given keyword arguments changed by
    ``tweak(kwargs)``: the first row's cuflash result."""
    bench_model = _benchmark()
    right = hf.attention_forward

    def wrong(module, query, key, value, attention_mask, **kwargs):
        tweak(kwargs)
        return right(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(hf, "attention_forward", wrong)
    try:
        path = bench_model.main([*argv, "--out-dir", str(tmp_path)])
    finally:
        monkeypatch.undo()
        hf.register()  # the bench registered the wrong function under the name: put the right one back
    return json.loads(Path(path).read_text())["rows"][0]["results"]["cuflash"]


def test_bench_model_flags_a_wrong_attention(tmp_path, monkeypatch):
    """A fast wrong result must be visible: a non-causal 'cuflash' is marked incorrect."""
    result = _cuflash_result_with(monkeypatch, tmp_path, lambda kwargs: kwargs.update(is_causal=False),
                                  ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--shapes", "1x32",
                                   "--backends", "sdpa,cuflash"])
    assert result["correct"] is False and result["rel_diff_logits"] > 1e-2


GEMMA2_BENCH = ["--device", "cpu", "--tiny", "--family", "gemma2", "--steps", "1", "--warmup", "1", "--attn-steps",
                "1", "--host-calls", "2", "--shapes", "1x128"]  # 128 tokens: the tiny window (64) slides


def test_bench_model_gemma2_runs_on_cpu(tmp_path):
    """--family gemma2: cuflash agrees with eager (softcap and window); sdpa runs but is marked as other
    math, not judged, and the attention check does see the softcap it drops; flex_attention skipped."""
    bench_model = _benchmark()
    path = bench_model.main([*GEMMA2_BENCH, "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert record["family"] == "gemma2" and record["reference"] == "eager"
    assert record["model_config"]["attn_logit_softcapping"] == 50.0
    results = record["rows"][0]["results"]
    assert list(results) == ["eager", "cuflash", "flex_attention", "sdpa"]
    assert results["eager"]["status"] == "ok" and results["eager"]["correct"] is True
    cuflash = results["cuflash"]
    assert cuflash["status"] == "ok" and cuflash["correct"] is True, cuflash
    assert cuflash["attention_calls_cuflash"] > 0 and cuflash["attention_calls_fallback"] == 0
    assert results["flex_attention"]["status"] == "skipped"
    sdpa = results["sdpa"]
    assert sdpa["status"] == "ok" and sdpa["correct"] is None and "softcap" in sdpa["computes"]
    assert sdpa["attn_rel_diff"] > 10 * bench_model.BOUNDS["fp32"]["attn"] > cuflash["attn_rel_diff"]
    assert "sdpa (other math)" in record["table"]


def test_bench_model_gemma2_flags_a_dropped_softcap(tmp_path, monkeypatch):
    """A cuflash that ignored Gemma-2's softcap would be marked incorrect against eager."""
    result = _cuflash_result_with(monkeypatch, tmp_path, lambda kwargs: kwargs.update(softcap=None),
                                  [*GEMMA2_BENCH, "--backends", "eager,cuflash"])
    assert result["status"] == "ok" and result["correct"] is False


def gpt_oss_pair(device, dtype):
    """A tiny gpt-oss (sliding and full layers, sinks set far from 0, so that a sink that did
    nothing would show): (eager model, cuflash model) with the same weights, on ``device``. In
    float64 the experts run transformers' eager loop (their grouped matmul takes no float64)."""
    config = transformers.GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=64, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                       num_local_experts=4, num_experts_per_tok=2, initializer_range=INIT,
                                       sliding_window=6)
    experts = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    reference, ours = on(device, *eager_pair(config, dtype, **experts))
    with torch.no_grad():
        for model in (reference, ours):
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-2.0, 2.0, 4, dtype=dtype))
    return reference, ours


def eager_pair(config, dtype, seed=0, **options):
    """(eager model, cuflash model) with the same weights: for models whose SDPA path does not
    take their attention features (softcap, sinks), the reference is transformers' eager one.
    ``options``: more of from_config's keywords, for both."""
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager",
                                                              dtype=dtype, **options)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=NAME, dtype=dtype,
                                                         **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("device", DEVICES)
def test_gemma2_softcapping_runs_in_cuflash(device):
    """Gemma-2: attention-logit softcapping (and its sliding layers) in cuflash, against eager (in
    float32: eager's softmax runs in float32 whatever the inputs)."""
    dtype = torch.float32
    config = transformers.Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       intermediate_size=128, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                                       initializer_range=INIT, attn_logit_softcapping=2.0, sliding_window=6)
    reference, ours = on(device, *eager_pair(config, dtype))
    assert_steps_match(reference, ours, random_ids(2, 19).to(device), dtype)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_oss_sinks_run_in_cuflash_with_their_gradient(device):
    """gpt-oss: learnable attention sinks (s_aux) in cuflash, against eager, sinks' gradient included
    (float32: the experts' grouped matmul takes no float64)."""
    dtype = torch.float32
    reference, ours = gpt_oss_pair(device, dtype)
    ids = random_ids(2, 17).to(device)
    assert_steps_match(reference, ours, ids, dtype)
    _, _, grads = step(ours, ids)
    assert any("sinks" in name and grad.abs().max() > 0 for name, grad in grads.items())
    assert hf.COUNTS == {"cuflash": 2 * LAYERS, "fallback": 0, "fallback_reasons": {}}


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_oss_sinks_in_a_padded_batch(device):
    """gpt-oss's sinks through the one-call packed path (padding rows as key-less sequences, whose
    out is 0 and whose dsinks terms vanish): logits at the real positions, the loss and every
    gradient (sinks' included) against eager. (transformers builds no packed-documents mask for
    gpt-oss from position_ids, eager included, so packing is tested on Llama/Mistral/Qwen2.) On
    the CPU in float64: in float32 this model's gradients move by up to 1.3e-4 of their largest
    entry between two correct attentions (eager's and the CPU backend's, whose outputs agree to
    3 ulps at layer 0, the experts' choices identical), past float32's tolerance here; the CUDA
    case keeps float32, the kernels' own precision path."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    reference, ours = gpt_oss_pair(device, dtype)
    grads = assert_padded_steps_match(reference, ours, random_ids(3, 16).to(device), dtype)
    assert any("sinks" in name for name in grads)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}


def _right_padded_causal_mask(lengths, length):
    """SDPA's (B, 1, L, L) boolean mask of right-padded causal sequences of ``lengths``."""
    index = torch.arange(length)
    real = index[None, :] < torch.tensor(lengths)[:, None]
    return (real[:, None, None, :] & (index[None, None, None, :] <= index[None, None, :, None])).numpy()


def test_a_new_mask_at_a_reused_address_is_read_again():
    """The segments are kept for the mask object that gave them (every layer of a forward gets the
    same mask), not for its address: a new mask of the same shape in the same memory (a caching
    allocator hands a freed block out again; here a NumPy buffer seen twice) is read again, and a
    mask made under inference_mode (no version counter) is taken too."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 1

    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    buffer = _right_padded_causal_mask([6, 3], 6)
    for lengths in ([6, 3], [2, 6], [4, 5]):
        buffer[...] = _right_padded_causal_mask(lengths, 6)  # (behind torch's back: no version bump)
        mask = torch.from_numpy(buffer)
        want, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3)
        got, _ = hf.attention_forward(Module(), q, k, v, mask, scaling=0.3)
        real = torch.tensor([[i < n for i in range(6)] for n in lengths])  # rows past a sequence's end: any value
        torch.testing.assert_close(got[real], want[real], **TOLERANCE[torch.float64])
        del mask
    with torch.inference_mode():
        mask = torch.from_numpy(_right_padded_causal_mask([3, 6], 6)).clone()
        want, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3)
        got, _ = hf.attention_forward(Module(), q, k, v, mask, scaling=0.3)
    real = torch.tensor([[i < n for i in range(6)] for n in (3, 6)])
    torch.testing.assert_close(got[real], want[real], **TOLERANCE[torch.float64])
    assert hf.COUNTS["cuflash"] == 4 and hf.COUNTS["fallback"] == 0


@pytest.mark.parametrize("config", PADDING_CONFIGS)
@pytest.mark.parametrize("device", DEVICES)
def test_decoding_over_a_static_cache_takes_the_kv_cache_path(config, device, monkeypatch):
    """transformers' StaticCache (every layer's keys in (B, Hk, Lmax, D), filled to the position
    decoded; the mask hides the rest; a sliding layer's cache holds its window): each decoding
    step's attention is one flash_attn_with_kvcache call over the filled keys (on the GPU the
    decode kernel, which reads no more of the cache), under inference_mode, and the logits of
    every step equal the model's own SDPA's."""
    dtype = torch.float64
    reference, ours = on(device, *model_pair(config(), dtype))
    decode_calls = []
    original = hf._cuflash_torch.flash_attn_with_kvcache
    monkeypatch.setattr(hf._cuflash_torch, "flash_attn_with_kvcache",
                        lambda *args, **kwargs: decode_calls.append(kwargs["cache_seqlens"].tolist()) or original(
                            *args, **kwargs))
    ids = random_ids(2, 7).to(device)
    steps = []
    for model in (reference, ours):
        with torch.inference_mode():
            cache = transformers.StaticCache(config=model.config, max_cache_len=16)
            out = model(ids, past_key_values=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(4):
                token = logits[-1].argmax(-1, keepdim=True)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
        steps.append(torch.stack(logits))
    torch.testing.assert_close(steps[1], steps[0], **TOLERANCE[dtype])
    window = getattr(ours.config, "sliding_window", None)  # (a sliding layer's static cache holds the window)
    assert decode_calls == [[min(n, window or n)] * 2 for n in range(8, 12) for _ in range(LAYERS)]
    assert hf.COUNTS["fallback"] == 0 and hf.COUNTS["cuflash"] == 5 * LAYERS


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_cache_filled_to_each_rows_length_is_read_as_lengths(grad):
    """The function alone on a static cache's mask: rows filled to 5 and 9 of 12 slots, three
    queries (a chunk) at each row's last positions, a sliding window of 4 by their own positions
    (a pattern transformers' SDPA mask makes and the key-padding form cannot hold): the kv-cache
    path without gradients, the mask itself with them; both SDPA's output (and gradients)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    lengths, q_length, kv_length, window = torch.tensor([5, 9]), 3, 12, 4
    i = torch.arange(q_length)[None, :, None]
    j = torch.arange(kv_length)[None, None, :]
    last = i + lengths[:, None, None] - q_length
    mask = ((j < lengths[:, None, None]) & (j <= last) & (j > last - window))[:, None]
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, q_length, 8, dtype=torch.float64, generator=generator).requires_grad_(grad)
    k = torch.randn(2, 2, kv_length, 8, dtype=torch.float64, generator=generator).requires_grad_(grad)
    v = torch.randn(2, 2, kv_length, 8, dtype=torch.float64, generator=generator).requires_grad_(grad)
    segments = hf._segments(mask, window)
    assert segments.lengths.tolist() == [5, 9]
    routed = []
    original = hf._cuflash_torch.flash_attn_with_kvcache
    hf._cuflash_torch.flash_attn_with_kvcache = lambda *a, **kw: routed.append(1) or original(*a, **kw)
    try:
        got, _ = hf.attention_forward(Module(), q, k, v, mask, scaling=0.3, sliding_window=window)
    finally:
        hf._cuflash_torch.flash_attn_with_kvcache = original
    want, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    assert routed == ([] if grad else [1]) and hf.COUNTS == {"cuflash": 1, "fallback": 0, "fallback_reasons": {}}
    if grad:
        dout = torch.randn(want.shape, dtype=torch.float64, generator=generator)
        grads = torch.autograd.grad(got, (q, k, v), dout)
        want_grads = torch.autograd.grad(want, (q, k, v), dout)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, **TOLERANCE[torch.float64])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_a_static_cache_step_runs_on_the_decode_kernel(dtype, monkeypatch):
    """On the GPU a half-precision decoding step over a static cache (rows filled to 37 and 64 of
    64 slots, GQA 8/2, D 128) is the decode kernel's: its launch ran (the first call's full path,
    then the kept signature's), both calls give the same bits, within the tolerance rule of SDPA
    in float64 over the same mask (baseline: SDPA in the same dtype)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from tolerance import assert_close
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from cuflash._gpu import decode

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 4

    launched = []
    launch = decode._Layout.launch
    monkeypatch.setattr(decode._Layout, "launch", lambda self, *args: launched.append(1) or launch(self, *args))
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch_dtype, generator=generator)
    k, v = (torch.randn(2, 2, 64, 128, device="cuda", dtype=torch_dtype, generator=generator) for _ in range(2))
    mask = (torch.arange(64, device="cuda")[None, :] < torch.tensor([[37], [64]], device="cuda"))[:, None, None, :]
    with torch.inference_mode():
        first, _ = hf.attention_forward(Module(), q, k, v, mask, scaling=128 ** -0.5)
        second, _ = hf.attention_forward(Module(), q, k, v, mask.clone(), scaling=128 ** -0.5)
        want, _ = sdpa_attention_forward(Module(), q.double(), k.double(), v.double(), mask, scaling=128 ** -0.5)
        plain, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=128 ** -0.5)
    assert len(launched) == 2 and torch.equal(first, second)
    pytest.importorskip("ml_dtypes")  # (numpy's name for bfloat16)
    assert_close(*(x.double().cpu().numpy() for x in (first, want)), dtype=dtype, baseline=plain.double().cpu().numpy())


# --- inside torch.compile ------------------------------------------------------------------------


def _compile_counting(function):
    """torch.compile(fullgraph=True) of ``function`` through a backend that counts the graphs it
    compiles and the operators they call (the graph runs as traced, no code generation); the
    counter's ``calls`` lists each call's ``(operator, args, kwargs)``."""
    import torch._dynamo.testing

    targets = []

    class Counter(torch._dynamo.testing.CompileCounter):
        calls = []

        def __call__(self, graph_module, example_inputs):
            nodes = [node for node in graph_module.graph.nodes if node.op == "call_function"]
            targets.extend(str(node.target) for node in nodes)
            self.calls.extend((str(node.target), node.args, node.kwargs) for node in nodes)
            return super().__call__(graph_module, example_inputs)

    torch._dynamo.reset()  # (a model compiled before would leave its graphs and dynamic sizes to this one)
    counter = Counter()
    return torch.compile(function, backend=counter, fullgraph=True), counter, targets


def _static_cache_decode(model, ids, steps, forward, device, tokens=None):
    """Decoding over transformers' StaticCache: the prompt eagerly, then ``steps`` tokens through
    ``forward`` (the model's forward, compiled or not), greedy or the given ``tokens`` (B, steps);
    (the last logits of each call, the tokens fed)."""
    with torch.no_grad():
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        out = model(ids, past_key_values=cache, use_cache=True)
        logits, fed = [out.logits[:, -1].clone()], []
        for step, position in enumerate(range(ids.shape[1], ids.shape[1] + steps)):
            token = logits[-1].argmax(-1, keepdim=True) if tokens is None else tokens[:, step:step + 1]
            fed.append(token)
            out = forward(token, past_key_values=out.past_key_values, use_cache=True,
                          cache_position=torch.tensor([position], device=device))
            logits.append(out.logits[:, -1].clone())  # (a CUDA graph's next replay reuses its outputs)
    return torch.stack(logits), torch.cat(fed, dim=1)


@pytest.mark.parametrize("config", PADDING_CONFIGS)
def test_static_cache_decoding_compiles_to_one_graph_of_cuflash_ops(config):
    """transformers' recipe for fast generation, StaticCache with a compiled forward
    (``fullgraph=True``): each step's mask reaches cuflash's attention op inside the graph (no
    host read of the mask, which a graph cannot make and a CUDA graph replay would skip), as
    many graphs as the same model compiled with SDPA (one; a sliding layer's cache makes
    transformers recompile once: no recompilation of cuflash's making, as nothing cuflash.hf or
    cuflash.torch remembers is read while tracing), and the logits of every step are SDPA's."""
    dtype = torch.float64
    reference, ours = model_pair(config(), dtype)
    ids = random_ids(2, 7)
    forward_ref, counter_ref, _ = _compile_counting(reference.forward)
    want, _ = _static_cache_decode(reference, ids, 5, forward_ref, "cpu")
    forward, counter, targets = _compile_counting(ours.forward)
    got, _ = _static_cache_decode(ours, ids, 5, forward, "cpu")
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert counter.frame_count == counter_ref.frame_count <= 2
    assert targets.count("cuflash.attention_fwd") == LAYERS * counter.frame_count
    assert not any("scaled_dot" in t for t in targets)
    # (the eager prompt's calls only: a compiled graph's calls are not counted)
    assert hf.COUNTS == {"cuflash": LAYERS, "fallback": 0, "fallback_reasons": {}}


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_training_steps_compile_once(padded):
    """A compiled training step (loss and backward, ``fullgraph=True``) of a causal batch, left-
    and right-padded or not: one graph for three steps, cuflash's op in it (the padded batch's
    mask itself: its sequences' pattern would need a host read), and the loss and gradients of
    the same steps compiled with SDPA."""
    dtype = torch.float64
    reference, ours = model_pair(llama_config(), dtype)
    ids = random_ids(2, 9)
    mask = _padding_mask(ids) if padded else torch.ones_like(ids)
    results = []
    for model in (reference, ours):
        step_function, counter, targets = _compile_counting(
            lambda ids, mask, model=model: model(ids, attention_mask=mask, labels=ids).loss)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss = step_function(ids, mask)
            loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, counter.frame_count, targets))
    (loss_ref, grads_ref, _, _), (loss, grads, frames, targets) = results
    torch.testing.assert_close(loss, loss_ref, **TOLERANCE[dtype])
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item() or 1.0
        torch.testing.assert_close(grads[name] / scale, grads_ref[name] / scale, **TOLERANCE[dtype], msg=name)
    assert frames == results[0][2] == 1 and targets.count("cuflash.attention_fwd") == LAYERS
    assert hf.COUNTS["fallback"] == 0


def _compiled_step_calls(reference, ours, ids, mask=None):
    """One compiled training step (loss and backward, one graph) of each model on ``ids`` (padded
    by ``mask``: the padded positions left out of the loss, where the conventions for rows that
    see no key differ); asserts the loss and gradients agree (float64) and returns the arguments
    of each cuflash attention call in ours' graph, one per layer."""
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    results = []
    for model in (reference, ours):
        step_function, counter, _ = _compile_counting(
            lambda ids, mask, model=model: model(ids, attention_mask=mask, labels=labels).loss)
        loss = step_function(ids, mask)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, counter))
    (loss_ref, grads_ref, _), (loss, grads, counter) = results
    tolerance = TOLERANCE[torch.float64]
    torch.testing.assert_close(loss, loss_ref, **tolerance)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        scale = grads_ref[name].abs().max().item() or 1.0
        torch.testing.assert_close(grads[name] / scale, grads_ref[name] / scale, **tolerance, msg=name)
    calls = [args for target, args, _ in counter.calls if target == "cuflash.attention_fwd"]
    assert len(calls) == LAYERS and counter.frame_count == 1
    return calls


@pytest.mark.parametrize("config", PADDING_CONFIGS)
def test_compiled_training_step_without_padding_runs_causal_without_a_mask(config):
    """A compiled training step given no attention mask (no padding, no cache): the causal (or
    causal sliding-window) mask is skipped inside the graph as in eager, where sdpa_mask would
    materialise B x L x L booleans while tracing (and every layer would read them, all tiles
    computed): cuflash's op gets no mask and runs causal (top-left, as Lq = Lk; the window of a
    sliding-window model), with SDPA's loss and gradients."""
    reference, ours = model_pair(config(), torch.float64)
    window = (4, 0) if getattr(ours.config, "sliding_window", None) is not None else (-1, -1)
    for args in _compiled_step_calls(reference, ours, random_ids(2, 9)):  # (q, k, v, scale, causal, wl, wr, ..., mask)
        assert args[4] == "top_left" and tuple(args[5:7]) == window and args[-2:] == (None, None)


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("route", ["eager", "compiled", "compiled-fallback"])
def test_two_dimensional_mask_is_causal_with_those_keys_visible(route, sliding_window, monkeypatch):
    """mask_function's traced form of a padded causal batch, a ``(B, Lk)`` boolean mask, means the
    causal rule (and the layer's sliding window) with those keys visible, whichever way
    attention_forward runs it: eagerly (a direct call), compiled (causal kernels with the keys'
    mask) or compiled but falling back to SDPA (the full mask rebuilt for it): SDPA's result with
    the ``(B, 1, L, L)`` mask sdpa_mask builds."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64, generator=generator)
    k, v = (torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    visible = torch.ones(2, 7, dtype=torch.bool)
    visible[1, 4:] = False  # right padding: every query still sees a key
    rule = torch.ones(7, 7, dtype=torch.bool).tril()
    if sliding_window is not None:
        rule &= torch.ones(7, 7, dtype=torch.bool).triu(1 - sliding_window)  # kv_idx > q_idx - sliding_window
    want, _ = sdpa_attention_forward(Module(), q, k, v, rule & visible[:, None, None, :], scaling=0.3)
    if route == "compiled-fallback":
        monkeypatch.setattr(hf, "_unsupported", lambda *args: "a reason to fall back")
    call = lambda q, k, v, visible: hf.attention_forward(  # noqa: E731
        Module(), q, k, v, visible, scaling=0.3, sliding_window=sliding_window)[0]
    if route != "eager":
        call, counter, targets = _compile_counting(call)
    got = call(q, k, v, visible)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float64])
    if route != "eager":
        assert ("cuflash.attention_fwd" in targets) == (route == "compiled")


def _family_config(name, **extra):
    """A tiny config of transformers' ``name`` (skipped where this transformers lacks it)."""
    config_class = getattr(transformers, name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return config_class(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                        num_hidden_layers=LAYERS, vocab_size=VOCAB, initializer_range=INIT, **extra)


COMPILED_FAMILIES = [
    pytest.param(lambda: _family_config("Qwen3Config", head_dim=16), id="qwen3"),
    pytest.param(lambda: _family_config("Qwen2Config", use_sliding_window=True, sliding_window=5, max_window_layers=1),
                 id="qwen2-sliding-layer"),
    pytest.param(lambda: _family_config("GemmaConfig", head_dim=16), id="gemma"),
    pytest.param(lambda: _family_config("Gemma3TextConfig", head_dim=16, sliding_window=5), id="gemma3"),
    pytest.param(lambda: _family_config("Olmo2Config"), id="olmo2"),
    pytest.param(lambda: _family_config("Cohere2Config", sliding_window=5), id="cohere2"),
]


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("config", COMPILED_FAMILIES)
def test_compiled_training_steps_of_more_families_take_the_shortcuts(config, padded):
    """More families' compiled training steps (full and sliding-window layers, padded or not):
    SDPA's loss and gradients, and no B x L x L mask in the graph: each layer's cuflash call is
    causal, with the window of a sliding layer, and at most the keys' mask."""
    reference, ours = model_pair(config(), torch.float64)
    ids = random_ids(2, 9)
    calls = _compiled_step_calls(reference, ours, ids, _padding_mask(ids) if padded else None)
    for args in calls:  # (q, k, v, scale, causal, window_left, window_right, ..., bias, mask)
        assert args[4] == "top_left" and args[6] in (-1, 0) and args[-2] is None
        assert (args[-1] is not None) == padded
        if padded:
            assert tuple(args[-1].meta["example_value"].shape) == (2, 1, 1, 9)
    windows = {args[5] for args in calls}
    assert windows <= {-1, 4} and (4 in windows) == (getattr(ours.config, "sliding_window", None) is not None)


def test_two_dimensional_mask_with_fewer_queries_than_keys_is_refused():
    """The 2-D form stands for a batch without a cache (as many queries as keys): given for a
    decoding step it would not say where the queries sit, so it is refused, naming the mask."""
    class Module(torch.nn.Module):
        is_causal = True

    q, k = torch.randn(1, 2, 1, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="2-D attention_mask .*1 queries"):
        hf.attention_forward(Module(), q, k, k, torch.ones(1, 5, dtype=torch.bool), scaling=0.3)


@pytest.mark.parametrize("config", PADDING_CONFIGS)
def test_compiled_padded_training_step_runs_causal_with_the_keys_mask(config):
    """A compiled training step of a left- and right-padded batch: transformers' causal mask is
    not materialised (B x L x L booleans every layer would read, all tiles computed); cuflash's
    op gets the causal rule (and a sliding-window model's window) and the padding as a key mask
    ``(B, 1, 1, L)``, with SDPA's loss and gradients on the real tokens."""
    reference, ours = model_pair(config(), torch.float64)
    ids = random_ids(2, 9)
    mask = _padding_mask(ids)
    sliding = getattr(ours.config, "sliding_window", None) is not None
    for args in _compiled_step_calls(reference, ours, ids, mask):  # (q, k, v, scale, causal, ..., bias, mask)
        mask_shape = tuple(args[-1].meta["example_value"].shape)
        assert args[4] == "top_left" and mask_shape == (2, 1, 1, 9)
        assert tuple(args[5:7]) == ((4, 0) if sliding else (-1, -1))  # (window_left, window_right)


def _compiled_losses_match(reference, ours, loss_of, *inputs, patch_ours=None):
    """``loss_of(model, *inputs)`` compiled (fullgraph, counting backend) for each model and
    backpropagated; asserts ours' loss and every gradient are the reference's (float64) and
    returns ours' counter. ``patch_ours``: called before ours is compiled."""
    results = []
    for model in (reference, ours):
        if model is ours and patch_ours is not None:
            patch_ours()
        step, counter, _ = _compile_counting(lambda *args, model=model: loss_of(model, *args))
        loss = step(*inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        counter))
    (loss_ref, grads_ref, _), (loss, grads, counter) = results
    torch.testing.assert_close(loss, loss_ref, **TOLERANCE[torch.float64])
    assert_gradients_match(grads, grads_ref)
    return counter, grads


def test_compiled_encoder_padded_batch_runs_with_the_keys_mask(monkeypatch):
    """A compiled BERT step on a padded batch (fullgraph): the bidirectional mask is the padding
    alone, ``(B, 1, 1, L)`` (no B x L x L booleans built in the graph: sdpa_mask is never called),
    and the loss and gradients are those of the model's SDPA implementation."""
    reference, ours = _model_pair_of(*ENCODERS[0].values[0](), "cpu")
    ids = random_ids(3, 11)
    mask = _padding_mask(ids, left=2, right=4)
    weights = torch.randn(3, 11, ours.config.hidden_size, dtype=torch.float64) * mask[..., None]
    counter, _ = _compiled_losses_match(
        reference, ours, lambda model, ids, mask: (model(ids, attention_mask=mask).last_hidden_state * weights).sum(),
        ids, mask, patch_ours=lambda: monkeypatch.setattr(hf, "sdpa_mask",
                                                          lambda **kwargs: pytest.fail("a full mask was built")))
    calls = [args for target, args, _ in counter.calls if target == "cuflash.attention_fwd"]
    assert len(calls) == LAYERS and counter.frame_count == 1
    for args in calls:  # (q, k, v, scale, causal, window_left, window_right, ..., bias, mask)
        assert args[4] == "none" and tuple(args[-1].meta["example_value"].shape) == (3, 1, 1, 11)


def test_compiled_t5_training_step_takes_the_position_bias_as_cuflashs_bias():
    """A compiled T5 training step (fullgraph) on a padded batch: every attention call is cuflash's
    op with T5's relative-position bias as its bias, and the loss and every gradient (the
    relative-attention embedding's, through dbias) are those of SDPA's model."""
    config = ENCODER_DECODERS[1].values[0]()[1]  # (T5)
    reference, ours = _model_pair_of(transformers.T5ForConditionalGeneration, config, "cpu")
    ids = random_ids(3, 13)
    mask = _padding_mask(ids, left=0, right=4)
    labels = random_ids(3, 7, seed=3)
    counter, grads = _compiled_losses_match(
        reference, ours, lambda model, ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels).loss,
        ids, mask, labels)
    assert any("relative_attention_bias" in name for name in grads)
    calls = [args for target, args, _ in counter.calls if target == "cuflash.attention_fwd"]
    assert len(calls) == 3 * LAYERS and counter.frame_count == 1
    assert all(args[-2] is not None for args in calls)  # (q, k, v, ..., sinks, bias, mask): the bias given


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_static_cache_decoding_replays_as_cuda_graphs(dtype):
    """StaticCache decoding with the forward compiled in ``mode="reduce-overhead"`` (CUDA graphs,
    fullgraph): cuflash's attention ops run inside the captured graphs and the replays give what
    the same forward compiled without graphs gives, bit for bit (no per-call host state that a
    replay would miss, no block of the graph's pool kept); in float32 every step's logits are
    those of eager decoding (where cuflash takes the kv-cache kernel) within float32 rounding. In
    bf16 the compiled model's own rounding (inductor fuses the norms, rotary and residuals) moves
    the logits by 0.1-0.5 from eager ones within six steps, SDPA's model's as much (measured with
    CPU inductor): no eager comparison there."""
    torch_dtype = getattr(torch, dtype)
    config = llama_config(heads_kv=2)
    config.hidden_size, config.num_attention_heads, config.head_dim = 256, 4, 64
    _, ours = on("cuda", *model_pair(config, torch_dtype))
    ids = random_ids(2, 7).to("cuda")
    eager, tokens = _static_cache_decode(ours, ids, 6, ours.forward, "cuda")
    compiled = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        forward = torch.compile(ours.forward, mode=mode, fullgraph=True)
        compiled[mode], _ = _static_cache_decode(ours, ids, 6, forward, "cuda", tokens=tokens)
    assert torch.equal(compiled["reduce-overhead"], compiled["default"])
    if torch_dtype == torch.float32:
        torch.testing.assert_close(compiled["default"], eager, rtol=1e-3, atol=1e-3)
