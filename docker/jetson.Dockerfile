# vlm_ros on a Jetson Orin: JetPack 6 (L4T R36), ROS 2 Humble, JetPack's PyTorch and TensorRT.
#
#   docker build -f docker/jetson.Dockerfile -t vlm_ros:jetson .        # on the Jetson, repo root
#   docker run --runtime nvidia -it --rm --network host vlm_ros:jetson  # the offline demo
#   docker run --runtime nvidia -it --rm --network host -v ~/models:/models vlm_ros:jetson \
#       ros2 launch vlm_ros assistant.launch.py model:=/models/llava-phi \
#       params_file:=/ws/install/vlm_ros/share/vlm_ros/config/llava_phi_orin_nano.yaml
#
# BASE_IMAGE must be an L4T R36 image with ROS 2 Humble, PyTorch (NVIDIA's CUDA build) and
# TensorRT's Python bindings, the jetson-containers convention; the default is the
# jetson-containers ROS image. To build such a base from parts instead:
#   jetson-containers build --name=vlm_ros_base pytorch tensorrt ros:humble-ros-base
#   docker build --build-arg BASE_IMAGE=vlm_ros_base:<tag> -f docker/jetson.Dockerfile .
# Its L4T major version must match the host's (R36 = JetPack 6). Not built here: no arm64
# base images and no Docker daemon are reachable from this project's machines (README).
ARG BASE_IMAGE=dustynv/ros:humble-pytorch-l4t-r36.4.0
FROM ${BASE_IMAGE}

# torch comes only from JetPack / NVIDIA's Jetson index, never PyPI's aarch64 wheel (no CUDA
# for Tegra); this index is what the jetson-containers builds use for JetPack 6.
ARG JETSON_PIP_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# The Python dependencies, with the same rule as scripts/setup.sh on a Jetson
# (scripts/platform.sh): requirements.txt less torch and the dev tools, torch pinned to the
# version the base image ships so that pip can never replace it, numpy < 2 (its ABI).
COPY scripts/requirements.txt scripts/platform.sh /tmp/vlm_ros/
# (torch unpinned: only if the base lacks it, the index's one build for this JetPack)
# hadolint ignore=DL3013
RUN python3 -c "import torch" 2>/dev/null \
        || pip3 install --index-url "${JETSON_PIP_INDEX}" torch \
    && python3 -c "import tensorrt" \
    && . /tmp/vlm_ros/platform.sh \
    && sed '/^# dev/,$d' /tmp/vlm_ros/requirements.txt > /tmp/vlm_ros/runtime.txt \
    && jetson_requirements /tmp/vlm_ros/runtime.txt \
        "$(python3 -c 'import torch; print(torch.__version__)')" /tmp/vlm_ros \
    && pip3 install -r /tmp/vlm_ros/requirements-jetson.txt -c /tmp/vlm_ros/constraints-jetson.txt \
    && rm -rf /tmp/vlm_ros

# The package, built with colcon against the image's ROS 2 Humble.
WORKDIR /ws
COPY . /ws/src/vlm_ros
COPY docker/ros_entrypoint.sh /vlm_ros_entrypoint.sh
RUN . /vlm_ros_entrypoint.sh \
    && colcon build --packages-select vlm_ros --cmake-args -DBUILD_TESTING=OFF \
    && rm -rf build log

ENTRYPOINT ["/vlm_ros_entrypoint.sh"]
CMD ["ros2", "launch", "vlm_ros", "assistant.launch.py", "demo:=true"]
