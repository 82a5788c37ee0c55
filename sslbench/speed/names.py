"""Names the speed layer and the methods' recipes share (a leaf module: it imports nothing)."""

#: the forms of Swin window attention (``run.attention``, ``method.params.attention``): sslbench's fused Triton
#: kernels, SDPA, or MONAI's modules as they are (``fast_swin``)
ATTENTIONS = ("fused", "sdpa", "monai")
