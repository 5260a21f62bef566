"""Where inference time goes: per model stage (time, GFLOP, GFLOP/s against the machine's matmul peak) and per
operator (torch.profiler).

    python benchmarks/profile_infer.py --frames 3 --warmup [--precision bf16] [--rows 40] [--no-operators]

Builds the same predictor as `infer_speed.py` (synthetic weights), optionally runs it once to warm up, then:

- stages: one run with forward hooks timing the ConvNeXt stem and stages, the pixel decoder's input
  projections, deformable encoder and FPN, and the transformer decoder with its mask prediction heads
  separately, and counting each one's minor page faults (fresh large tensors mapped and zero-filled); one
  more run under a dispatch mode counts each stage's matrix products and convolutions with
  `torch.utils.flop_counter`'s formulas (2 FLOP per multiply-add; elementwise work is not counted). GFLOP/s is that
  count over the stage's time, printed beside the fp32 / bf16 matmul peak this script measures;
- operators: one run under torch.profiler, sorted by self CPU time (and grouped by input shapes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

from clipvis.memory import enable_huge_page_allocations

enable_huge_page_allocations()  # before torch is imported, as the `clipvis` command does
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_predictor, machine_report, parse_overrides  # noqa: E402


HEADS = "transformer decoder: mask prediction heads"


def stage_modules(model) -> dict:
    """Stage name -> the modules (called one after another, never nested in each other) that make it up."""
    trunk = model.backbone.clip_model.visual.trunk
    pixel_decoder = model.sem_seg_head.pixel_decoder
    decoder = model.sem_seg_head.predictor
    stages = {"convnext stem": [trunk.stem]}
    stages.update({f"convnext stage {i + 1}": [stage] for i, stage in enumerate(trunk.stages)})
    stages["convnext norm_pre"] = [trunk.norm_pre]
    stages["pixel decoder: input projections"] = list(pixel_decoder.input_proj)
    stages["pixel decoder: deformable encoder"] = [pixel_decoder.transformer]
    stages["pixel decoder: FPN + mask features"] = [
        m for name, m in pixel_decoder.named_children() if name not in ("input_proj", "transformer")]
    stages["transformer decoder: layers"] = [
        *decoder.input_proj, *decoder.transformer_cross_attention_layers,
        *decoder.transformer_self_attention_layers, *decoder.transformer_ffn_layers]
    stages[HEADS] = []  # timed by wrapping `prediction_heads`: its mask matmul belongs to no module
    return stages


class _StageFlops(TorchDispatchMode):
    """Adds the FLOP of every matrix product / convolution dispatched to the innermost active stage."""

    def __init__(self, active: list):
        super().__init__()
        self.active, self.flops = active, defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.active:
            self.flops[self.active[-1]] += self.count(func, args, kwargs, out)
        return out

    @staticmethod
    def count(func, args, kwargs, out) -> int:
        # linear, conv2d and matmul reach a dispatch mode undecomposed under inference mode: 2 FLOP per multiply-add
        if func.overloadpacket in (torch.ops.aten.linear, torch.ops.aten.conv2d, torch.ops.mkldnn._linear_pointwise):
            return 2 * out.numel() * args[1][0].numel()
        if func.overloadpacket is torch.ops.aten.matmul:
            return 2 * out.numel() * args[0].shape[-1]
        formula = flop_registry.get(func.overloadpacket)
        return formula(*args, **kwargs, out_val=out) if formula is not None else 0


def stage_report(model, run, count_flops: bool):
    """Per stage of `run()`, by forward hooks: (seconds, minor page faults), or with `count_flops` the
    matrix-product and convolution FLOP; the heads' mask matmul is counted with them by wrapping
    `prediction_heads` as a whole."""
    seconds, faults, active, starts, hooks = defaultdict(float), defaultdict(int), [], [], []

    def enter(stage):
        active.append(stage)
        starts.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    def leave():
        start, start_faults = starts.pop()
        stage = active.pop()
        seconds[stage] += time.perf_counter() - start
        faults[stage] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults

    for stage, modules in stage_modules(model).items():
        for module in modules:
            hooks += [module.register_forward_pre_hook(lambda mod, args, stage=stage: enter(stage)),
                      module.register_forward_hook(lambda mod, args, out: leave())]
    decoder = model.sem_seg_head.predictor
    heads = decoder.prediction_heads

    def counted_heads(*args, **kwargs):
        enter(HEADS)
        try:
            return heads(*args, **kwargs)
        finally:
            leave()

    decoder.prediction_heads = counted_heads
    counter = _StageFlops(active) if count_flops else contextlib.nullcontext()
    try:
        with counter:
            run()
    finally:
        del decoder.prediction_heads
        for hook in hooks:
            hook.remove()
    return dict(counter.flops) if count_flops else (dict(seconds), dict(faults))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--config", default="clipvis_video_ConvNeXt-B.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--warmup", action="store_true", help="run once before profiling")
    p.add_argument("--no-operators", action="store_true", help="only the per-stage table")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from clipvis.data.synthetic import synthetic_video

    overrides = ["INPUT.MIN_SIZE_TEST", "0", "TEST.WINDOW_SIZE", str(args.frames), *parse_overrides(args.opts)]
    if args.precision != "fp32":
        overrides += ["TEST.PRECISION", args.precision]
    predictor, _ = build_predictor(args.config, overrides)
    predictor.progress = False
    frames = synthetic_video(args.frames, args.height, args.width, seed=0)
    vocab = predictor.encode_vocabulary("person; dog; red car, automobile; frisbee; tree")
    run = lambda: predictor.predict(frames, vocab)  # noqa: E731
    if args.warmup:
        run()
    machine = machine_report()
    peak = machine["matmul_gflops_bf16" if args.precision == "bf16" else "matmul_gflops_fp32"]
    seconds, faults = stage_report(predictor.model, run, count_flops=False)
    flops = stage_report(predictor.model, run, count_flops=True)
    print(json.dumps({"machine": machine, "precision": args.precision, "frames": args.frames,
                      "size": [args.height, args.width]}))
    print(f"{'stage':45s} {'s/frame':>8s} {'GFLOP/frame':>12s} {'GFLOP/s':>8s} {'of peak':>8s} {'faults/frame':>12s}")
    for stage in stage_modules(predictor.model):
        s, f = seconds.get(stage, 0.0) / args.frames, flops.get(stage, 0) / args.frames / 1e9
        rate = f / s if s else 0.0
        n = faults.get(stage, 0) / args.frames
        print(f"{stage:45s} {s:8.4f} {f:12.2f} {rate:8.0f} {rate / peak:8.0%} {n:12.0f}")
    s, f = sum(seconds.values()) / args.frames, sum(flops.values()) / args.frames / 1e9
    n = sum(faults.values()) / args.frames
    print(f"{'all stages':45s} {s:8.4f} {f:12.2f} {f / s:8.0f} {f / s / peak:8.0%} {n:12.0f}")
    if args.no_operators:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        result = run()
    print({k: round(v, 3) for k, v in result.timings.items()})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
