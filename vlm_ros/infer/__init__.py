"""Per-request inference over a loaded model: preprocess -> vision -> prompt/splice -> decode
-> rank, composed by ``pipeline.Assistant``. ROS-free; the compiled and quantized engines it
can run on live one floor below, in ``vlm_ros.engines``."""
