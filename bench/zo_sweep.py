"""One ZO noise sweep on a GPU against the memory bound, and the fused kernel's launch shapes.

    python bench/zo_sweep.py                       # 2^30 float16 elements on the current CUDA device
    python bench/zo_sweep.py --numel 268435456 --dtype bfloat16

For a flat tensor of --numel elements it times (median of --reps, after warm-up): `x.add_(1)` (one read and one
write of x: what a sweep cannot beat), `torch.randn` into a float32 buffer of the same size (torch's Philox alone), and
the fused sweeps of zo_triton (MeZO perturb, MeZO update, ZO-AdaMU perturb with its momentum read and update; both
updates also fused with the next step's perturbation as carry_perturbation runs them; MeZO's Rademacher perturb and
carried update) for each launch shape in --shapes. Last line: one JSON object with seconds and effective GB/s of each.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zo  # noqa: E402
import zo_triton  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timed(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 30)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shapes", default="512x4,512x8,256x4,1024x8,1024x4",
                        help="pairs-per-program x warps, comma separated")
    args = parser.parse_args()
    try:
        shapes_wanted = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes {args.shapes!r}: give PAIRSxWARPS pairs separated by commas, e.g. 512x4,1024x8")
    if any(len(shape) != 2 or min(shape) < 1 for shape in shapes_wanted):
        parser.error(f"--shapes {args.shapes!r}: give PAIRSxWARPS pairs of positive ints, e.g. 512x4,1024x8")
    if not torch.cuda.is_available() or not zo_triton.available():
        raise SystemExit("bench/zo_sweep.py needs a CUDA device and Triton")
    dtype, n = DTYPES[args.dtype], args.numel
    x = torch.randn(n, device="cuda", dtype=dtype)
    m = torch.zeros(n, device="cuda", dtype=dtype)
    amu_values = (0.9, 0.43, 0.9, 0.1, 0.9, 0.1)
    keys, amu = zo_triton.step_tensors("cuda", zo.step_seed(0, 0), zo.step_seed(0, 1), amu_values, amu_values)
    coefficients = torch.tensor([-1e-9, 1.0, 1.0, 1.0], device="cuda")   # -lr·g, 1-lr·λ, sign(g), g finite
    bytes_rw = 2 * n * x.element_size()
    report = {"device": torch.cuda.get_device_name(), "numel": n, "dtype": args.dtype,
              "add_seconds": timed(lambda: x.add_(1.0), args.reps)}
    report["randn_fp32_seconds"] = timed(torch.empty(n, device="cuda").normal_, args.reps)
    update = dict(update=True, offset_scale=-1e-3, coefficients=coefficients)
    adamu = dict(momentum=m, amu=amu, sigma=1e-8)

    def sweep(gaussian=True, **kw):  # the median time of one zo_triton.sweep over x at the current launch shape
        return timed(lambda: zo_triton.sweep(x, index=0, keys=keys, gaussian=gaussian, **kw), args.reps)

    shapes = {}
    for pairs, warps in shapes_wanted:
        shape = f"{pairs}x{warps}"
        zo_triton.PAIRS, zo_triton.NUM_WARPS = pairs, warps
        shapes[shape] = {
            "mezo_perturb": sweep(perturb_scale=1e-3),
            "mezo_update": sweep(**update),
            "adamu_perturb": sweep(perturb_scale=1e-3, **adamu),
            "adamu_update": sweep(**update, **adamu),
            # the update fused with the next step's +εu' (carry_perturbation): two directions per element
            "mezo_update_carry": sweep(**update, carry=True, perturb_scale=1e-3),
            "adamu_update_carry": sweep(**update, **adamu, carry=True, perturb_scale=1e-3),
            "mezo_perturb_rademacher": sweep(gaussian=False, perturb_scale=1e-3),
            "mezo_update_carry_rademacher": sweep(gaussian=False, **update, carry=True, perturb_scale=1e-3),
        }
        print(shape, {k: round(v * 1e3, 2) for k, v in shapes[shape].items()}, "ms", file=sys.stderr, flush=True)
    report["sweeps_seconds"] = shapes
    best = min(shapes, key=lambda s: shapes[s]["mezo_perturb"])
    report["best_shape"] = best
    report["add_GBps"] = round(bytes_rw / report["add_seconds"] / 1e9, 1)
    report["best_over_add"] = {k: round(v / report["add_seconds"], 3) for k, v in shapes[best].items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
