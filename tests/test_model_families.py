"""benchmarks/model_families.py without a GPU or transformers: the model configs bench_model builds
(``--tiny``, ``--mha``, ``--kv-heads``), so that a GQA sweep in the model measures what it says."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.model_families import FAMILIES  # noqa: E402


def _args(tiny=False, mha=False, kv_heads=None):
    return types.SimpleNamespace(tiny=tiny, mha=mha, kv_heads=kv_heads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tiny, mha, kv_heads, expected", [
    (False, False, None, (16, 8)),  # the default: GQA 16/8
    (False, True, None, (16, 16)),
    (False, False, 2, (16, 2)),
    (False, False, 1, (16, 1)),     # MQA
    (True, False, None, (4, 2)),
    (True, True, None, (4, 4)),
    (True, False, 1, (4, 1)),
])
def test_key_value_heads_follow_the_flags(family, tiny, mha, kv_heads, expected):
    config = FAMILIES[family].config(_args(tiny, mha, kv_heads))
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == expected


@pytest.mark.parametrize("kv_heads", [0, 3, 32, -2])
def test_key_value_heads_must_divide_the_query_heads(kv_heads):
    with pytest.raises(ValueError, match="--kv-heads"):
        FAMILIES["llama"].config(_args(kv_heads=kv_heads))
