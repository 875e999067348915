"""Checks that AVX code appears only in the AVX2 and AVX-512 kernel variants.

The default build compiles the library for baseline x86-64 and adds kernel
variants inside `#pragma GCC target` regions (src/kernels_avx*.cpp). If an
inline function or template instance compiled for AVX leaked out of its
variant, the linker could pick it for baseline callers and the binary would
fault on a CPU without AVX. This script disassembles a linked binary and
fails if a function outside namespaces isa_avx2 / isa_avx512 uses a ymm or
zmm register, or if an isa_avx2 function uses a zmm register.

Usage: check_isa_code.py OBJDUMP BINARY
"""

import re
import subprocess
import sys

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def main() -> int:
    objdump, binary = sys.argv[1], sys.argv[2]
    listing = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", binary],
        check=True, capture_output=True, text=True).stdout
    function = ""
    offenders = {}
    variant_functions = 0
    for line in listing.splitlines():
        match = FUNCTION.match(line)
        if match:
            function = match.group(1)
            if "isa_avx2::" in function or "isa_avx512::" in function:
                variant_functions += 1
            continue
        uses_zmm = "%zmm" in line
        uses_ymm = "%ymm" in line
        if not (uses_zmm or uses_ymm):
            continue
        if "isa_avx512::" in function:
            continue
        if "isa_avx2::" in function and not uses_zmm:
            continue
        offenders.setdefault(function, line.strip())
    if variant_functions == 0:
        print("check_isa_code: no isa_avx2/isa_avx512 functions in "
              f"{binary}; is this a -Dsimd=auto build?")
        return 1
    for function, line in sorted(offenders.items()):
        print(f"AVX code outside its variant: {function}: {line}")
    print(f"check_isa_code: {variant_functions} variant functions, "
          f"{len(offenders)} offenders")
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
