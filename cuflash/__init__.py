"""cuflash: exact FlashAttention for CuPy, with a NumPy backend.

CUDA C kernels in ``cuda_src/`` compiled at run time with NVRTC (no build step), called on
CuPy arrays through a NumPy-like API; NumPy arrays run the same blocked algorithm on the CPU.
"""
from ._api import attention, attention_backward, attention_vjp
from ._kvcache import attention_with_kvcache
from ._merge import merge_attention
from ._varlen import attention_varlen, attention_varlen_backward

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "attention_vjp", "attention_varlen", "attention_varlen_backward",
           "attention_with_kvcache", "merge_attention", "__version__"]
