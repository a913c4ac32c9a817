"""Every Triton kernel dist_quant launches, compiled for a Hopper GPU (sm_90) here, without one: the interpreter
that checks their values on CPU (TRITON_INTERPRET=1) skips the compiler's own rules, such as one type per name
across the branches of a runtime `if`, which only a GPU run would otherwise reveal. Run as a module in a process
of its own (the tests' process interprets the kernels, and a kernel is interpreted or compiled for good):
`python -m tests.unit.test_kernels_compile` prints one line per kernel variant."""

import os
import subprocess
import sys
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
SIZES = {"n_blocks": "i64", "blocks_per_row": "i32", "n_segments": "i32", "n": "i32", "n_groups": "i64", "rows": "i32",
         "columns": "i32", "row_stride": "i64"}


def _variants():
    """(kernel, pointer argument types in order, constexprs) as the launchers of dist_quant.kernels use them."""
    from dist_quant.kernels import amax_triton, mx_triton, nvfp4_mse_triton, nvfp4_triton

    nv = nvfp4_triton
    for static in (False, True):
        for segmented in (False, True):
            constexprs = {"STATIC": static, "SEGMENTED": segmented, "SEGMENTS": 128 if segmented else 1}
            yield (nv._nvfp4_fake_quant_kernel, ["*bf16", "*bf16", "*fp32", "*fp32", "*i32"],
                   {**constexprs, "BLOCKS": nv.FAKE_QUANT_BLOCKS})
            yield (nv._nvfp4_quantize_kernel, ["*bf16", "*u8", "*u8", "*fp32", "*fp32", "*i32"],
                   {**constexprs, "BLOCKS": nv.QUANTIZE_BLOCKS})
    for segmented in (False, True):
        yield (nv._nvfp4_dequantize_kernel, ["*u8", "*u8", "*fp32", "*bf16", "*i32"],
               {"SEGMENTED": segmented, "BLOCKS": nv.QUANTIZE_BLOCKS})
    yield nvfp4_mse_triton._nvfp4_mse_kernel, ["*bf16", "*fp32", "*fp32"], {"BLOCKS": nvfp4_mse_triton.MSE_BLOCKS}
    mx = mx_triton
    for fake in (False, True):
        out = "*bf16" if fake else "*u8"
        yield mx._mxfp8_kernel, ["*bf16", out, "*u8"], {"FAKE": fake, "BLOCKS": mx.MX_BLOCKS}
        yield mx._mxfp4_kernel, ["*bf16", out, "*u8"], {"FAKE": fake, "BLOCKS": mx.MX_BLOCKS}
        for ue8m0 in (False, True):
            yield (mx._fp8_group_kernel, ["*bf16", out, "*fp32"],
                   {"GROUP": 128, "UE8M0": ue8m0, "FAKE": fake, "BLOCKS": mx.GROUP_BLOCKS})
    yield mx._fp8_tensor_kernel, ["*bf16", "*bf16", "*fp32"], {"BLOCK": mx.FP8_TENSOR_BLOCK}
    for segmented in (False, True):
        yield (amax_triton._amax_kernel, ["*bf16", "*i32", "*i32"],
               {"ROWS": amax_triton.ROWS, "COLUMNS": amax_triton.COLUMNS, "SEGMENTED": segmented})


def compile_all() -> int:
    """Compile every variant; one line each. -> number that failed."""
    failed = 0
    for kernel, pointers, constexprs in _variants():
        names = kernel.arg_names
        constexprs = {**constexprs, "INTERPRETED": False}
        scalars = [name for name in names[len(pointers):] if name not in constexprs]
        signature = {**dict(zip(names, pointers)), **{name: SIZES.get(name, "fp32") for name in scalars},
                     **{name: "constexpr" for name in constexprs}}
        label = f"{kernel.fn.__name__} {constexprs}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER)
            assert ".entry" in compiled.asm["ptx"]
            print(f"compiled {label}")
        except Exception as error:  # noqa: BLE001 - every failure reported, with its reason
            failed += 1
            print(f"FAILED {label}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
    return failed


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.unit.test_kernels_compile"], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and not any(line.startswith("FAILED") for line in lines), run.stdout + run.stderr[-3000:]
    assert sum(line.startswith("compiled") for line in lines) == 22, run.stdout


if __name__ == "__main__":
    sys.exit(1 if compile_all() else 0)
