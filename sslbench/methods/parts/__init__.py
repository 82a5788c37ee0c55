"""Pieces that several pre-training methods share, each written once: views (3D crops, VoCo's per-crop
augmentation), the Models Genesis perturbations, 2D augmentations, momentum encoders, the pooled Swin encoder.
A method imports these, never another method's module. (The plain float tensors a method receives are the
protocol's: sslbench/protocol/runtime.py, ``plain_float``.)"""
