#!/usr/bin/env bash
# Source the image's ROS 2 (apt installs: /opt/ros/$ROS_DISTRO/setup.bash; jetson-containers'
# source builds: $ROS_ROOT/install/setup.bash), then this workspace's overlay once built, then
# run the command. Sourced by the Dockerfiles' build step too (then with no arguments).
for setup in "${ROS_ROOT:-/opt/ros/${ROS_DISTRO:-humble}}/install/setup.bash" \
    "/opt/ros/${ROS_DISTRO:-humble}/setup.bash"; do
    if [[ -f "$setup" ]]; then
        # shellcheck disable=SC1090
        source "$setup"
        break
    fi
done
# shellcheck disable=SC1091
[[ -f /ws/install/setup.bash ]] && source /ws/install/setup.bash
if (( $# )); then
    exec "$@"
fi
