"""pip/setuptools entry for the pure-Python package; the metadata lives in pyproject.toml.

The ROS 2 build (interfaces + Python package) is CMakeLists.txt (ament_cmake + ament_cmake_python).
"""

from setuptools import setup

setup()
