"""twist-scale: TwIST independent subnetwork training on DeepSpeed ZeRO and FSDP2."""

__version__ = "0.1.0"
