"""One module per ``vlm-ros`` command (see vlm_ros.cli)."""
