"""sslbench: one pretrain -> finetune -> evaluate protocol for self-supervised 3D medical imaging."""

__version__ = "0.1.0"
