"""The E2M1 -> e4m3 conversion of the W4A8 kernel (inline PTX in v4kernels/triton/moe.py), checked on
the CPU: the PTX text is executed by a small emulator of the instructions it uses (and, or, shl,
shr, prmt) for every byte value and every table exponent, and compared with the exact values.

Why here: the Triton interpreter has no inline PTX (the CPU tests of the kernel run its fp32 path),
so without this test the bit logic would first be exercised on a GPU."""
import inspect
import re

import pytest
import torch

from v4kernels.reference import quant as q
from v4kernels.triton import moe as tri


def _asm_text():
    src = inspect.getsource(tri._e2m1x8_to_e4m3_lut.fn)
    return re.search(r'asm="""(.*?)"""', src, re.S).group(1)


def _prmt(a, b, sel):
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel nibble i & 7) of {b, a}, or the
    sign of that byte replicated when bit 3 of the nibble is set."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        byte = pool[n & 7]
        if n & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _run_ptx(text, operands):
    """Executes the straight-line PTX of the conversion on 32-bit python ints."""
    regs = dict(operands)

    def val(tok):
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 0) & 0xFFFFFFFF

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(("{", "}", ".reg")):
            continue
        op, args = line.split(None, 1)
        args = [t.strip() for t in args.split(",")]
        d, srcs = args[0], [val(t) for t in args[1:]]
        if op == "and.b32":
            r = srcs[0] & srcs[1]
        elif op == "or.b32":
            r = srcs[0] | srcs[1]
        elif op == "shl.b32":
            r = (srcs[0] << srcs[1]) & 0xFFFFFFFF
        elif op == "shr.u32":
            r = srcs[0] >> srcs[1]
        elif op == "prmt.b32":
            r = _prmt(srcs[0], srcs[1], srcs[2])
        else:
            raise AssertionError(f"instruction not emulated: {op}")
        regs[d] = r
    return regs["$0"], regs["$1"]


def _tables(kk):
    km = kk - 1
    if km < 0:
        return 0, 0
    return (0x14100800 + km * 0x08080800) & 0xFFFFFFFF, (0x24201C18 + km * 0x08080808) & 0xFFFFFFFF


def _e4m3_value(byte):
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("kk", list(range(-2, 13)))
def test_lut_asm_exact_for_every_code(kk):
    """Every pair of E2M1 codes and sign: e4m3 = E2M1 * 2^(kk-6) exactly (kk >= 1), 0 for kk < 1."""
    text = _asm_text()
    lo, hi = _tables(kk)
    codes = torch.arange(16)
    val = q.e2m1_decode(codes).tolist()
    g = torch.Generator().manual_seed(kk + 100)
    for _ in range(64):
        p = torch.randint(0, 256, (4,), generator=g).tolist()  # 4 packed bytes: 8 codes in K order
        word = p[0] | (p[1] << 8) | (p[2] << 16) | (p[3] << 24)
        ops = {"$2": word, "$3": lo, "$4": lo, "$5": lo, "$6": lo, "$7": hi, "$8": hi, "$9": hi, "$10": hi}
        w0, w1 = _run_ptx(text, ops)
        out = [(w0 >> (8 * i)) & 0xFF for i in range(4)] + [(w1 >> (8 * i)) & 0xFF for i in range(4)]
        nib = [(p[j // 2] >> (4 * (j % 2))) & 0xF for j in range(8)]
        for j in range(8):
            want = val[nib[j]] * 2.0 ** (kk - 6) if kk >= 1 else 0.0
            got = _e4m3_value(out[j])
            assert got == want, f"kk={kk} code={nib[j]:#x}: got {got} ({out[j]:#04x}), want {want}"
            if kk >= 1 and nib[j] == 0x8:  # -0 keeps its sign (harmless either way)
                assert out[j] in (0x00, 0x80)


def test_fold_tables_match_python():
    """_fold_tables (Triton) builds the tables the emulator uses, for every exponent."""
    for kk in range(-20, 13):
        lo, hi = _tables(kk)
        if kk >= 1:
            assert lo & 0x80808080 == 0 and hi & 0x80808080 == 0  # magnitudes only: no byte overflow
            assert (hi >> 24) == 0x24 + 8 * (kk - 1)
