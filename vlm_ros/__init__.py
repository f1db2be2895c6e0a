"""vlm_ros: a small vision-language model (LLaVA-Phi, TinyLLaVA, Mipha) as a ROS 2 assistant.

The package is split in two: a ROS-free core (everything except ``vlm_ros.ros.node``) that turns
(image, question) into an answer or an action hint, and a thin rclpy node around it.

``extend_path`` lets the rosidl-generated interface modules (``vlm_ros.msg``, ``vlm_ros.srv``,
``vlm_ros.action``), which are built into a separate install prefix, live beside this source tree
under the same package name that ``ros2 service call ... vlm_ros/srv/Ask`` expects.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
