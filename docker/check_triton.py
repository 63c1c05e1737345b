"""Compile and run a trivial Triton kernel on the GPU: proves that this Python can build kernels at run time.

    docker run --rm --gpus all medcot:latest                # the image's default command
    python docker/check_triton.py                           # anywhere with torch, triton and a CUDA GPU

Unsloth's kernels are Triton kernels compiled on first use. That needs the host's CUDA driver (passed in by the
NVIDIA Container Toolkit), a C compiler and Python's headers (Triton builds a small C launcher per kernel).
Prints one line and exits 0 on success; prints the cause and exits 1 otherwise.
"""

from __future__ import annotations

import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "FAIL: no CUDA GPU visible to torch. Run the container with a GPU (`docker run --gpus all`, or the "
            "compose services, which reserve one) on a host with the NVIDIA driver and Container Toolkit; "
            "`make doctor` checks the host.",
            file=sys.stderr,
        )
        return 1
    # Not a multiple of the block size, so that the masked tail is exercised too.
    n = 4099
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    y = torch.full_like(x, 0.5)
    out = torch.empty_like(x)
    start = time.perf_counter()
    try:
        _add_kernel[(triton.cdiv(n, 1024),)](x, y, out, n, BLOCK=1024)
        torch.cuda.synchronize()
    except Exception as e:  # any compiler or driver error is the finding to report
        print(
            f"FAIL: Triton could not compile or launch a kernel: {type(e).__name__}: {e}\n"
            "Common causes: no C compiler or Python headers in the image (gcc, python3-dev), or a host driver "
            "older than the image's CUDA version (`make doctor` checks it).",
            file=sys.stderr,
        )
        return 1
    seconds = time.perf_counter() - start
    if not torch.equal(out, x + y):
        print(f"FAIL: the kernel ran but computed wrong values (first: {out[:4].tolist()})", file=sys.stderr)
        return 1
    print(
        f"ok: Triton {triton.__version__} compiled and ran a kernel on {torch.cuda.get_device_name()} in "
        f"{seconds:.1f} s (torch {torch.__version__}, CUDA {torch.version.cuda})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
