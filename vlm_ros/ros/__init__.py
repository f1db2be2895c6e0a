"""ROS 2 glue: the lifecycle node, its parameters, message conversion both ways and the
synthetic camera. Only ``node`` and ``synthetic_camera`` import rclpy, and only this package
(and the ``node`` command) may; nothing in the core imports it."""
