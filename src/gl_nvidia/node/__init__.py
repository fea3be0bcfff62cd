"""The node runtime: `nvidia-driver`, run by the GPU Operator inside the driver image. Standard library only."""
