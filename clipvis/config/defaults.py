"""Every config key with its default: the original's `get_cfg()` + `add_deeplab_config` + `add_clipvis_config`.

The original (zwq456/CLIP-VIS `train_net*.py`) builds its config from detectron2 0.6's defaults, then
detectron2's DeepLab additions, then its own `add_clipvis_config`. We keep the detectron2 sections that
the original's YAMLs, model and scripts read (or that Mask2Former-family YAMLs commonly set), with
detectron2's defaults, and all of the original's additions with its defaults. Detectron2's detector
heads (RPN, ROI heads, RetinaNet, FPN, anchors, keypoints, panoptic FPN) are left out: no part of
CLIP-VIS uses them.

Note the defaults are the original's, not those of the shipped YAMLs: e.g. DEC_LAYERS is 6 here and 10
in `clipvis_video_ConvNeXt-B.yaml`; a config file is needed to get the published model.
"""
from __future__ import annotations

from clipvis.config.node import CfgNode


def _detectron2_model() -> dict:
    return {
        "LOAD_PROPOSALS": False,
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "DEVICE": "cuda",
        "META_ARCHITECTURE": "GeneralizedRCNN",
        # Checkpoint to load into the whole model (a CLIP-VIS .pth in the original's format).
        "WEIGHTS": "",
        # Per-channel normalisation of the 0-255 input, in INPUT.FORMAT channel order.
        "PIXEL_MEAN": [103.530, 116.280, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
            "DEFORM_MODULATED": False,
            "DEFORM_NUM_GROUPS": 1,
            # DeepLab additions
            "RES4_DILATION": 1,
            "RES5_MULTI_GRID": [1, 2, 4],
            "STEM_TYPE": "deeplab",
        },
        "SEM_SEG_HEAD": {
            "NAME": "SemSegFPNHead",
            "IN_FEATURES": ["p2", "p3", "p4", "p5"],
            "IGNORE_VALUE": 255,
            "NUM_CLASSES": 54,
            "CONVS_DIM": 128,
            "COMMON_STRIDE": 4,
            "NORM": "GN",
            "LOSS_WEIGHT": 1.0,
            # DeepLab additions
            "LOSS_TYPE": "hard_pixel_mining",
            "PROJECT_FEATURES": ["res2"],
            "PROJECT_CHANNELS": [48],
            "ASPP_CHANNELS": 256,
            "ASPP_DILATIONS": [6, 12, 18],
            "ASPP_DROPOUT": 0.1,
        },
    }


def _detectron2_input() -> dict:
    return {
        "MIN_SIZE_TRAIN": (800,),
        "MIN_SIZE_TRAIN_SAMPLING": "choice",
        "MAX_SIZE_TRAIN": 1333,
        # Shorter side of test frames (0 = no resize) and the cap on the longer side.
        "MIN_SIZE_TEST": 800,
        "MAX_SIZE_TEST": 1333,
        "RANDOM_FLIP": "horizontal",
        "CROP": {
            "ENABLED": False,
            "TYPE": "relative_range",
            "SIZE": [0.9, 0.9],
            "SINGLE_CATEGORY_MAX_AREA": 1.0,  # DeepLab addition
        },
        "FORMAT": "BGR",
        "MASK_FORMAT": "polygon",
    }


def _detectron2_rest() -> dict:
    return {
        "VERSION": 2,
        "DATASETS": {
            "TRAIN": (),
            "PROPOSAL_FILES_TRAIN": (),
            "PRECOMPUTED_PROPOSAL_TOPK_TRAIN": 2000,
            "TEST": (),
            "PROPOSAL_FILES_TEST": (),
            "PRECOMPUTED_PROPOSAL_TOPK_TEST": 1000,
        },
        "DATALOADER": {
            "NUM_WORKERS": 4,
            "ASPECT_RATIO_GROUPING": True,
            "SAMPLER_TRAIN": "TrainingSampler",
            "REPEAT_THRESHOLD": 0.0,
            "FILTER_EMPTY_ANNOTATIONS": True,
        },
        "SOLVER": {
            "LR_SCHEDULER_NAME": "WarmupMultiStepLR",
            "MAX_ITER": 40000,
            "BASE_LR": 0.001,
            "MOMENTUM": 0.9,
            "NESTEROV": False,
            "WEIGHT_DECAY": 0.0001,
            "WEIGHT_DECAY_NORM": 0.0,
            "GAMMA": 0.1,
            "STEPS": (30000,),
            "WARMUP_FACTOR": 1.0 / 1000,
            "WARMUP_ITERS": 1000,
            "WARMUP_METHOD": "linear",
            "CHECKPOINT_PERIOD": 5000,
            "IMS_PER_BATCH": 16,
            "REFERENCE_WORLD_SIZE": 0,
            "BIAS_LR_FACTOR": 1.0,
            "WEIGHT_DECAY_BIAS": None,  # None: same as WEIGHT_DECAY
            # CLIP-VIS uses CLIP_TYPE "full_model": clip the norm of all gradients together to CLIP_VALUE.
            "CLIP_GRADIENTS": {"ENABLED": False, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0, "NORM_TYPE": 2.0},
            "AMP": {"ENABLED": False},
            # DeepLab additions (poly schedule)
            "POLY_LR_POWER": 0.9,
            "POLY_LR_CONSTANT_ENDING": 0.0,
        },
        "TEST": {
            "EXPECTED_RESULTS": [],
            "EVAL_PERIOD": 0,
            "KEYPOINT_OKS_SIGMAS": [],
            # Video model: number of instances kept per video.
            "DETECTIONS_PER_IMAGE": 100,
            "AUG": {
                "ENABLED": False,
                "MIN_SIZES": (400, 500, 600, 700, 800, 900, 1000, 1100, 1200),
                "MAX_SIZE": 4000,
                "FLIP": True,
            },
            "PRECISE_BN": {"ENABLED": False, "NUM_ITER": 200},
        },
        "OUTPUT_DIR": "./output",
        "SEED": -1,
        "CUDNN_BENCHMARK": False,
        "VIS_PERIOD": 0,
        "GLOBAL": {"HACK": 1.0},
    }


def _clipvis_additions() -> dict:
    """The original's `add_clipvis_config` (zwq456/CLIP-VIS clipvis/config.py), grouped by section."""
    return {
        "INPUT": {
            "DATASET_MAPPER_NAME": "mask_former_semantic",
            "COLOR_AUG_SSD": False,
            "SIZE_DIVISIBILITY": -1,
            # Video training: frames per clip, the window they are drawn from, whether to shuffle them.
            "SAMPLING_FRAME_NUM": 2,
            "SAMPLING_FRAME_RANGE": 20,
            "SAMPLING_FRAME_SHUFFLE": False,
            "AUGMENTATIONS": [],
            # Large-scale jitter (image training)
            "IMAGE_SIZE": 1024,
            "MIN_SCALE": 0.1,
            "MAX_SCALE": 2.0,
        },
        "SOLVER": {"WEIGHT_DECAY_EMBED": 0.0, "OPTIMIZER": "ADAMW", "BACKBONE_MULTIPLIER": 0.1},
        "MODEL": {
            "MASK_FORMER": {
                # losses
                "DEEP_SUPERVISION": True,
                "NO_OBJECT_WEIGHT": 0.1,
                "OBJECT_WEIGHT": 1.0,
                "MASKIOU_WEIGHT": 1.0,
                "DICE_WEIGHT": 1.0,
                "MASK_WEIGHT": 20.0,
                # transformer decoder
                "NHEADS": 8,
                "DROPOUT": 0.1,
                "DIM_FEEDFORWARD": 2048,
                "ENC_LAYERS": 0,
                # DEC_LAYERS counts the prediction head on the learnable queries: DEC_LAYERS - 1 layers.
                "DEC_LAYERS": 6,
                "PRE_NORM": False,
                "HIDDEN_DIM": 256,
                "NUM_OBJECT_QUERIES": 100,
                "TRANSFORMER_IN_FEATURE": "res5",
                "ENFORCE_INPUT_PROJ": False,
                "TEST": {
                    "SEMANTIC_ON": True,
                    "INSTANCE_ON": False,
                    "PANOPTIC_ON": False,
                    "OBJECT_MASK_THRESHOLD": 0.0,
                    "OVERLAP_THRESHOLD": 0.0,
                    "SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
                    "WINDOW_INFERENCE": False,
                },
                # Inputs are zero-padded (bottom/right) to a multiple of this.
                "SIZE_DIVISIBILITY": 32,
                "CLIP_PATH": "",
                "CLIP_CLASSIFIER": False,
                "AGNOSTIC_CLASSIFIER": False,
                "TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
                # PointRend-style point sampling in the matcher and mask losses
                "TRAIN_NUM_POINTS": 112 * 112,
                "OVERSAMPLE_RATIO": 3.0,
                "IMPORTANCE_SAMPLE_RATIO": 0.75,
            },
            "SEM_SEG_HEAD": {
                "MASK_DIM": 256,
                "TRANSFORMER_ENC_LAYERS": 0,
                "PIXEL_DECODER_NAME": "BasePixelDecoder",
                "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
                "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
                "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
            },
            "SWIN": {
                "PRETRAIN_IMG_SIZE": 224,
                "PATCH_SIZE": 4,
                "EMBED_DIM": 96,
                "DEPTHS": [2, 2, 6, 2],
                "NUM_HEADS": [3, 6, 12, 24],
                "WINDOW_SIZE": 7,
                "MLP_RATIO": 4.0,
                "QKV_BIAS": True,
                "QK_SCALE": None,
                "DROP_RATE": 0.0,
                "ATTN_DROP_RATE": 0.0,
                "DROP_PATH_RATE": 0.3,
                "APE": False,
                "PATCH_NORM": True,
                "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
                "USE_CHECKPOINT": False,
            },
            # The frozen CLIP: open_clip model name, open_clip pretrained tag ("" = no download), embed dim.
            "FC_CLIP": {
                "CLIP_MODEL_NAME": "convnext_large_d_320",
                "CLIP_PRETRAINED_WEIGHTS": "laion2b_s29b_b131k_ft_soup",
                "EMBED_DIM": 768,
            },
        },
        "TEST": {
            # Number of classes in the original's instance selection (there it must equal the test vocabulary size).
            "TEST_NUM_CLASSES": 1203,
            # Tracker: memory length (frames) and how many best-matching memory frames vote.
            "NUM_FRAME": 9,
            "NUM_TOPK": 5,
            "WINDOW_INFERENCE": False,
        },
    }


def _clipvis_extensions() -> dict:
    """Keys of ours, for knobs the original hard-codes (defaults = the original's constants)."""
    return {
        "TEST": {
            # Frames per backbone/decoder batch in window inference (the original's `window_size=10`).
            # Only batches the work: results do not depend on it.
            "WINDOW_SIZE": 10,
            # Inference arithmetic: "fp32" (the original's numbers) or "bf16" (autocast: 2-3x faster on
            # CPUs with AVX512-BF16/AMX and on GPUs; small documented deviations, see README "Speed"; refused
            # on a CPU without bfloat16 arithmetic, where it would be hundreds of times slower).
            "PRECISION": "fp32",
        },
        "SOLVER": {
            # Training: iterations between log lines / metrics.jsonl records (detectron2's writers use 20).
            "LOG_PERIOD": 20,
        },
    }


# Keys that clipvis accepts but never reads: detectron2's and Mask2Former's options for other models and tasks
# (proposals, keypoints, ResNet/Swin/DeepLab backbones, semantic/panoptic test modes, test-time augmentation)
# and the original's leftovers, kept only so that the original's YAML files (and files written for it) load.
# They are accepted in files and overrides; `load_config` warns when one that the original's configs and command
# lines do not set is given a value other than its default, since that value has no effect.
UNUSED_KEYS = frozenset("""
    CUDNN_BENCHMARK VIS_PERIOD GLOBAL.HACK
    DATASETS.PROPOSAL_FILES_TRAIN DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN
    DATASETS.PROPOSAL_FILES_TEST DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST
    SOLVER.NESTEROV SOLVER.REFERENCE_WORLD_SIZE SOLVER.BIAS_LR_FACTOR SOLVER.WEIGHT_DECAY_BIAS
    SOLVER.POLY_LR_POWER SOLVER.POLY_LR_CONSTANT_ENDING
    TEST.EXPECTED_RESULTS TEST.KEYPOINT_OKS_SIGMAS TEST.AUG.MIN_SIZES TEST.AUG.MAX_SIZE TEST.AUG.FLIP
    TEST.PRECISE_BN.NUM_ITER TEST.TEST_NUM_CLASSES TEST.WINDOW_INFERENCE
    MODEL.LOAD_PROPOSALS MODEL.MASK_ON MODEL.KEYPOINT_ON MODEL.BACKBONE.FREEZE_AT
    MODEL.RESNETS.DEPTH MODEL.RESNETS.OUT_FEATURES MODEL.RESNETS.NUM_GROUPS MODEL.RESNETS.WIDTH_PER_GROUP
    MODEL.RESNETS.STRIDE_IN_1X1 MODEL.RESNETS.RES5_DILATION MODEL.RESNETS.RES2_OUT_CHANNELS
    MODEL.RESNETS.STEM_OUT_CHANNELS MODEL.RESNETS.DEFORM_ON_PER_STAGE MODEL.RESNETS.DEFORM_MODULATED
    MODEL.RESNETS.DEFORM_NUM_GROUPS MODEL.RESNETS.RES4_DILATION MODEL.RESNETS.RES5_MULTI_GRID MODEL.RESNETS.STEM_TYPE
    MODEL.SEM_SEG_HEAD.IGNORE_VALUE MODEL.SEM_SEG_HEAD.LOSS_WEIGHT MODEL.SEM_SEG_HEAD.LOSS_TYPE
    MODEL.SEM_SEG_HEAD.PROJECT_FEATURES MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS MODEL.SEM_SEG_HEAD.ASPP_CHANNELS
    MODEL.SEM_SEG_HEAD.ASPP_DILATIONS MODEL.SEM_SEG_HEAD.ASPP_DROPOUT
    MODEL.MASK_FORMER.ENC_LAYERS MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
    MODEL.MASK_FORMER.TEST.SEMANTIC_ON MODEL.MASK_FORMER.TEST.INSTANCE_ON MODEL.MASK_FORMER.TEST.PANOPTIC_ON
    MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD
    MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE MODEL.MASK_FORMER.TEST.WINDOW_INFERENCE
    MODEL.MASK_FORMER.CLIP_PATH MODEL.MASK_FORMER.CLIP_CLASSIFIER MODEL.MASK_FORMER.AGNOSTIC_CLASSIFIER
    MODEL.SWIN.PRETRAIN_IMG_SIZE MODEL.SWIN.PATCH_SIZE MODEL.SWIN.EMBED_DIM MODEL.SWIN.DEPTHS MODEL.SWIN.NUM_HEADS
    MODEL.SWIN.MLP_RATIO MODEL.SWIN.QKV_BIAS MODEL.SWIN.QK_SCALE MODEL.SWIN.DROP_RATE MODEL.SWIN.ATTN_DROP_RATE
    MODEL.SWIN.DROP_PATH_RATE MODEL.SWIN.APE MODEL.SWIN.PATCH_NORM MODEL.SWIN.OUT_FEATURES MODEL.SWIN.USE_CHECKPOINT
    INPUT.CROP.SINGLE_CATEGORY_MAX_AREA INPUT.MASK_FORMAT INPUT.COLOR_AUG_SSD
    MODEL.FC_CLIP.EMBED_DIM
""".split())  # MODEL.FC_CLIP.EMBED_DIM: the embedding size is the CLIP model's own (CLIP_MODEL_NAME decides it)


def _deep_update(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value
    return into


def get_default_config() -> CfgNode:
    """A fresh, mutable `CfgNode` holding every key CLIP-VIS configs may set, with its default."""
    tree = _detectron2_rest()
    tree["MODEL"] = _detectron2_model()
    tree["INPUT"] = _detectron2_input()
    _deep_update(tree, _clipvis_additions())
    _deep_update(tree, _clipvis_extensions())
    return CfgNode(tree)
