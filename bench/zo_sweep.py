"""One ZO noise sweep on a GPU against the memory bound, and the fused kernel's launch shapes.

    python bench/zo_sweep.py                       # 2^30 float16 elements on the current CUDA device
    python bench/zo_sweep.py --numel 268435456 --dtype bfloat16

For a flat tensor of --numel elements it times (median of --reps, after warm-up): `x.add_(1)` (one read and one
write of x: what a sweep cannot beat), `torch.randn` into a float32 buffer of the same size (torch's Philox alone), and
the fused sweeps of zo_triton (MeZO perturb, MeZO update, ZO-AdaMU perturb with its momentum read and update; both
updates also fused with the next step's perturbation as carry_perturbation runs them; MeZO's Rademacher perturb and
carried update) for each launch shape in --shapes. Last line: one JSON object with seconds and effective GB/s of each.

    python bench/zo_sweep.py --cpu_compile --threads 1   # CPU: the C sweeps against torch.compile of the torch path
    python bench/zo_sweep.py --cpu_sweeps --threads 1                      # CPU: the sweeps of the optimizers

--cpu_compile measures option (a) of the core's design on CPU: the torch reference of MeZO's perturb and update
sweeps (zo_noise's counter noise in torch operations, with a tensor key so one compiled graph serves every tensor)
compiled by torch.compile (inductor, C++), against the C kernels emitted from the rule (zo_cpu), on every tensor of the
embedded model: the compile time, the seconds per sweep, and whether the results are bit-identical (elements that
differ, and by how many ulps at most).
--cpu_sweeps times, on the embedded model's tensors, MeZO's and ZO-AdaMU's sweeps through their public API only: a
probe with a constant loss (two perturb sweeps) and the step after it (one update sweep), interleaved over --reps
rounds; medians, seconds per sweep (another commit's steps: bench/zo_step.py --baseline COMMIT).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zo  # noqa: E402
from zo import noise as zo_noise  # noqa: E402
from zo.backends import triton as zo_triton  # noqa: E402

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


def _torch_noise(key: torch.Tensor, n: int) -> torch.Tensor:
    """zo_noise.counter_noise(key, 0, n, "gaussian") with the key as a 0-dim int64 tensor (signed), so torch.compile
    builds one graph for every tensor instead of specialising on each key."""
    i = torch.arange((n + 1) // 2, dtype=torch.int64)
    z = (i + 1) * (zo_noise.GOLDEN - (1 << 64)) + key
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * (zo_noise.FMIX1 - (1 << 64))
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * (zo_noise.FMIX2 - (1 << 64))
    h = z ^ ((z >> 31) & ((1 << 33) - 1))
    z0, z1 = zo_noise.box_muller(h)
    return torch.stack([z0, z1], -1).view(-1)[:n]


def _perturb(x, key, a):
    return x + _torch_noise(key, x.numel()) * a


def _update(x, key, c, decay, coef):
    u = _torch_noise(key, x.numel())
    y = x + u * c
    return y * decay + u * coef


def cpu_compile(args):
    """Option (a) on CPU: torch.compile of the torch sweeps vs the C kernels, on the embedded model's tensors."""
    import models
    torch.set_num_threads(args.threads)
    model = models.load_model(models.EMBEDDED_ALIAS)
    optimizer = zo.get("mezo")(zo.param_groups_for_model(model, 0.0), lr=1e-7, eps=1e-3)
    params = [p for group in optimizer.param_groups for p in group["params"]]   # the noise index is this order
    start = [p.detach().clone().view(-1) for p in params]
    # the C path: a probe (+εu, then -2εu; the weights at +εu are read inside the closure), then the update with
    # g = 0 (restore, decay 1); the first step is a warm-up (kernel library load and self-test)
    for warm in (True, False):
        for p, x in zip(params, start):
            p.data.view(-1).copy_(x)
        seen, optimizer.timings = [], []
        optimizer.probe(lambda: seen.append([p.detach().clone().view(-1) for p in params]) or torch.tensor(0.0))
        before_update = [p.detach().clone().view(-1) for p in params]
        optimizer.step()
    c_perturb, c_update = optimizer.timings[0][1], optimizer.timings[2][1]
    after_update = [p.detach().clone().view(-1) for p in params]
    seed = zo.step_seed(0, optimizer.step_count - 1)   # the measured step's
    keys = [zo_noise.counter_key(seed, i, 0) for i in range(len(params))]
    keys = [torch.tensor(k - (1 << 64) if k >= 1 << 63 else k) for k in keys]
    report = {"device": f"cpu ({os.cpu_count()} cores, torch threads {args.threads})", "tensors": len(params),
              "numel": sum(p.numel() for p in params), "c_kernel_seconds": {"perturb": c_perturb, "update": c_update},
              "load_average": os.getloadavg()}
    # torch's CPU sqrt is not correctly rounded, and the numpy one zo_noise uses cannot be traced: the compiled
    # graph takes torch.sqrt, whose lowering inductor chooses
    cases = (("perturb", _perturb, start, (1e-3,), seen[0]),
             ("update", _update, before_update, (1e-3, 1.0, -0.0), after_update))   # from θ-εu: +εu, g = 0
    with mock.patch.object(zo_noise, "sqrt_rn", torch.sqrt):
        for name, fn, inputs, extra, want in cases:
            compiled = torch.compile(fn, dynamic=True)
            begin = time.perf_counter()
            outs = [compiled(x, k, *extra) for x, k in zip(inputs, keys)]
            first = time.perf_counter() - begin
            begin = time.perf_counter()
            outs = [compiled(x, k, *extra) for x, k in zip(inputs, keys)]
            steady = time.perf_counter() - begin
            differ = sum(int((o != w).sum()) for o, w in zip(outs, want))
            ulps = max(int((o.view(torch.int32) - w.view(torch.int32)).abs().max()) for o, w in zip(outs, want))
            report[f"compiled_{name}"] = {"first_pass_seconds": round(first, 3), "sweep_seconds": round(steady, 4),
                                          "compile_seconds": round(first - steady, 3), "elements_differing": differ,
                                          "max_ulps": ulps, "bit_identical": differ == 0}
    print(json.dumps(report))


def cpu_sweeps(args):
    """The sweeps of the current optimizers (and of --baseline's), interleaved, on the embedded model."""
    import models
    if args.baseline:   # another commit's code runs in a checkout of it, in its own process: zo_step.py does that
        raise SystemExit("--baseline: time another commit's steps with bench/zo_step.py --baseline COMMIT")
    torch.set_num_threads(args.threads)
    model = models.load_model(models.EMBEDDED_ALIAS)
    groups = lambda: zo.param_groups_for_model(model, 0.0)  # noqa: E731
    optimizers = {"mezo_new": zo.get("mezo")(groups(), lr=1e-7, eps=1e-3),
                  "adamu_new": zo.get("zo_adamu")(groups(), lr=1e-7, eps=1e-3,
                                                  schedule=zo.registry.AdaMUSchedule.for_max_steps(1000))}
    times = {name: {"perturb": [], "update": []} for name in optimizers}
    for rep in range(args.reps + 1):   # the first round is a warm-up (library loads, momentum allocation)
        for name, optimizer in optimizers.items():
            begin = time.perf_counter()
            optimizer.probe(lambda: torch.tensor(0.0))
            middle = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            if rep:
                times[name]["perturb"].append((middle - begin) / 2)
                times[name]["update"].append(end - middle)
    report = {"device": f"cpu ({os.cpu_count()} cores, torch threads {args.threads})", "reps": args.reps,
              "baseline": args.baseline, "numel": sum(p.numel() for p in model.parameters()),
              "sweep_seconds_median": {name: {kind: round(statistics.median(v), 4) for kind, v in kinds.items()}
                                       for name, kinds in times.items()},
              "load_average": os.getloadavg()}
    print(json.dumps(report))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 30)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shapes", default="512x4,512x8,256x4,1024x8,1024x4",
                        help="pairs-per-program x warps, comma separated")
    parser.add_argument("--cpu_compile", action="store_true",
                        help="CPU: torch.compile of the torch sweeps against the C kernels (the design's option a)")
    parser.add_argument("--cpu_sweeps", action="store_true",
                        help="CPU: time the optimizers' sweeps on the embedded model (with --baseline: two commits)")
    parser.add_argument("--baseline", default=None, metavar="COMMIT", help="with --cpu_sweeps: also zo.py at COMMIT")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.cpu_compile:
        return cpu_compile(args)
    if args.cpu_sweeps:
        return cpu_sweeps(args)
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
