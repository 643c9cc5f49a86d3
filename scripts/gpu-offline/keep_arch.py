"""Blank every kernel image of a CUDA library's fat binary except one architecture's machine code.

    python keep_arch.py libfaiss.so 90      # keeps sm_90's SASS; PTX and the other SASS become zeros

The file keeps its size and layout (entry headers untouched, payloads zeroed), so it still loads;
zeros compress to nothing, which is what lets faiss-gpu's 200 MB library travel to a machine
through a 64 MiB transfer (scripts/gpu-offline/prepare.sh). Only for a machine of that
architecture: any other GPU finds no usable kernel in it.
"""

import struct
import subprocess
import sys
from collections import Counter

MAGIC = 0xBA55ED50  # a fat binary container's header
PTX, SASS = 1, 2


def fatbin_section(path: str) -> tuple[int, int]:
    sections = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, check=True).stdout
    for line in sections.splitlines():
        if ".nv_fatbin" in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def keep_arch(path: str, arch: int) -> Counter:
    offset, size = fatbin_section(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        seen, p = Counter(), 0
        while p + 16 <= len(data):
            magic, _, header, body = struct.unpack_from("<IHHQ", data, p)
            if magic != MAGIC:
                p += 8  # containers are 8-byte aligned
                continue
            q, end = p + header, p + header + body
            while q + 32 <= end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, q)
                entry_arch = struct.unpack_from("<I", data, q + 28)[0]
                kept = kind == SASS and entry_arch == arch
                seen[("sass" if kind == SASS else "ptx", entry_arch, "kept" if kept else "blanked")] += 1
                if not kept:
                    start = q + entry_header
                    data[start:start + payload] = bytes(payload)
                q += entry_header + payload
            p = end
        f.seek(offset)
        f.write(data)
    if not any(k[2] == "kept" for k in seen):
        raise SystemExit(f"{path}: no sm_{arch} machine code in it: {sorted(seen)}")
    return seen


if __name__ == "__main__":
    print(sorted(keep_arch(sys.argv[1], int(sys.argv[2])).items()))
