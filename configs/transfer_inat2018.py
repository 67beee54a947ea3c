r"""Transfer to iNaturalist 2018 (documented, not run on the project machines).

TFDS i_naturalist2018 (8,142 species; 437,513 train / 24,426 validation), prepared with
`tfds build i_naturalist2018 --data_dir=...` (needs the manual download). Score: top-1 on
validation (the paper's convention; mean per-class is reported too). Linear logistic
regression on frozen center-crop features, L2 chosen on a 20 % held-out part of train
(features: 437 k x 2048 float32 = 3.6 GB per host; the head has 16.7 M weights).

Command:

  python -m bt_jax.main --config=configs/transfer_inat2018.py --workdir=/tmp/bt_inat \
      --config.pretrained_workdir=/ckpt/bt_imagenet --config.data.data_dir=$TFDS_DATA_DIR

Expected: transfer_linear_top1 46.5 (paper, linear on frozen ResNet-50 features).
"""

from bt_jax.data.config import data_config
from bt_jax.defaults import eval_config, finetune_config, parse_variant, transfer_config


def get_config(variant: str = ""):
    parse_variant(variant, "transfer_inat2018")
    config = eval_config("transfer")
    config.expected_arch = "resnet50"
    config.data = data_config("i_naturalist2018", eval_split="validation")
    config.transfer = transfer_config(protocols=("linear",), metric="top1")
    config.transfer.linear.max_iter = 200
    config.finetune = finetune_config()
    return config
