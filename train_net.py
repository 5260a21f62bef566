#!/usr/bin/env python
"""Train or evaluate CLIP-VIS with the original's command line.

    python train_net.py --config-file configs/clipvis_video_ConvNeXt-B.yaml --eval-only \
        MODEL.WEIGHTS ckpt.pth DATASETS.TEST '("lvvis_val",)'
    python train_net.py --config-file configs/clipvis_ConvNeXt-B.yaml --num-gpus 8
    torchrun --nproc-per-node 2 train_net.py --config-file ... --eval-only MODEL.WEIGHTS ckpt.pth

Trailing KEY VALUE pairs override the config. `--num-gpus N` starts N local processes (gloo on CPU, NCCL
on CUDA); under torchrun the processes are already there. SOLVER.IMS_PER_BATCH is the global batch.

Training writes OUTPUT_DIR/model_XXXXXXX.pth every SOLVER.CHECKPOINT_PERIOD iterations, model_final.pth,
last_checkpoint, metrics.jsonl and config.yaml. `--resume` continues from last_checkpoint exactly (model,
optimizer, schedule, iteration, RNG and data stream); MODEL.WEIGHTS starts a new run from a checkpoint
(the original's or ours) for fine-tuning.
"""
from __future__ import annotations

import argparse
import logging
import sys

from clipvis.errors import ClipvisError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="YAML config (the original's format)")
    p.add_argument("--eval-only", action="store_true", help="only run inference + evaluation on DATASETS.TEST")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU workers with --device cpu)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 (several machines)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: MODEL.DEVICE, or cpu where CUDA is absent)")
    p.add_argument("--random-weights", action="store_true",
                   help="with --eval-only and no MODEL.WEIGHTS: evaluate an untrained model on purpose (its AP is about 0)")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def check_output_dir(output_dir: str) -> None:
    """OUTPUT_DIR is a folder, or can be made one (nothing on its path is a file) and written: checked
    before anything is built, without creating it."""
    import os
    from pathlib import Path

    path = Path(output_dir or ".").expanduser()
    if path.exists() and not path.is_dir():
        raise ClipvisError(f"OUTPUT_DIR {output_dir} is a file, not a folder; set OUTPUT_DIR to a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ClipvisError(f"OUTPUT_DIR {output_dir} cannot be created: {parent} is a file; set OUTPUT_DIR to a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ClipvisError(f"OUTPUT_DIR {output_dir} cannot be written ({parent} is not writable); set OUTPUT_DIR elsewhere")


def check_inputs(cfg, args, device: str) -> None:
    """Everything that can be checked before the model is built: the output folder, the device, the weights
    (a random model is refused for --eval-only unless asked for), values that cannot work."""
    from pathlib import Path

    from clipvis.cli.infer import check_config_values
    from clipvis.inference.predictor import resolve_device

    from clipvis.data.datasets import dataset_entry

    check_output_dir(cfg.OUTPUT_DIR)
    for name in list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)):
        dataset_entry(name)  # an unknown name: the known ones, now rather than after the model is built
    resolve_device(device)
    check_config_values(cfg)
    if cfg.MODEL.WEIGHTS:
        if not Path(cfg.MODEL.WEIGHTS).expanduser().is_file():
            raise ClipvisError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such checkpoint file; pass the path of a CLIP-VIS .pth")
    elif args.eval_only and not args.random_weights:
        raise ClipvisError("--eval-only without MODEL.WEIGHTS would score a random model (AP about 0): pass MODEL.WEIGHTS "
                           "model.pth, or --random-weights to evaluate an untrained model on purpose")


def main(args: argparse.Namespace) -> int:
    from clipvis.config import load_config
    from clipvis.engine import distributed as comm
    from clipvis.inference.predictor import default_device

    cfg = load_config(args.config_file, [o for o in args.opts if o != "--"])
    device = args.device or default_device(cfg.MODEL.DEVICE)
    check_inputs(cfg, args, device)
    comm.init_from_environment(device)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,  # other libraries (open_clip) only with --debug
        format=f"[%(asctime)s r{comm.rank()} %(name)s] %(message)s", datefmt="%H:%M:%S", force=True,
    )
    logging.getLogger("clipvis").setLevel(
        logging.DEBUG if args.debug else logging.INFO if comm.is_main_process() else logging.WARNING
    )
    if args.eval_only:
        from clipvis.engine.evaluation import evaluate_datasets

        evaluate_datasets(cfg, device=str(comm.local_device(device)))
    else:
        from clipvis.engine.train import train

        train(cfg, device=str(comm.local_device(device)), resume=args.resume)
    comm.barrier()
    return 0


def _run(args: argparse.Namespace) -> None:
    try:
        main(args)
    except ClipvisError as e:
        if args.debug:
            raise
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from clipvis.engine.distributed import launch

    arguments = parse_args()
    try:
        launch(_run, arguments.num_gpus, (arguments,), num_machines=arguments.num_machines,
               machine_rank=arguments.machine_rank, dist_url=arguments.dist_url)
    except ClipvisError as error:
        if arguments.debug:
            raise
        print(f"train_net.py: error: {error}", file=sys.stderr)
        sys.exit(2)
