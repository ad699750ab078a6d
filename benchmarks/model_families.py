"""The model families of bench_model.py: each one's transformers config (random weights, no download),
which attention backends make sense for it, and the backend the others are checked against.

Imports nothing (bench_model imports it). A family's config is a plain dict, so that the record
keeps it as it was built: ``getattr(transformers, family.config_class)(**config)``.

* ``llama``: ``LlamaConfig``; 8 layers, hidden 2048, 16 query / 8 key-value heads of 128,
  intermediate 5632, vocab 32000. Every backend computes the same attention; the reference is
  ``sdpa``.
* ``gemma2``: ``Gemma2Config`` at the same sizes, Gemma-2's attention otherwise:
  ``attn_logit_softcapping=50`` (``s = 50 tanh(s / 50)`` on every score), ``final_logit_softcapping=30``,
  ``query_pre_attn_scalar`` = head dim (scale ``1/sqrt(128)``), sliding-window layers (window 4096,
  Gemma-2's own) alternating with global ones (layer 0 slides), intermediate 4 x hidden (8192,
  Gemma-2 9B's ratio), tied embeddings. Head dim 128 (Gemma-2 27B's; 2B/9B have 256): on Hopper
  bf16 both the forward (``fwd_wgmma_ws``) and the backward (``bwd_dkdv_wgmma_ws``) run the
  wgmma kernels at d128, while a d256 backward runs the ``mma.sync`` kernels. At 2 x 4096
  tokens the window covers every causal key (the sliding layers compute what the global ones
  do; transformers still hands SDPA and eager a materialised mask there, as it does for a real
  Gemma-2 at 4096 tokens); at 1 x 32768 it really slides. SDPA cannot softcap: transformers 5.x's
  ``sdpa`` integration takes ``softcap`` into ``**kwargs`` and drops it without a warning, so
  ``sdpa`` computes other math here and is kept only as a speed reference; the backends with
  Gemma-2's semantics are ``eager`` (the reference) and ``flex_attention`` (softcap as a
  ``score_mod``, ``torch.compile``d; CUDA only here).
"""
from __future__ import annotations

import dataclasses

NO_SOFTCAP = ("other math: no attention-logit softcap (SDPA cannot softcap; transformers' sdpa integration "
              "drops Gemma-2's softcap without a warning): a speed reference, not judged against the reference")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: str                 # the transformers config class
    own: object                       # (shared sizes, tiny) -> the family's own config entries
    backends: tuple[str, ...]         # the default --backends, the reference first
    allowed: tuple[str, ...]          # what --backends may name
    reference: str                    # the correctness reference (runs first)
    compare: tuple[str, ...]          # the table's "x vs ..." columns
    other_math: dict = dataclasses.field(default_factory=dict)   # backend -> what it computes instead
    cuda_only: dict = dataclasses.field(default_factory=dict)    # backend -> why it skips the CPU

    def config(self, args) -> dict:
        """The config dict at ``--tiny``/``--mha``/``--kv-heads`` (bench_model adds --layers and the
        position limit)."""
        config = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128) if args.tiny else dict(
            num_hidden_layers=8, hidden_size=2048, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, vocab_size=32000)
        heads = config["num_attention_heads"]
        kv_heads = getattr(args, "kv_heads", None)
        if args.mha or kv_heads is not None:
            kv_heads = heads if args.mha else kv_heads
            if kv_heads < 1 or heads % kv_heads:
                raise ValueError(f"--kv-heads must divide the {heads} query heads, got {kv_heads}")
            config["num_key_value_heads"] = kv_heads
        config.update(self.own(config, args.tiny))
        return config


def _llama(config: dict, tiny: bool) -> dict:
    return dict(intermediate_size=128 if tiny else 5632)


def _gemma2(config: dict, tiny: bool) -> dict:
    # The tiny window (64) is to the tiny shapes (2x64, 1x128) what 4096 is to 2x4096 and 1x32768.
    return dict(intermediate_size=4 * config["hidden_size"], query_pre_attn_scalar=config["head_dim"],
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=64 if tiny else 4096)


SDPA_BACKENDS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
FLEX_CPU = ("flex_attention compiles its kernels with torch.compile and is measured on CUDA only "
            "(skipped on the CPU)")

FAMILIES = {
    "llama": Family("llama", "LlamaConfig", _llama,
                    backends=("sdpa", "cuflash", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"),
                    allowed=("cuflash", *SDPA_BACKENDS, "eager", "flex_attention"), reference="sdpa",
                    compare=("sdpa_flash", "sdpa"), cuda_only={"flex_attention": FLEX_CPU}),
    "gemma2": Family("gemma2", "Gemma2Config", _gemma2,
                     backends=("eager", "cuflash", "flex_attention", "sdpa"),
                     allowed=("eager", "cuflash", "flex_attention", *SDPA_BACKENDS), reference="eager",
                     compare=("eager", "flex_attention", "sdpa"),
                     other_math={name: NO_SOFTCAP for name in SDPA_BACKENDS}, cuda_only={"flex_attention": FLEX_CPU}),
}
