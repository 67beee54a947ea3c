r"""Transfer to PASCAL VOC 2007 classification: VISSL's linear-SVM benchmark, mAP.

TFDS voc/2007 (20 classes, multi-label; trainval 5,011 / test 4,952), prepared with
`tfds build voc/2007 --data_dir=...`. The protocol of VISSL's
eval_resnet_8gpu_transfer_voc07_svm.yaml and svm_trainer.py, which produced the paper's
number (bt_jax/evaluation/svm.py, bt_jax/data/multilabel.py):
- images: Resize(256) (shorter side) then Resize([224, 224]): the whole image squashed, no
  crop; frozen backbone in inference mode, its 2048-d pooled features, L2-normalised;
- one scikit-learn LinearSVC per class (liblinear, squared hinge, L2, dual, class_weight
  {1: 2, -1: 1}, intercept_scaling 1, tol 1e-4, max_iter 2000), its cost chosen among
  0.01, 0.1, 1, 2, 5, 10, 15, 20, 50, 100, 1000 by cross_val_score(cv=3) on AP over
  trainval in VISSL's row order (sorted image names), then refit on all of trainval;
- "difficult"-only images are negatives in training and ignored in the test AP; the AP is
  VISSL's (monotone precision envelope summed over recall steps, not 11-point); mAP on test.

Commands:

  python -m bt_jax.main --config=configs/transfer_voc2007.py --workdir=/tmp/bt_voc07 \
      --config.pretrained_workdir=/ckpt/bt_imagenet --config.data.data_dir=$TFDS_DATA_DIR

  # the official Barlow Twins ResNet-50 (torch.hub's resnet50.pth, a torchvision state dict)
  python -m bt_jax.main --config=configs/transfer_voc2007.py --workdir=/tmp/bt_voc07_official \
      --config.pretrained_torchvision=/ckpt/resnet50.pth --config.data.data_dir=$TFDS_DATA_DIR

  # as barlowtwins#32 posted its VISSL config: Resize(256) + CenterCrop(224) instead
  ... --config.transfer.svm.center_crop=True

Expected: transfer_svm_map 86.2 (paper, Table 3, ResNet-50 after 1000 epochs). The official
checkpoint (torch.hub's, ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth) measured
with VISSL, facebookresearch/barlowtwins#32: "The accuracy I got is 86.830912% which is
quite a bit higher than the 86.2% reported in your paper", with "default config in vissl
with LINEAR_EVAL_FEAT_POOL_OPS_MAP removed since we only want to test the last layer
features" (so the pooled 2048-d features, as here); the config it posts has
CenterCrop [224, 224] after Resize 256 (center_crop=True above), where VISSL's file has a
second Resize. The pixels follow PIL's within 2 levels (bilinear rounding; tests).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, parse_variant, transfer_config


def get_config(variant: str = ""):
    parse_variant(variant, "transfer_voc2007")
    config = eval_config("transfer")
    config.expected_arch = "resnet50"
    config.data = data_config("voc/2007", train_split="train+validation", eval_split="test")
    config.transfer = transfer_config(protocols=("svm",), metric="top1")
    return config
