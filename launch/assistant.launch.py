"""Launch the vlm_assistant node (and, with demo:=true, a synthetic camera).

    ros2 launch vlm_ros assistant.launch.py [params_file:=F] [namespace:=NS]
        [camera_topic:=/my/camera/image_raw] [model:=DIR_OR_HUB_ID] [device:=cpu|cuda|auto]
        [demo:=true]

A plain launch_ros Node whose ``autostart`` parameter (true in every config) makes it configure
and activate itself: it runs with no lifecycle manager on Humble, Jazzy and Kilted alike, and its
lifecycle services stay available for a manager (set autostart:=false in the YAML to hand over
control). launch_ros's LifecycleNode action would add nothing without a manager emitting
transitions, and its required arguments differ between distributions.

``model`` and ``device`` override the YAML only when given (empty: the YAML's value), so the
node is built in an OpaqueFunction that drops the empty ones.

Camera-sized frames between processes need a larger Fast DDS shared-memory segment in the
*publishing* process (docs/NODE.md, "Camera transport"), so this launch sets
FASTDDS_DEFAULT_PROFILES_FILE to config/fastdds_large_frames.xml for every process it starts
(the demo camera, and a camera driver started after it in the same launch), unless a Fast DDS
profile or transport is set already or another RMW is chosen. The node sets the same itself
(vlm_ros.ros.transport) when started otherwise.
"""

# ruff: noqa: I001 -- ruff takes `launch` for first-party (this folder is named launch/)
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

# the same names as vlm_ros/ros/names.py (test_node_config checks they agree)
NODE_NAME = "vlm_assistant"
CAMERA = "/camera/image_raw"  # the node's default camera input (config/*.yaml: cameras)
OVERRIDES = ("model", "device")  # launch arguments that override the YAML when not empty
LARGE_FRAMES = "fastdds_large_frames.xml"  # in config/
# Any of these set: the user configured Fast DDS's transports (vlm_ros.ros.transport)
USER_TRANSPORT = (
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "FASTRTPS_DEFAULT_PROFILES_FILE",
    "FASTDDS_BUILTIN_TRANSPORTS",
)


def generate_launch_description():
    config = get_package_share_directory("vlm_ros") + "/config/"
    demo = LaunchConfiguration("demo")
    default_params = PythonExpression(
        ["'", config, "demo.yaml' if '", demo, "' == 'true' else '", config, "default.yaml'"]
    )
    args = [
        DeclareLaunchArgument(
            "demo", default_value="false", description="true: demo model on CPU + synthetic camera"
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=default_params,
            description="node parameter YAML (config/*.yaml)",
        ),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument(
            "camera_topic",
            default_value=CAMERA,
            description="camera topic remapped onto the node's input",
        ),
        DeclareLaunchArgument(
            "model",
            default_value="",
            description="checkpoint dir / hub id; empty = the YAML's model",
        ),
        DeclareLaunchArgument(
            "device",
            default_value="",
            description="torch device: cpu, cuda, cuda:N or auto; empty = the YAML's device",
        ),
    ]
    return LaunchDescription(
        args
        + [
            large_frame_transport(config),
            OpaqueFunction(function=assistant),
            Node(
                package="vlm_ros",
                executable="synthetic_camera",
                namespace=LaunchConfiguration("namespace"),
                remappings=[(CAMERA, LaunchConfiguration("camera_topic"))],
                condition=IfCondition(demo),
                output="screen",
            ),
        ]
    )


def large_frame_transport(config):
    """FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_large_frames.xml unless the user chose."""
    unset = [EnvironmentVariable(name, default_value="") for name in USER_TRANSPORT]
    rmw = EnvironmentVariable("RMW_IMPLEMENTATION", default_value="rmw_fastrtps_cpp")
    wanted = PythonExpression(["'", *unset, "' == '' and '", rmw, "'.startswith('rmw_fastrtps')"])
    return SetEnvironmentVariable(
        "FASTDDS_DEFAULT_PROFILES_FILE", config + LARGE_FRAMES, condition=IfCondition(wanted)
    )


def assistant(context):
    """The vlm_assistant node: the YAML, then the OVERRIDES launch arguments that were given."""
    given = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = [{name: value} for name, value in given.items() if value]
    return [
        Node(
            package="vlm_ros",
            executable="assistant_node",
            name=NODE_NAME,
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), *overrides],
            remappings=[(CAMERA, LaunchConfiguration("camera_topic"))],
            output="screen",
            emulate_tty=True,
        )
    ]
