"""A kernel Variant: one instantiation of a ``cuda_src`` kernel template.

A :class:`Variant` is a frozen description of one kernel instantiation: which source in
``cuda_src/``, which element type, which head-dim tile, which tile shape, which mask kind and
for which architecture, whether the scores take modifiers, and the dynamic shared memory
that tile needs. Everything else
(lengths, strides, scale, window) is a run-time field of the params struct, so one Variant
serves every shape in its bucket. ``tiles.py`` makes them; ``kernels.py`` compiles them.
"""
from __future__ import annotations

import dataclasses

# Element type names as the kernels spell them.
CUDA_TYPES = {
    "float16": "__half",
    "bfloat16": "__nv_bfloat16",
    "float32": "float",
    "float64": "double",
}
# float32 on TF32 tensor cores: the Element of each precision= value served there.
_TF32_ELEMENTS = {"tf32": "cuflash::tc::tf32", "highest": "cuflash::tc::tf32x3"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel instantiation: the template parameters of a ``cuda_src`` kernel, and the dynamic
    shared memory its tile needs (derived from them; ``tiles.KernelSpec`` computes it)."""

    kernel: str      # file stem in cuda_src/ and the kernel's name in namespace cuflash
    dtype: str       # key of CUDA_TYPES
    head_dim: int    # tile width covering D and Dv (a bucket; inputs are zero-padded to it)
    block_m: int     # query rows per block
    block_n: int     # keys per tile
    warps: int       # warps per block
    stages: int      # K/V shared-memory pipeline depth
    has_window: bool  # causal or local window: per-element masking and skipped tiles
    arch: str        # "80", "86", "89", "90a", ...
    shared_mem: int  # dynamic shared memory bytes the kernel expects (tiles.py; checked at entry)
    # softcap, a bias, ALiBi or a mask (cuda_src/score_mod.cuh): the scores are modified before the
    # softmax instead of the scale being folded into it; always with has_window (its run-time
    # window may be unbounded), so that one flag adds one Variant per tile, not two.
    score_mods: bool = False
    # float32 on TF32 tensor cores (tile_tc.cuh's Arith): "tf32", one TF32 product (the kernel's
    # Element `cuflash::tc::tf32`); "highest", three (3xTF32, `cuflash::tc::tf32x3`). None for every
    # other Variant (its dtype decides its arithmetic).
    precision: str | None = None
    # attention dropout compiled in (cuda_src/dropout.cuh, the kernels' kDropout): the kScoreMods
    # form with the keep mask drawn, one more Variant per bucket of the families that drop.
    dropout: bool = False

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def element_type(self) -> str:
        """The kernel template's Element, as the kernels spell it."""
        return _TF32_ELEMENTS[self.precision] if self.precision else CUDA_TYPES[self.dtype]

    @property
    def name_expression(self) -> str:
        args = (
            self.element_type,
            self.head_dim,
            self.block_m,
            self.block_n,
            self.warps,
            self.stages,
            "true" if self.has_window else "false",
        ) + (("true",) if self.score_mods else ()) + (("true",) if self.dropout else ())
        return f"cuflash::{self.kernel}<{', '.join(map(str, args))}>"

    def __str__(self) -> str:
        mask = ("window" if self.has_window else "dense") + (" mods" if self.score_mods else "") + (
            " dropout" if self.dropout else "")
        return (
            f"{self.kernel}[{self.dtype}{'/' + self.precision if self.precision else ''} d{self.head_dim} {self.block_m}x{self.block_n} "
            f"w{self.warps} s{self.stages} {mask} sm_{self.arch}]"
        )


@dataclasses.dataclass(frozen=True)
class HelperKernel:
    """A kernel beside the attention Variants (merge_attention, decode_combine, key_bounds), in the
    shape ``kernels`` compiles a Variant: its source stem, the function (a template over the
    element type ``dtype``, or a plain function when dtype is None), the arch, the block size its
    launcher uses, and no dynamic shared memory."""

    kernel: str          # file stem in cuda_src/
    function: str        # its name in namespace cuflash
    dtype: str | None    # key of CUDA_TYPES: the template's element type; None: not a template
    arch: str
    threads: int
    shared_mem: int = 0

    @property
    def name_expression(self) -> str:
        element = f"<{CUDA_TYPES[self.dtype]}>" if self.dtype is not None else ""
        return f"cuflash::{self.function}{element}"

    def __str__(self) -> str:
        return f"{self.function}[{self.dtype + ' ' if self.dtype is not None else ''}sm_{self.arch}]"
