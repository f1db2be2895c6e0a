"""Run the vlm_assistant node on a bench preset's random-weight model, as `vlm-ros node` runs it
(test_reliability's full-size shutdown test).

    python test/preset_node.py PRESET DTYPE [--ros-args ...]

The model is built in DTYPE from vlm_ros.bench.measure.PRESETS (llava-phi-full: CLIP
ViT-L/14-336 + Phi-2, 3.1B parameters; bfloat16 halves its 12 GB) while the node already
serves ("loading model ..."); the demo checkpoint lends its tokenizer.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from vlm_ros.ros import node as ros_node


def preset_loader(preset: str, dtype: torch.dtype):
    def load(config):
        from vlm_ros.bench.measure import build_model
        from vlm_ros.infer.pipeline import Assistant, demo_checkpoint_dir
        from vlm_ros.model.checkpoint import load_checkpoint

        torch.set_default_dtype(dtype)  # built in dtype: no float32 copy on the way
        model = build_model(preset, "cpu", dtype)
        demo = load_checkpoint(demo_checkpoint_dir(), "cpu", None)
        loaded = dataclasses.replace(demo, model=model, spec=model.spec, dtype=dtype)
        return Assistant(loaded, config.runtime, config.generation)

    return load


if __name__ == "__main__":
    name, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    label = f"model:=random-weight-{name}-{sys.argv[2]}"  # what the node logs as its model
    args = ["preset_node", *sys.argv[3:], "-p", label]
    ros_node.exit_now(ros_node.run(args, loader=preset_loader(name, dtype)))
