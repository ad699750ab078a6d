"""The machine-code oracle: did a kernel-source change alter what any Variant compiles to?

    python tests/codegen_oracle.py before.json     # on the old tree
    python tests/codegen_oracle.py after.json      # on the new one
    python tests/codegen_oracle.py --compare before.json after.json

Compiles every Variant ``tiles.all_variants`` offers for sm_80 and sm_90a with NVRTC (no GPU) and
records, per Variant, a digest of each executable section of the cubin (``.text.*``), its
parameter constants (``.nv.constant0.*``) and its attributes (``.nv.info.*``), plus registers and
spills. Equal records mean equal machine code: a refactor that passes needs no GPU run (a
symbol-table difference alone, e.g. from moving a struct between namespaces or a new template
parameter with a default, does not count: --compare matches sections by kind, not by name).
New Variants in the second record (a feature's) are listed, not counted as changes.
Not a test (it takes about a minute on two cores): the repository's check for source-only
changes of cuda_src/.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cuflash._gpu import kernels, tiles  # noqa: E402

SECTIONS = (".text.", ".nv.constant0", ".nv.info.")


# EIATTR_PARAM_CBANK (a .nv.info attribute): its first word is a symbol-table index, which moves
# when the module gains or loses symbols (a new helper template elsewhere) without any change
# to what runs; the oracle zeroes it.
_PARAM_CBANK = 0x0A


def _without_symbol_indices(info: bytes) -> bytes:
    """A .nv.info section with EIATTR_PARAM_CBANK's symbol index zeroed (entries: format byte,
    attribute byte, then a 2-byte value, or with format 4 a 2-byte size and that many bytes)."""
    out, i = bytearray(info), 0
    while i + 4 <= len(info):
        fmt, attr = info[i], info[i + 1]
        if fmt != 4:
            i += 4
            continue
        size, = struct.unpack_from("<H", info, i + 2)
        if attr == _PARAM_CBANK and size >= 4:
            out[i + 4: i + 8] = bytes(4)
        i += 4 + size
    return bytes(out)


def code_sections(cubin: bytes) -> dict[str, str]:
    """{section name: sha256 prefix} of the ELF sections that decide what runs."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx]
    strtab = cubin[names[4]: names[4] + names[5]]
    out = {}
    for name_offset, _type, _flags, _addr, offset, size, *_ in headers:
        name = strtab[name_offset: strtab.index(b"\0", name_offset)].decode()
        if name.startswith(SECTIONS):
            data = cubin[offset: offset + size]
            if name.startswith(".nv.info."):
                data = _without_symbol_indices(data)
            out[name] = hashlib.sha256(data).hexdigest()[:16]
    return out


def _record(variant):
    build = kernels.compile_offline(variant)
    return str(variant), {"sections": code_sections(build.cubin), "registers": build.registers,
                          "spills": build.spill_bytes}


def record(path: Path) -> None:
    variants = [v for arch in ("80", "90a") for v in tiles.all_variants(arch)]
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        result = dict(pool.map(_record, variants))
    path.write_text(json.dumps(result, indent=0, sort_keys=True))
    print(f"{len(result)} Variants recorded in {path}")


def by_kind(sections: dict[str, str]) -> dict[str, list[str]]:
    """Section digests by kind (.text., .nv.constant0, .nv.info.), without the mangled kernel names
    in the section names: a kernel whose template gains a parameter keeps its record when its
    code does not change."""
    out: dict[str, list[str]] = {}
    for name, digest in sections.items():
        out.setdefault(next(kind for kind in SECTIONS if name.startswith(kind)), []).append(digest)
    return {kind: sorted(digests) for kind, digests in out.items()}


def _same(a: dict, b: dict) -> bool:
    return (by_kind(a["sections"]), a["registers"], a["spills"]) == (by_kind(b["sections"]), b["registers"], b["spills"])


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    changed = sorted(name for name in old.keys() & new.keys() if not _same(old[name], new[name]))
    print(f"{len(changed)} of {len(old)} Variants compile to different code; "
          f"{len(old.keys() - new.keys())} gone, {len(new.keys() - old.keys())} new")
    for name in changed[:20]:
        a, b = by_kind(old[name]["sections"]), by_kind(new[name]["sections"])
        kinds = [kind for kind in SECTIONS if a.get(kind) != b.get(kind)]
        print(f"  {name}: {', '.join(kinds) or 'same sections'}; registers {old[name]['registers']} -> "
              f"{new[name]['registers']}, spills {old[name]['spills']} -> {new[name]['spills']}")
    return 1 if changed or not old.keys() <= new.keys() else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    record(Path(sys.argv[1]))
