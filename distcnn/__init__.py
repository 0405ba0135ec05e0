"""distcnn: train CNNs with torchrun DDP and measure what each design choice costs."""

__version__ = "0.1.0"
