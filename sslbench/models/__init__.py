"""The networks every method pre-trains and every task fine-tunes: MONAI SwinUNETR / UNETR / BasicUNet,
Models Genesis' 3D U-Net (unet3d) and PCRL's 2D ResNet-18 U-Net (unet2d), and the explicit key rules by which
checkpoints are mapped onto them (backbones)."""
from .backbones import build_model

__all__ = ["build_model"]
