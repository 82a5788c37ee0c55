"""Fine-tuning augmentation: the crops of one step always stack (90-degree rotations on non-cubic ROIs)."""
import monai.transforms as mt
import torch
from sslbench.data.transforms import rotation_plane, train_augmentation


def test_rotation_plane_keeps_monais_default_unless_a_rotated_crop_could_not_stack():
    assert rotation_plane((96, 96, 96), 8) == (0, 1)       # the paper presets: MONAI's default plane
    assert rotation_plane((64, 64, 32), 4) == (0, 1)       # the tiny presets: a (0, 1) turn keeps 64 x 64
    assert rotation_plane((64, 32, 32), 1) == (0, 1)       # one crop a step: nothing to stack it with
    assert rotation_plane((64, 32, 32), 2) == (1, 2)       # the first plane of equal sizes
    assert rotation_plane((32, 64, 32), 2) == (0, 2)
    assert rotation_plane((64, 48, 32), 2) is None         # all sizes differ: no rotation


def test_crops_of_a_non_cubic_roi_stack_on_every_draw():
    task = {"finetune": {"roi": [32, 16, 16], "pos": 1, "neg": 1, "num_samples": 4, "batch_size": 1}}
    aug = train_augmentation(task)
    image = torch.rand(1, 40, 40, 40)
    label = torch.zeros(1, 40, 40, 40)
    label[0, 10:30, 10:30, 10:30] = 1
    shapes = set()
    for seed in range(40):                                 # p = 0.1 per crop: ~16 rotations in 160 crops
        aug.set_random_state(seed)
        crops = aug({"image": image.clone(), "label": label.clone()})
        batch = torch.stack([c["image"].as_tensor() for c in crops])    # the step's stack: must not raise
        shapes.add(tuple(batch.shape))
    assert shapes == {(4, 1, 32, 16, 16)}
    rot = [t for t in aug.transforms if isinstance(t, mt.RandRotate90d)]
    assert len(rot) == 1 and tuple(rot[0].spatial_axes) == (1, 2)
    # the same draws with MONAI's default plane turn some crops to 16 x 32 x 16: a step that cannot be stacked
    rot[0].spatial_axes = (0, 1)
    odd = set()
    for seed in range(40):
        aug.set_random_state(seed)
        odd |= {tuple(c["image"].shape) for c in aug({"image": image.clone(), "label": label.clone()})}
    assert (1, 16, 32, 16) in odd and (1, 32, 16, 16) in odd
