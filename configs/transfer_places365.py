r"""Transfer to Places365 (documented, not run on the project machines: 1.8 M images).

TFDS places365_small (256 x 256 images; 1,803,460 train / 36,500 validation, 365 scenes),
prepared with `tfds build places365_small --data_dir=...`. Score: top-1 on validation.
The paper's scene number is Places-205 (54.1 % top-1, linear on frozen ResNet-50 features);
Places-205 is not in TFDS, and this is its closest TFDS substitute, so the numbers are not
comparable one to one.
linear: logistic regression on center-crop features with L2 chosen on a 20 % held-out part of
train. Features of the train split are 1.8 M x 2048 float32 = 15 GB on every host.
finetune is off by default (100 k steps per epoch); turn it on with
--config.transfer.protocols='("linear", "finetune")'.

Command:

  python -m bt_jax.main --config=configs/transfer_places365.py --workdir=/tmp/bt_places \
      --config.pretrained_workdir=/ckpt/bt_imagenet --config.data.data_dir=$TFDS_DATA_DIR

Expected: results.json with transfer_linear_top1 (the paper's Places-205 linear: 54.1).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, finetune_config, parse_variant, transfer_config


def get_config(variant: str = ""):
    parse_variant(variant, "transfer_places365")
    config = eval_config("transfer")
    config.expected_arch = "resnet50"
    config.data = data_config("places365_small", eval_split="validation")
    config.transfer = transfer_config(protocols=("linear",), metric="top1")
    config.transfer.linear.max_iter = 200
    config.finetune = finetune_config()
    return config
