# vlm_ros on an x86-64 desktop with an NVIDIA GPU: ROS 2 Jazzy (Ubuntu 24.04), PyTorch's CUDA
# wheel from PyPI (the x86-64 default; it bundles the CUDA runtime, so the host needs only the
# driver and the NVIDIA Container Toolkit).
#
#   docker build -f docker/desktop-cuda.Dockerfile -t vlm_ros:desktop .   # repo root
#   docker run --gpus all -it --rm --network host vlm_ros:desktop        # the offline demo
#   docker run --gpus all -it --rm --network host -v ~/models:/models vlm_ros:desktop \
#       ros2 launch vlm_ros assistant.launch.py model:=/models/Mipha-3B \
#       params_file:=/ws/install/vlm_ros/share/vlm_ros/config/mipha_desktop_gpu.yaml
#
# TENSORRT: a pip requirement for TensorRT's Python wheels (e.g. tensorrt-cu12), for the
# TensorRT vision stage; empty (the default) leaves it out. Not built here: no Docker daemon
# is reachable from this project's machines (README).
ARG BASE_IMAGE=ros:jazzy-ros-base
FROM ${BASE_IMAGE}
ARG TENSORRT=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04 marks the system Python as externally managed; in this image it is ours.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# (unpinned: ROS 2 packages follow the distribution's sync, the base image's own)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip \
        ros-jazzy-diagnostic-msgs ros-jazzy-sensor-msgs ros-jazzy-launch-ros \
    && rm -rf /var/lib/apt/lists/*

# requirements.txt less the dev tools; --ignore-installed: pip must not try to uninstall the
# Debian-packaged modules ROS 2 brought (they have no RECORD file)
COPY scripts/requirements.txt /tmp/vlm_ros/requirements.txt
RUN sed '/^# dev/,$d' /tmp/vlm_ros/requirements.txt > /tmp/vlm_ros/runtime.txt \
    && pip3 install --ignore-installed -r /tmp/vlm_ros/runtime.txt ${TENSORRT:+"$TENSORRT"} \
    && rm -rf /tmp/vlm_ros

WORKDIR /ws
COPY . /ws/src/vlm_ros
COPY docker/ros_entrypoint.sh /vlm_ros_entrypoint.sh
RUN . /vlm_ros_entrypoint.sh \
    && colcon build --packages-select vlm_ros --cmake-args -DBUILD_TESTING=OFF \
    && rm -rf build log

ENTRYPOINT ["/vlm_ros_entrypoint.sh"]
CMD ["ros2", "launch", "vlm_ros", "assistant.launch.py", "demo:=true"]
