"""gl-nvidia: NVIDIA data center GPU drivers for Kubernetes nodes running Garden Linux."""

__version__ = "0.1.0"
