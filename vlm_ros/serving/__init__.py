"""The ROS-free runtime around the core that the node and the bag replay share: the single
inference worker with its bounded priority queue, and latency budgets with rolling windows."""
