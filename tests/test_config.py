"""The config system: the original's YAMLs read as they are, overrides, _BASE_, errors, the tiny open_clip model."""
from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import yaml

from clipvis.config import (
    available_builtin_configs,
    builtin_config,
    get_default_config,
    load_config,
    register_open_clip_configs,
)
from clipvis.errors import ConfigError

from conftest import REPO_ROOT, criterion_fixture_paths, inference_fixture_paths, load_fixture

SHIPPED = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))
ORIGINAL_CONFIGS = [
    "Base-COCO-InstanceSegmentation.yaml",
    "clipvis_ConvNeXt-B.yaml",
    "clipvis_R50.yaml",
    "clipvis_video_ConvNeXt-B.yaml",
    "clipvis_video_R50.yaml",
]


def _leaf_items(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ----------------------------------------------------------------------------- shipped configs
def test_all_original_configs_are_shipped():
    assert set(ORIGINAL_CONFIGS) <= set(SHIPPED)
    assert set(available_builtin_configs()) == set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_frozen(name):
    cfg = load_config(builtin_config(name))
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.MODEL.WEIGHTS = "x"
    # every value in the file (and its bases) arrives in the config
    from clipvis.config.yaml_files import read_config_chain

    expected = {}
    for _, values in read_config_chain(builtin_config(name)):
        expected.update(dict(_leaf_items(values)))
    for key, raw in expected.items():
        value = cfg
        for part in key.split("."):
            value = value[part]
        if isinstance(raw, str) and raw.startswith("("):
            raw = ast.literal_eval(raw)  # the YAMLs write tuples as Python literals, as detectron2 reads them
        if isinstance(value, (list, tuple)):
            assert list(value) == list(raw), key
        else:
            assert value == raw, key


def test_video_convnext_config_values_of_the_original():
    cfg = load_config(builtin_config("clipvis_video_ConvNeXt-B.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "CLIPVIS_Video"
    assert cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME == "convnext_base_w_320"
    assert cfg.MODEL.FC_CLIP.EMBED_DIM == 640
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert cfg.TEST.NUM_FRAME == 9
    assert cfg.TEST.NUM_TOPK == 5
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 50
    assert cfg.TEST.WINDOW_INFERENCE is True
    assert cfg.INPUT.MIN_SIZE_TEST == 480
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [122.7709383, 116.7460125, 104.09373615]
    assert cfg.MODEL.PIXEL_STD == [68.5005327, 66.6321579, 70.32316305]
    assert cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY == 32
    assert cfg.DATASETS.TEST == ("ytvis_2019_val",)
    # from the base file
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.STEPS == (327778, 355092)
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.AMP.ENABLED is True


def test_image_configs_values_of_the_original():
    convnext = load_config(builtin_config("clipvis_ConvNeXt-B.yaml"))
    assert convnext.MODEL.META_ARCHITECTURE == "CLIPVIS"
    assert convnext.MODEL.MASK_FORMER.DEC_LAYERS == 7
    assert convnext.DATASETS.TRAIN == ("lvis_v1_train_norare",)
    r50 = load_config(builtin_config("clipvis_R50"))  # the .yaml may be left out
    assert r50.MODEL.FC_CLIP.CLIP_MODEL_NAME == "RN50"
    assert r50.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS == "openai"
    assert r50.MODEL.FC_CLIP.EMBED_DIM == 1024


def test_defaults_follow_detectron2_and_add_clipvis_config():
    cfg = get_default_config()
    assert not cfg.is_frozen()
    assert cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 6
    assert cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS == 112 * 112
    assert cfg.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS == "laion2b_s29b_b131k_ft_soup"
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED is False
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,)
    assert cfg.VERSION == 2
    assert load_config() == cfg  # no file: the defaults, frozen


def test_builtin_config_from_another_working_directory(tmp_path):
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        path = builtin_config("clipvis_video_ConvNeXt-B.yaml")
        assert path.is_file() and path.is_absolute()
        assert load_config(path).MODEL.MASK_FORMER.DEC_LAYERS == 10
        assert builtin_config("configs/clipvis_video_R50.yaml").name == "clipvis_video_R50.yaml"
    finally:
        os.chdir(old)


def test_unknown_builtin_config_lists_the_available_ones():
    with pytest.raises(ConfigError) as err:
        builtin_config("clipvis_video_ConvNext-L.yaml")
    assert "clipvis_video_ConvNeXt-B.yaml" in str(err.value)


# ----------------------------------------------------------------------------- overrides
def test_overrides_are_parsed_like_detectron2():
    cfg = load_config(
        builtin_config("clipvis_video_ConvNeXt-B.yaml"),
        [
            "TEST.NUM_FRAME", "3",
            "DATASETS.TEST", '("lvvis_val",)',
            "MODEL.MASK_FORMER.DEC_LAYERS", "7",
            "SOLVER.BASE_LR", "1",                # int -> float
            "MODEL.PIXEL_MEAN", "(1, 2, 3)",      # tuple -> list
            "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "",
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "0.5",               # text for a text key stays text
            "TEST.WINDOW_INFERENCE", "False",
        ],
    )
    assert cfg.TEST.NUM_FRAME == 3
    assert cfg.DATASETS.TEST == ("lvvis_val",)
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 7
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.MODEL.PIXEL_MEAN == [1, 2, 3]
    assert cfg.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS == ""
    assert cfg.MODEL.DEVICE == "cpu"
    assert cfg.MODEL.WEIGHTS == "0.5"
    assert cfg.TEST.WINDOW_INFERENCE is False
    # the rest of the file is untouched
    assert cfg.TEST.NUM_TOPK == 5


@pytest.mark.parametrize(
    "key, close",
    [
        ("MODEL.MASK_FORMER.DEC_LAYER", "MODEL.MASK_FORMER.DEC_LAYERS"),
        ("MODEL.DEC_LAYERS", "MODEL.MASK_FORMER.DEC_LAYERS"),
        ("TEST.NUM_FRAMES", "TEST.NUM_FRAME"),
        ("MODEL.FC_CLIP.CLIP_PRETRAINED", "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS"),
    ],
)
def test_unknown_override_key_names_it_and_suggests(key, close):
    with pytest.raises(ConfigError) as err:
        load_config(builtin_config("clipvis_video_ConvNeXt-B.yaml"), [key, "3"])
    message = str(err.value)
    assert repr(key) in message
    assert "command-line" in message
    assert close in message


@pytest.mark.parametrize(
    "key, value, expected, given",
    [
        ("TEST.NUM_FRAME", "3.5", "int", "float"),
        ("TEST.NUM_FRAME", "True", "int", "bool"),
        ("TEST.WINDOW_INFERENCE", "1", "bool", "int"),
        ("MODEL.PIXEL_MEAN", "0.5", "list", "float"),
        ("MODEL.MASK_FORMER.DEC_LAYERS", "ten", "int", "str"),
    ],
)
def test_wrong_type_names_key_and_types(key, value, expected, given):
    with pytest.raises(ConfigError) as err:
        load_config(None, [key, value])
    message = str(err.value)
    assert repr(key) in message and expected in message and given in message


def test_malformed_override_lists():
    with pytest.raises(ConfigError, match="pairs"):
        load_config(None, ["TEST.NUM_FRAME"])
    with pytest.raises(ConfigError, match="list of KEY VALUE"):
        load_config(None, "TEST.NUM_FRAME 3")
    with pytest.raises(ConfigError, match="group"):
        load_config(None, ["MODEL.MASK_FORMER", "3"])


def test_frozen_config_refuses_merges():
    cfg = load_config()
    with pytest.raises(ConfigError, match="frozen"):
        cfg.merge_from_list(["TEST.NUM_FRAME", "3"])
    thawed = cfg.clone()
    thawed.defrost()
    thawed.merge_from_list(["TEST.NUM_FRAME", "3"])
    assert thawed.TEST.NUM_FRAME == 3 and cfg.TEST.NUM_FRAME == 9


# ----------------------------------------------------------------------------- files
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_in_a_file_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path / "bad.yaml", "MODEL:\n  MASK_FORMER:\n    DEC_LAYER: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'MODEL.MASK_FORMER.DEC_LAYER'" in message
    assert str(path) in message
    assert "MODEL.MASK_FORMER.DEC_LAYERS" in message


def test_unknown_key_in_a_base_names_the_base_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "TEST:\n  NUM_FRAMES: 3\n")
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\nTEST:\n  NUM_TOPK: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(base) in str(err.value) and "TEST.NUM_FRAME" in str(err.value)


def test_wrong_type_in_a_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "TEST:\n  NUM_FRAME: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "'TEST.NUM_FRAME'" in str(err.value) and "int" in str(err.value) and "list" in str(err.value)
    path = _write(tmp_path / "bad2.yaml", "MODEL: 3\n")
    with pytest.raises(ConfigError, match="group of keys"):
        load_config(path)
    path = _write(tmp_path / "bad3.yaml", "TEST:\n  NUM_FRAME:\n    A: 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_missing_file_and_invalid_yaml_name_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(missing) in str(err.value)

    broken = _write(tmp_path / "broken.yaml", "MODEL:\n  WEIGHTS: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(broken)
    assert str(broken) in str(err.value) and "YAML" in str(err.value)

    not_mapping = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(not_mapping)
    assert str(not_mapping) in str(err.value)

    bad_base = _write(tmp_path / "child.yaml", "_BASE_: missing_base.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad_base)
    assert "missing_base.yaml" in str(err.value) and str(bad_base) in str(err.value)


def test_base_chain_from_a_temp_dir(tmp_path):
    # grandparent in a sibling folder, parent referring to it relatively, child using the shipped video config
    original = builtin_config("clipvis_video_ConvNeXt-B.yaml")
    _write(tmp_path / "shared" / "root.yaml", f"_BASE_: {original}\nTEST:\n  NUM_FRAME: 4\n  NUM_TOPK: 2\n")
    _write(tmp_path / "exp" / "parent.yaml", "_BASE_: ../shared/root.yaml\nTEST:\n  NUM_FRAME: 6\nOUTPUT_DIR: parent_out\n")
    child = _write(tmp_path / "exp" / "child.yaml", "_BASE_: parent.yaml\nMODEL:\n  MASK_FORMER:\n    DEC_LAYERS: 4\n")
    old = Path.cwd()
    os.chdir(tmp_path / "shared")  # relative _BASE_ paths follow the including file, not the cwd
    try:
        cfg = load_config(child, ["OUTPUT_DIR", "cli_out"])
    finally:
        os.chdir(old)
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 4    # child
    assert cfg.TEST.NUM_FRAME == 6                  # parent overrides root
    assert cfg.TEST.NUM_TOPK == 2                   # root overrides the shipped config
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 50      # shipped video config
    assert cfg.SOLVER.IMS_PER_BATCH == 16           # shipped base
    assert cfg.OUTPUT_DIR == "cli_out"              # command line last


def test_base_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_dump_round_trips(name, tmp_path):
    cfg = load_config(builtin_config(name), ["DATASETS.TEST", '("lvvis_val",)', "MODEL.WEIGHTS", "0.5"])
    text = cfg.dump()
    assert isinstance(yaml.safe_load(text), dict)
    again = load_config(_write(tmp_path / "dumped.yaml", text))
    assert again == cfg
    for (key, a), (_, b) in zip(_leaf_items(again), _leaf_items(cfg)):
        assert type(a) is type(b), key


# ----------------------------------------------------------------------------- against the reference fixtures
@pytest.mark.parametrize("path", criterion_fixture_paths(), ids=lambda p: p.name)
def test_original_command_line_options_of_a_fixture_load(path):
    """The fixture's own `cfg_opts` (as passed to the original's train_net) load on the fixture's config
    and give the settings its meta records."""
    meta = load_fixture(path)["meta"]
    cfg = load_config(builtin_config(Path(meta["config"]).name), meta.get("cfg_opts", []))
    checks = {
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "clip_model": cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME,
        "dec_layers": cfg.MODEL.MASK_FORMER.DEC_LAYERS,
        "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
        "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "train_num_points": cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS,
        "oversample_ratio": cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO,
        "importance_sample_ratio": cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO,
        "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
    }
    if meta.get("kind") == "video":
        checks["sampling_frame_num"] = cfg.INPUT.SAMPLING_FRAME_NUM
    compared = 0
    for key, ours in checks.items():
        if key in meta:
            expected = list(meta[key]) if isinstance(meta[key], (list, tuple)) else meta[key]
            assert ours == expected, key
            compared += 1
    assert compared >= 5


@pytest.mark.parametrize("path", inference_fixture_paths(), ids=lambda p: p.name)
def test_inference_fixture_config_matches_its_meta(path):
    """Settings an inference fixture cannot vary (normalisation, padding, CLIP model) come from its config."""
    meta = load_fixture(path)["meta"]
    cfg = load_config(builtin_config(Path(meta["config"]).name))
    assert cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME == meta["clip_model"]
    assert list(cfg.MODEL.PIXEL_MEAN) == list(meta["pixel_mean"])
    assert list(cfg.MODEL.PIXEL_STD) == list(meta["pixel_std"])
    assert cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY == meta["size_divisibility"]


# ----------------------------------------------------------------------------- tiny open_clip model
def test_tiny_configs_use_the_tiny_open_clip_model():
    for name in ("clipvis_video_tiny.yaml", "clipvis_tiny.yaml"):
        cfg = load_config(builtin_config(name))
        assert cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME == "clipvis_tiny_convnext"
        assert cfg.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS == ""
        assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 3
        assert cfg.MODEL.MASK_FORMER.HIDDEN_DIM == 64
    video = load_config(builtin_config("clipvis_video_tiny.yaml"))
    assert video.MODEL.META_ARCHITECTURE == "CLIPVIS_Video"
    assert video.TEST.NUM_FRAME == 9


def test_tiny_open_clip_model_registers_and_builds():
    import open_clip
    import torch

    names = register_open_clip_configs()
    assert register_open_clip_configs() == names  # idempotent
    assert "clipvis_tiny_convnext" in names and "clipvis_tiny_convnext" in open_clip.list_models()

    tiny_cfg = open_clip.get_model_config("clipvis_tiny_convnext")
    base_cfg = open_clip.get_model_config("convnext_base_w_320")
    assert set(tiny_cfg) == set(base_cfg)
    assert set(tiny_cfg["vision_cfg"]) == set(base_cfg["vision_cfg"])
    assert set(tiny_cfg["text_cfg"]) == set(base_cfg["text_cfg"])
    for key in ("timm_pool", "timm_proj"):
        assert tiny_cfg["vision_cfg"][key] == base_cfg["vision_cfg"][key]

    start = time.perf_counter()
    model = open_clip.create_model("clipvis_tiny_convnext")
    assert time.perf_counter() - start < 5.0  # ~0.1 s alone; generous for a shared 2-core machine
    trunk = model.visual.trunk
    for part in ("stem", "stages", "norm_pre"):
        assert hasattr(trunk, part), part
    assert len(trunk.stages) == 4
    cfg = load_config(builtin_config("clipvis_video_tiny.yaml"))
    assert model.text_projection.shape[-1] == cfg.MODEL.FC_CLIP.EMBED_DIM
    with torch.no_grad():
        tokens = open_clip.get_tokenizer("clipvis_tiny_convnext")(["a photo of a dog"])
        text = model.encode_text(tokens)
        image = model.encode_image(torch.zeros(1, 3, 64, 64))
    assert text.shape == (1, cfg.MODEL.FC_CLIP.EMBED_DIM)
    assert image.shape == (1, cfg.MODEL.FC_CLIP.EMBED_DIM)


def test_old_config_version_is_refused(tmp_path):
    path = _write(tmp_path / "v1.yaml", "VERSION: 1\n")
    with pytest.raises(ConfigError, match="VERSION"):
        load_config(path)


# ----------------------------------------------------------------------------- component keys
@pytest.mark.parametrize("key, value", [
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
    ("MODEL.BACKBONE.NAME", "build_resnet_backbone"),
    ("MODEL.SEM_SEG_HEAD.NAME", "SemSegFPNHead"),
    ("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "BasePixelDecoder"),
    ("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "StandardTransformerDecoder"),
    ("INPUT.FORMAT", "BGR"),
])
def test_component_keys_select_or_refuse(key, value):
    """A key that names a component is checked before anything is built: an unsupported value is a
    ConfigError naming the key, the value and what is supported."""
    from clipvis.modeling.meta_arch import SUPPORTED_COMPONENTS, build_model

    cfg = load_config(builtin_config("clipvis_video_tiny.yaml"), [key, value])
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    message = str(info.value)
    assert key in message and repr(value) in message
    assert all(name in message for name in SUPPORTED_COMPONENTS[key])


def test_config_without_base_is_refused_not_run_as_defaults():
    from clipvis.modeling.meta_arch import build_model

    with pytest.raises(ConfigError, match="_BASE_"):
        build_model(load_config())


# ----------------------------------------------------------------------------- used or refused
def _leaf_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, prefix + key + ".")
        else:
            yield prefix + key


def test_every_key_is_read_or_listed_as_unused():
    """A config key is either read by the code or in the one explicit accepted-but-unused list."""
    import re

    from clipvis.config.defaults import UNUSED_KEYS

    keys = set(_leaf_keys(get_default_config()))
    assert UNUSED_KEYS <= keys, sorted(UNUSED_KEYS - keys)
    sources = [p for p in (REPO_ROOT / "clipvis").rglob("*.py") if p.name != "defaults.py"] + [REPO_ROOT / "train_net.py"]
    code = "\n".join(p.read_text(encoding="utf-8") for p in sources)
    unread = [k for k in sorted(keys - UNUSED_KEYS)
              if not re.search(r"\.%s\b|[\"']%s[\"']" % ((k.rsplit(".", 1)[-1],) * 2), code)]
    assert not unread, f"keys neither read nor listed in UNUSED_KEYS: {unread}"


def test_an_unused_key_given_a_value_warns_that_it_has_no_effect(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="clipvis.config"):
        load_config(builtin_config("clipvis_video_tiny.yaml"), ["SOLVER.WEIGHT_DECAY_BIAS", "0.1"])
    assert "SOLVER.WEIGHT_DECAY_BIAS" in caplog.text and "no effect" in caplog.text
    caplog.clear()
    path = tmp_path / "mine.yaml"
    path.write_text(f"_BASE_: {builtin_config('clipvis_video_tiny.yaml')}\nSOLVER:\n  WEIGHT_DECAY_BIAS: 0.1\n")
    with caplog.at_level("WARNING", logger="clipvis.config"):
        load_config(path)
    assert "SOLVER.WEIGHT_DECAY_BIAS" in caplog.text and "no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clipvis.config"):
        load_config(builtin_config("clipvis_video_ConvNeXt-B.yaml"), ["TEST.TEST_NUM_CLASSES", "40"])  # the original's: silent
    assert caplog.text == ""
