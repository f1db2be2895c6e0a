"""The memory plan (vlm_ros/model/memory_plan.py): its bytes against real modules, its refusal
before any weight is read, the board detection from a faked /proc, and its estimate against
peaks measured on this CPU.

Weight bytes are compared with the modules themselves: the tiny checkpoints of all four layouts
loaded (float32, bfloat16, and int8 weight-only as the loader quantizes it), and the full-size
architectures built on the meta device (no memory). The refusal is the real arithmetic on a
checkpoint whose config.json says Phi-2 + CLIP-L/336 (the tiny weights behind it are never
reached: the plan runs before the shape check)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.errors import CheckpointError, InputError
from vlm_ros.model import boards
from vlm_ros.model import memory_plan as mp

ROOT = Path(__file__).resolve().parents[1]
HOST = mp.Board("test", "test host", 1024.0, False, 0.0, 0.0)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plan(loaded, runtime=RuntimeConfig(), dtype="float32") -> mp.Plan:
    model = loaded.model
    arch = mp.Architecture.of(model.spec, model.vision_config, model.text_config)
    return mp.make_plan(arch, runtime, dtype, HOST)


# ---- weight bytes = the real modules' ------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_equal_the_loaded_checkpoint(family, dtype):
    from vlm_ros.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint(family), "cpu", dtype)
    plan, model = _plan(loaded, dtype=dtype), loaded.model
    assert plan.decoder == _bytes(model.language_model.parameters())
    assert plan.vision == _bytes([*model.vision_tower.parameters(), *model.projector.parameters()])


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_weight_only_bytes_equal_the_decoder_quantized_at_load(family):
    """The loader quantizes block by block (pipeline.Assistant.load); the plan's int8 bytes are
    what the decoder then holds (int8 weights, bf16 scales, biases, embeddings, norms)."""
    from vlm_ros.engines.weight_int8 import WeightOnlyInt8Linear
    from vlm_ros.infer.pipeline import Assistant

    runtime = RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only", board="none")
    assistant = Assistant.load(str(tiny_checkpoint(family)), runtime=runtime)
    lm = assistant.model.language_model
    assert not any(type(m) is torch.nn.Linear for m in lm.modules())
    assert any(isinstance(m, WeightOnlyInt8Linear) for m in lm.modules())
    held = _bytes(lm.state_dict().values())  # parameters + int8 weights + scales
    assert _plan(assistant.loaded, runtime, "bfloat16").decoder == held


def test_quantized_at_load_equals_quantized_after_load():
    """Streaming the quantization through the loader changes when, not what: the same int8
    weights and scales as quantizing the loaded model, and the same greedy answer."""
    import numpy as np

    from vlm_ros.engines import weight_int8
    from vlm_ros.infer.pipeline import Assistant
    from vlm_ros.model.checkpoint import load_checkpoint

    path = tiny_checkpoint("llava_phi")
    runtime = RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only", board="none")
    streamed = Assistant.load(str(path), runtime=runtime)
    after = load_checkpoint(path, "cpu", "bfloat16")
    weight_int8.quantize_weights(after.model.language_model)
    ours, theirs = streamed.model.state_dict(), after.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    reference = Assistant(after, runtime).answer(image, "Is the path clear?", max_new_tokens=8)
    assert streamed.answer(image, "Is the path clear?", max_new_tokens=8).token_ids == (
        reference.token_ids
    )


def test_chunked_quantization_is_exact(monkeypatch):
    """Quantizing in slices of rows (to bound the float32 temporaries) gives the same bytes as
    one pass; the plan budgets the same slice size."""
    from vlm_ros.engines import weight_int8

    assert mp.QUANTIZE_CHUNK_ROWS == weight_int8.CHUNK_ROWS
    linear = torch.nn.Linear(48, 100).to(torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=0.3)
    whole = weight_int8.WeightOnlyInt8Linear(linear)
    monkeypatch.setattr(weight_int8, "CHUNK_ROWS", 7)
    sliced = weight_int8.WeightOnlyInt8Linear(linear)
    assert torch.equal(whole.weight, sliced.weight) and torch.equal(whole.scales, sliced.scales)


@pytest.mark.parametrize("family", ["llava_phi", "mipha_phi", "tinyllava", "tiny_llava_phi"])
def test_full_size_architecture_counts_equal_the_modules_on_meta(family):
    from vlm_ros.model.network import VlmModel

    arch = mp.published(family)
    spec = mp_family(family)
    with torch.device("meta"):
        model = VlmModel(spec, arch.vision, arch.text)
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    assert mp.phi_tensors(arch.text, arch.lm_head_bias).params == count(
        model.language_model.parameters()
    )
    vision = mp.vision_tensors(arch.vision_kind, arch.vision)
    vision += mp.projector_tensors(arch.vision.hidden_size, arch.text.hidden_size)
    assert vision.params == count([*model.vision_tower.parameters(), *model.projector.parameters()])
    if family == "llava_phi":  # Phi-2 as published: 2.78B (shared/facts/performance.md)
        assert mp.phi_tensors(arch.text).params == 2_779_683_840
        assert mp.make_plan(arch, RuntimeConfig(), "bfloat16", HOST).decoder / 1e9 == (
            pytest.approx(5.56, abs=0.01)
        )


def mp_family(family: str):
    from vlm_ros.model.families import FAMILIES as SPECS

    return SPECS[family]


# ---- the refusal -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size_config(tmp_path_factory) -> Path:
    """A LLaVA-Phi checkpoint directory whose config.json is full size (Phi-2 + CLIP-L/336)
    in front of tiny weights: the plan sees the real architecture, and any step after the plan
    fails on the shapes (CheckpointError), which shows the plan let it through."""
    out = tmp_path_factory.mktemp("full") / "llava-phi"
    shutil.copytree(tiny_checkpoint("llava_phi"), out)
    (out / "preprocessor_config.json").unlink()  # CLIP-336's defaults apply
    config = json.loads((out / "config.json").read_text())
    config.update(mp.PHI2)
    tower = config["vision_config"]["vision_tower"]
    tower.update({k: v for k, v in mp.CLIP_L_336.items() if k != "hidden_act"})
    config["vision_config"]["mm_projector"].update(mm_hidden_size=1024, hidden_size=2560)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _load(path: Path, **runtime):
    from vlm_ros.infer.pipeline import Assistant

    return Assistant.load(str(path), runtime=RuntimeConfig(**runtime))


def test_full_size_bf16_is_refused_on_an_orin_nano_before_loading(full_size_config):
    with pytest.raises(mp.MemoryPlanError) as info:
        _load(full_size_config, dtype="bfloat16", board="orin-nano-8gb", max_seq_len=768)
    message = str(info.value)
    assert "\n" not in message, message
    for part in ("llava_phi bfloat16", "Jetson Orin Nano 8GB", "7.30 GiB", "weights 5.",
                 "fix: dtype: bfloat16, quantize: int8_weight_only"):  # fmt: skip
        assert part in message, message
    # the same settings on a board with room, and the fix on the Nano, pass the plan and stop
    # only at the tiny weights' shapes
    for runtime in ({"dtype": "bfloat16", "board": "orin-nx-16gb"},
                    {"dtype": "bfloat16", "quantize": "int8_weight_only", "board": "orin-nano-8gb"},
                    {"dtype": "bfloat16", "board": "none"}):  # fmt: skip
        with pytest.raises(CheckpointError, match="shape"):
            _load(full_size_config, max_seq_len=768, **runtime)


def test_the_fix_named_is_a_bigger_board_when_no_precision_fits(full_size_config):
    with pytest.raises(mp.MemoryPlanError, match="fix: a Jetson Orin NX 16GB"):
        _load(full_size_config, dtype="bfloat16", board="orin-nano-8gb", memory_reserve_mb=4096)
    with pytest.raises(InputError, match="board must be auto, none or one of orin-nano-8gb"):
        _load(full_size_config, board="orin-nano")


BOARD_OF_PROFILE = {"nano": "orin-nano-8gb", "nx": "orin-nx-16gb", "agx": "agx-orin-32gb"}
FAMILY_OF_MODEL = {"llava-phi": "llava_phi", "Mipha-3B": "mipha_phi",
                   "TinyLLaVA-Phi-2-SigLIP-3.1B": "tinyllava"}  # fmt: skip
ORIN_PROFILES = sorted((ROOT / "config").glob("*_orin*.yaml"))


def test_one_profile_per_board_and_family():
    assert len(ORIN_PROFILES) == 9, [p.name for p in ORIN_PROFILES]


@pytest.mark.parametrize("path", ORIN_PROFILES, ids=lambda p: p.name)
def test_each_shipped_jetson_profile_fits_its_board_by_the_plan(path):
    """llava_phi_orin.yaml (no suffix) is the AGX Orin one."""
    import yaml

    params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
    board = BOARD_OF_PROFILE[path.stem.rsplit("_", 1)[-1] if "_orin_" in path.name else "agx"]
    arch = mp.published(FAMILY_OF_MODEL[Path(params["model"]).name])
    runtime = RuntimeConfig(
        max_seq_len=params["max_seq_len"], quantize=params["quantize"],
        vision_backend=params["vision_backend"], device="cuda", board=params["board"],
    )  # fmt: skip
    plan = mp.make_plan(arch, runtime, params["dtype"], mp.BOARDS[board])
    assert plan.fits, f"{path.name}: {plan.label()} needs {mp.gib(plan.need)}"
    assert params["max_seq_len"] >= arch.image_tokens + 128 and params["board"] == "auto"
    # the precision is the most accurate that fits: half precision where it fits
    if params["quantize"] != "none":
        half = mp.make_plan(arch, replace(runtime, quantize="none"), params["dtype"],
                            mp.BOARDS[board])  # fmt: skip
        assert not half.fits, path.name


def test_the_nano_fits_a_full_model_only_with_the_int8_decoder():
    rows = mp.table(RuntimeConfig(max_seq_len=896))
    nano = [r for r in rows if r["board"] == "orin-nano-8gb"]
    assert nano and all(r["fits"] == (r["quantize"] != "none") for r in nano), nano
    assert all(
        r["fits"] for r in rows if r["board"] != "orin-nano-8gb" and "nx-8" not in r["board"]
    )


# ---- which board ---------------------------------------------------------------------------


def _fake_root(tmp_path: Path, model: str | None, mem_total_kb: int, available_kb: int) -> Path:
    (tmp_path / "proc").mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       {mem_total_kb} kB\nMemFree:  1000 kB\nMemAvailable:   {available_kb} kB\n"
    )
    if model is not None:
        (tmp_path / "proc/device-tree").mkdir(exist_ok=True)
        (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    return tmp_path


@pytest.mark.parametrize(("model", "kb", "key"), [
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7_800_000,
     "orin-nano-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7_800_000, "orin-nx-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 16_000_000, "orin-nx-16gb"),
    ("Jetson AGX Orin Developer Kit", 31_900_000, "agx-orin-32gb"),
    ("Jetson AGX Orin Developer Kit", 64_300_000, "agx-orin-64gb"),
])  # fmt: skip
def test_detect_board_from_the_device_tree(tmp_path, model, kb, key):
    board = boards.detect_board(_fake_root(tmp_path, model, kb, kb // 2))
    assert board is not None and board.key == key
    assert board.memory_gib == pytest.approx(kb * 1024 / mp.GiB)  # the real MemTotal
    auto = boards.resolve_board(RuntimeConfig(board="auto"), tmp_path)
    assert auto is not None and auto.key == key and auto.unified


def test_not_a_jetson_plans_against_this_host(tmp_path):
    root = _fake_root(tmp_path, None, 32_000_000, 20_000_000)
    assert boards.detect_board(root) is None
    host = boards.resolve_board(RuntimeConfig(board="auto", device="cpu"), root)
    assert host is not None and host.key == "cpu" and host.reserve_gib == 0
    assert host.memory_gib == pytest.approx(20_000_000 * 1024 / mp.GiB)  # MemAvailable
    assert boards.detect_board(_fake_root(tmp_path / "x86", "Some ARM board", 8_000_000, 1)) is None
    assert boards.resolve_board(RuntimeConfig(board="none"), root) is None
    named = boards.resolve_board(RuntimeConfig(board="orin-nx-16gb", memory_reserve_mb=512), root)
    assert named is not None and named.reserve_gib == 0.5 and named.memory_gib == 15.2


def test_node_parameters_reach_the_plan():
    from vlm_ros.ros.node_config import PARAMETERS, NodeConfig

    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values |= {"board": "orin-nano-8gb", "memory_reserve_mb": 2048.0}
    runtime = NodeConfig.from_values(values).runtime
    assert runtime.board == "orin-nano-8gb" and runtime.memory_reserve_mb == 2048.0


def test_node_refuses_a_plan_that_does_not_fit_and_configures_after_the_fix(ros, full_size_config):
    """Over real rclpy: configure fails with the plan's one line (the lifecycle stays
    unconfigured, nothing crashes); with a model that fits, the same node configures."""
    from lifecycle_msgs.msg import State
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from vlm_ros.ros.node import AssistantNode

    node = ros.add(
        AssistantNode(
            namespace="plan", context=ros.ctx,
            parameter_overrides=[Parameter("model", value=str(full_size_config)),
                                 Parameter("dtype", value="bfloat16"),
                                 Parameter("board", value="orin-nano-8gb"),
                                 Parameter("autostart", value=False)],
        )
    )  # fmt: skip
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node.last_error.startswith("MemoryPlanError: memory plan: llava_phi bfloat16")
    assert "quantize: int8_weight_only" in node.last_error and "\n" not in node.last_error
    assert node._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
    node.set_parameters([Parameter("model", value=str(tiny_checkpoint("llava_phi")))])
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS


# ---- the estimate against peaks measured on this CPU ---------------------------------------


def _measured(code: str) -> dict:
    """Run one measurement in a fresh process (RSS is per process) and return its dict."""
    done = subprocess.run(
        [sys.executable, "-c", f"import json; from pathlib import Path\n"
         f"from vlm_ros.bench import memory\nprint(json.dumps({code}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_plan_bounds_the_peaks_measured_on_the_small_preset(tmp_path):
    """The small preset (261M parameters) on this CPU: serving at the full context in float32,
    and the real loader reading it as a checkpoint in bfloat16 + int8 weight-only. The plan
    must cover each measured peak (serving: within 5%; the loader: anonymous memory, as the
    checkpoint's mapped file pages are page cache) without being loose by more than half."""
    serving = _measured("memory.measure('small', 'float32', 'none', 1024)")
    assert serving["measured_peak_mib"] <= serving["plan_steady_mib"] * 1.05, serving
    assert serving["plan_steady_mib"] <= 1.5 * serving["measured_peak_mib"], serving
    ckpt = tmp_path / "small"
    _measured(f"str(memory.write_preset_checkpoint(Path({str(ckpt)!r}), 'small'))")
    # a process of its own: the writer's freed memory would hide the loader's
    load = _measured(f"memory.measure_load(Path({str(ckpt)!r}), 'bfloat16', 'int8_weight_only')")
    assert load["measured_load_peak_anon_mib"] <= load["plan_load_peak_mib"], load
    assert load["plan_load_peak_mib"] <= 1.5 * load["measured_load_peak_anon_mib"], load
