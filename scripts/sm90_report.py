"""Compile one Triton kernel for a GPU architecture on a machine without one, and report what the GPU's
occupancy depends on: registers per thread, spill stack, shared memory, and the SASS instruction mix.

Triton's wheel ships ptxas and cuobjdump, so `triton.compile` can target sm_90 from a CPU machine. Use it to
compare kernel variants before spending device time (a register count that drops from 243 to 160 is worth
a GPU call; one that spills is not). Run it with the Triton version the GPU machine has (for example
`pip install triton==3.6.0` into a separate virtual environment).

    python scripts/sm90_report.py sparsezoo.kernels.sparse_attention_keys:_attn_kernel \\
        --ptr Q=bf16,K=bf16,V=bf16,POUT=bf16,PLSE=fp32,ORDER=i32,CNT=i32,START=i32,GROUPS=i32,GROUP_END=i32,PCOL=i32,KBAD=i8,BBAD=i8 \\
        --fp32 qk_scale --unit sqd,skd,svd \\
        --const G=16,KV_DIV=1,BM=64,R=16,BLOCK=128,BN=128,D=128,BD=128,PREC=tf32,HOIST=1,FAST=1,CHECKED=0 \
        --odd NK,HS,pos0

Arguments not named by --ptr, --fp32, --unit or --const are int32 scalars. --unit marks strides that the
launcher sees as 1 (Triton specialises those). Pointers and int32 arguments are marked divisible by 16, as
Triton marks them at launch when their values are (aligned tensors, strides and sizes of the benchmark
shapes); --odd NAME,... leaves an int32 argument unmarked. That mark decides vectorised loads, so leaving
it off reports a kernel the launcher never builds. Prints the kernel's line plus its most frequent SASS
instructions; --ttgir writes the TritonGPU IR. --maxnreg caps the registers per thread (Triton's launch option);
--loops also prints each loop's body (from a backward branch to its target): instruction count and mix, which
says what one iteration issues.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item) if text else {}


def _const(value: str):
    """'16' -> 16, '1' -> 1 (True/False constexprs accept 1/0), 'tf32' -> 'tf32'."""
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def loop_bodies(sass: str) -> list[str]:
    """One line per loop of the SASS: its address range, instruction count and most frequent instructions."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass)]
    lines = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = collections.Counter(o for a, o, _ in ins if int(target.group(1), 16) <= a <= addr)
            top = ", ".join(f"{o} {n}" for o, n in body.most_common(10))
            lines.append(f"  loop {int(target.group(1), 16):#x}-{addr:#x}: {sum(body.values())} instructions; {top}")
    return lines


def compile_report(target: str, ptrs: dict, fp32: set, unit: set, consts: dict, arch: int, warps: int,
                   stages: int, odd: set = frozenset(), ttgir: str | None = None, maxnreg: int | None = None,
                   loops: bool = False) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    unknown = (set(ptrs) | fp32 | unit | set(consts) | set(odd)) - set(fn.arg_names)
    if unknown:
        raise SystemExit(f"{name} has no arguments {sorted(unknown)}; it takes {fn.arg_names}")
    constexprs = {**{k: _const(v) for k, v in consts.items()}, **{k: 1 for k in unit}}
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg] = "*" + ptrs[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in fp32:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg not in odd:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    if ttgir:
        with open(ttgir, "w") as f:
            f.write(kernel.asm["ttgir"])
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    ops = collections.Counter(m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass))
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
    report = (f"{name} sm_{arch} warps {warps} stages {stages}: {regs} registers, {stack} B spill stack, "
              f"{kernel.metadata.shared} B shared memory, {sum(ops.values())} SASS instructions\n  {top}")
    return "\n".join([report, *loop_bodies(sass)]) if loops else report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", help="module:function, a @triton.jit function")
    p.add_argument("--ptr", default="", help="NAME=dtype,... pointer arguments (bf16, fp16, fp32, i32, i64, i8, fp8e4nv)")
    p.add_argument("--fp32", default="", help="NAME,... fp32 scalar arguments")
    p.add_argument("--unit", default="", help="NAME,... stride arguments equal to 1")
    p.add_argument("--const", default="", help="NAME=value,... constexpr arguments (1/0 for booleans)")
    p.add_argument("--odd", default="", help="NAME,... int32 arguments that are not multiples of 16")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--ttgir", help="write the TritonGPU IR here")
    p.add_argument("--maxnreg", type=int, help="cap the registers per thread")
    p.add_argument("--loops", action="store_true", help="also each loop body's instruction count and mix")
    a = p.parse_args(argv)
    print(compile_report(a.kernel, _pairs(a.ptr), set(filter(None, a.fp32.split(","))),
                         set(filter(None, a.unit.split(","))), _pairs(a.const), a.arch, a.warps, a.stages,
                         set(filter(None, a.odd.split(","))), a.ttgir, a.maxnreg, a.loops))


if __name__ == "__main__":
    main()
