"""Streamed weights (--zo_offload cpu, zo.offload) against resident ones: step time, bytes over the bus, peak memory.

For one model shape (random weights from a config: no download) and a GPU memory cap
(torch.cuda.set_per_process_memory_fraction), after --warmup steps, the median of --steps one-pass steps of
    streamed   the decoder blocks in pinned host memory, uploaded block by block on a side stream (zo.offload)
    resident   the whole model on the device, where it fits under the cap (else reported as not fitting)
and, for the streamed run, the bytes copied per step each way (Offloader.moved) against the measured host-transfer
rate (one block's bytes, pinned host -> device and back), so transfer seconds per step = bytes / rate: a step
whose time is near that is bound by the bus, one well above it hides the copies behind the compute.  Peak memory:
torch.cuda.max_memory_allocated of each run (reset before it).  The plan (parameter bytes of the resident part, of
one block, of IN_FLIGHT blocks and on the host) is counted on the meta device, so it is exact for shapes that would
not fit anywhere here (--plan_only).

Without CUDA the device is the CPU stand-in (a separate CPU copy, the same code path): the script runs end to end and
checks that the streamed weights equal the resident ones bit for bit, but its times, rates and memory are not GPU
figures: the JSON says "gpu_measured": false and every GPU figure is null.

    python bench/offload.py --shape tiny                                  # CPU: the stand-in, end to end
    python bench/offload.py --shape opt-13b --dtype float16 --memory_gib 16 --batch 16 --seq 64
    python bench/offload.py --shape opt-66b --dtype float16 --plan_only   # the memory arithmetic alone
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zo  # noqa: E402
from zo import registry as zo_methods  # noqa: E402
from zo.offload import IN_FLIGHT, Offloader, find_blocks, refusal  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# OPT shapes (the MeZO papers' models; Zhang et al. 2022, table 1) and tiny ones for the CPU; name -> OPTConfig kwargs
SHAPES = {
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, ffn_dim=36864, num_attention_heads=72),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, ffn_dim=28672, num_attention_heads=56),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, ffn_dim=20480, num_attention_heads=40),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "small": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4),
}
GB = 1e9


def config_of(shape: str):
    from transformers import OPTConfig
    s = SHAPES[shape]
    return OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=s["hidden_size"],
                     do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2, **s)


def build(config, dtype, device="cpu", init="tiled"):
    """The model of a shape with random weights. init="hf": transformers' own initialisation (one serial random draw
    per weight: minutes for a 13B model on the host); "tiled": every matrix a repeat of one seeded N(0, 0.02) tile,
    norms 1 and biases 0 (the time of a copy). Step times and bytes do not depend on the values."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    if init == "hf" or device == "meta":
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if list(model.buffers()):   # to_empty would leave them unset (rotary tables, say): the OPT shapes have none
        raise ValueError(f"{type(model).__name__} has buffers that a tiled init would leave unset; use --init hf")
    model.to_empty(device=device)
    n = 1 << 20
    tile = torch.randn(n, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(device, dtype).repeat(2)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() < 2:   # norms' scales 1, every bias 0
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            shift, flat = (i * 104729) % n, p.view(-1)   # each matrix starts elsewhere in the tile
            for start in range(0, flat.numel(), n):
                chunk = flat[start:start + n]
                chunk.copy_(tile[shift:shift + chunk.numel()])
    model.tie_weights()
    return model


def plan(config, dtype, method) -> dict:
    """Bytes of the weights and the method's state: resident, one block, IN_FLIGHT blocks, host (meta: no memory)."""
    model = build(config, dtype, "meta")
    name, blocks = find_blocks(model)
    cls, probe = zo_methods.get(method), torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    width = cls([probe], lr=1e-7).buffer_dtype(probe).itemsize   # the state's dtype (ZO-AdaMU: float32)
    per_elem = 1 + len(cls.buffers) * width / dtype.itemsize     # weight and state bytes per weight byte
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps) * per_elem / GB   # noqa: E731
    block = size(blocks[0].parameters())
    inside = {id(p) for p in blocks.parameters()}
    resident = size(p for p in model.parameters() if id(p) not in inside)
    return {"blocks": name, "layers": len(blocks), "resident_gb": round(resident, 4), "block_gb": round(block, 4),
            "in_flight_gb": round(IN_FLIGHT * block, 4), "host_gb": round(len(blocks) * block, 3),
            "streamed_gpu_gb": round(resident + IN_FLIGHT * block, 3),
            "resident_model_gb": round(resident + len(blocks) * block, 3),
            "note": "weights and optimizer state only; activations come on top in both"}


def transfer_rate(nbytes: int, device) -> dict:
    """Bytes per second of one block's worth of copies host -> device and back (pinned host memory on CUDA)."""
    cuda = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for way, (dst, src) in (("up", (dev, host)), ("down", (host, dev))):
        times = []
        for _ in range(5):
            sync(device)
            begin = time.perf_counter()
            dst.copy_(src, non_blocking=cuda)
            sync(device)
            times.append(time.perf_counter() - begin)
        out[way] = nbytes / statistics.median(times)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(model, opt, inputs, warmup, steps, device):
    def loss(m):
        logits = m(**inputs, use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 inputs["input_ids"][:, 1:].reshape(-1))
    probe = lambda: opt.forward_probe.losses(model, loss)   # noqa: E731
    times = []
    for i in range(warmup + steps):
        sync(device)
        begin = time.perf_counter()
        opt.step(probe)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def run(args) -> dict:
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype, config = DTYPES[args.dtype], config_of(args.shape)
    fraction = args.memory_fraction
    if cuda and args.memory_gib:   # a cap in GiB is the fraction of this card's memory that it is
        fraction = min(1.0, args.memory_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)
    report = {"shape": args.shape, "dtype": args.dtype, "method": args.method, "batch": args.batch, "seq": args.seq,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu stand-in (no GPU)",
              "gpu_measured": cuda, "memory_fraction": fraction if cuda else None,
              "plan": plan(config, dtype, args.method)}
    if args.plan_only:
        return report
    if cuda and fraction:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    base = build(config, dtype, init=args.init)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    make = lambda m: zo_methods.get(args.method)(zo.param_groups_for_model(m, 0.0), lr=1e-7, eps=1e-3,   # noqa: E731
                                                 probe_mode="onepass")

    # streamed: the model itself (host memory holds one copy); on the stand-in a twin for the bit-for-bit check
    twin = None if cuda else copy.deepcopy(base)
    model, base = base, None
    offloader = Offloader(model, device)
    opt = make(model)
    opt.attach(model)
    offloader.bind(opt)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    moved = dict(offloader.moved)
    streamed = timed_steps(model, opt, inputs, args.warmup, args.steps, device)
    n = args.warmup + args.steps
    per_step = {k: (offloader.moved[k] - moved[k]) / n for k in moved}
    offloader.flush()
    memory = offloader.memory()
    rate = transfer_rate(memory["block"], device)
    report["streamed"] = {
        "step_seconds": round(streamed, 5),
        "bytes_up_per_step": int(per_step["up"]), "bytes_down_per_step": int(per_step["down"]),
        "rate_up_gb_s": round(rate["up"] / GB, 3), "rate_down_gb_s": round(rate["down"] / GB, 3),
        "transfer_seconds_per_step": round(max(per_step["up"] / rate["up"], per_step["down"] / rate["down"]), 5),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3) if cuda else None,
        "memory_bytes": memory}
    weights = [p.detach().clone() for p in model.parameters()] if twin is not None else None
    del model, opt, offloader

    # resident, where it fits
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = twin if twin is not None else build(config, dtype, device, args.init)   # on CUDA: other random values
        opt = make(model)
        opt.attach(model)
        resident = timed_steps(model, opt, inputs, args.warmup, args.steps, device)
        report["resident"] = {"step_seconds": round(resident, 5), "fits": True,
                              "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3) if cuda else None}
        report["streamed_over_resident"] = round(streamed / resident, 3)
        report["equal_weights"] = (None if twin is None else   # the twin started from the same weights
                                   all(torch.equal(a, b.detach()) for a, b in zip(weights, model.parameters())))
    except torch.OutOfMemoryError:
        report["resident"] = {"fits": False, "step_seconds": None, "peak_gpu_gb": None}
    if not cuda:
        report["note"] = ("no GPU: the CPU stand-in ran the streamed code path; step times, transfer rates (a host "
                          "memcpy, not PCIe) and memory are not GPU figures; GPU figures unmeasured")
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--method", default="mezo", help="an element-wise ZO method (mezo, zo_adamu, ...)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory_fraction", type=float, default=None,
                        help="GPU memory cap, a fraction of the device's (torch.cuda.set_per_process_memory_fraction)")
    parser.add_argument("--memory_gib", type=float, default=None,
                        help="GPU memory cap in GiB (turned into --memory_fraction of this card)")
    parser.add_argument("--init", default="tiled", choices=("tiled", "hf"),
                        help="weights: a repeated seeded tile (seconds at any size) or transformers' init (minutes "
                             "for 13B on the host); the figures do not depend on the values")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"), help="cpu: the stand-in even with CUDA")
    parser.add_argument("--plan_only", action="store_true", help="the memory arithmetic alone (meta device)")
    args = parser.parse_args()
    if args.method not in zo_methods.OPTIMIZERS or refusal(zo_methods.get(args.method)):
        why = refusal(zo_methods.get(args.method)) if args.method in zo_methods.OPTIMIZERS else "unknown method"
        parser.error(f"--method {args.method}: {why}; choose an element-wise one: "
                     f"{', '.join(n for n, c in zo_methods.OPTIMIZERS.items() if not refusal(c))}")
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.memory_fraction is not None and args.memory_gib is not None:
        parser.error("--memory_fraction and --memory_gib both cap the GPU memory; give one")
    if args.memory_gib is not None and args.memory_gib <= 0:
        parser.error(f"--memory_gib {args.memory_gib}: must be > 0")
    if args.memory_fraction is not None and not 0 < args.memory_fraction <= 1:
        parser.error(f"--memory_fraction {args.memory_fraction}: must lie in (0, 1]")
    report = run(args)
    for key, value in report.items():
        if key not in ("plan", "streamed", "resident"):
            continue
        print(f"{key}: {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
