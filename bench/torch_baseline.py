"""The official PyTorch Barlow Twins train step, for timing against bt_jax in the same run.

Written from facebookresearch/barlowtwins main.py: its BarlowTwins module (backbone without
fc, projector Linear(no bias)-BN-ReLU, affine-free BatchNorm1d on z, C = bn(z1)^T bn(z2) /
batch summed over GPUs with torch.distributed.all_reduce when a process group is up), its
LARS (weight decay and trust ratio skipped for ndim == 1 parameters, momentum accumulated
before the learning rate) and adjust_learning_rate (linear warm-up, cosine to 0.001 x).
What differs, so that both sides build the same network: the backbone is a torchvision-
layout ResNet written here with bt_jax's width multiplier, CIFAR stem and stage sizes
(torchvision's resnet18/50 have no width knob); its parameter names are torchvision's, so
bt_jax.export's state dicts load into it (tests/test_torch_baseline.py checks the two
models give the same loss). Mixed precision is bf16 autocast (the official fp16 autocast +
GradScaler exists to protect fp16; bf16 needs no scaler). Inputs are synthetic, already
normalised on the device: the step alone is timed, as bench/train_step.py times bt_jax's.

    bench = TorchStep(arch="resnet18", width=0.25, cifar_stem=True,
                      projector="2048-2048-2048", batch=256, image_size=32)
    seconds = bench.run(steps=5)        # 5 optimizer steps, synchronised
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

# name -> (block type, blocks per stage), as bt_jax.models.resnet.ARCHS
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _conv(cin, cout, kernel, stride=1):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = _conv(cin, width, 3, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (self.downsample(x) if self.downsample else x))


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = _conv(cin, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, 4 * width, 1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, 4 * width, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample else x))


def _shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision's ResNet without fc (zero_init_residual=True), plus bt_jax's knobs."""

    def __init__(self, arch="resnet50", width=1.0, cifar_stem=False, stage_sizes=None):
        super().__init__()
        kind, stages = ARCHS[arch]
        stages = tuple(stage_sizes) if stage_sizes else stages
        block = BasicBlock if kind == "basic" else Bottleneck
        base = int(64 * width)
        self.conv1 = _conv(3, base, 3) if cifar_stem else _conv(3, base, 7, 2)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        cin = base
        for stage, count in enumerate(stages):
            blocks = []
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(cin, base * 2**stage, stride))
                cin = base * 2**stage * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.num_features = cin
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # the last BN of every residual block starts at 0
            if isinstance(m, BasicBlock | Bottleneck):
                nn.init.zeros_((m.bn2 if isinstance(m, BasicBlock) else m.bn3).weight)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return torch.flatten(x.mean((2, 3)), 1)


class BarlowTwins(nn.Module):
    """main.py's model: forward(y1, y2) returns the loss."""

    def __init__(self, backbone, projector="8192-8192-8192", batch_size=2048, lambd=0.0051):
        super().__init__()
        self.backbone = backbone
        self.batch_size, self.lambd = batch_size, lambd
        sizes = [backbone.num_features] + [int(s) for s in projector.split("-")]
        layers = []
        for i in range(len(sizes) - 2):
            layers += [
                nn.Linear(sizes[i], sizes[i + 1], bias=False),
                nn.BatchNorm1d(sizes[i + 1]),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)  # standardises z per view

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2) / self.batch_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(c)  # the official sum of C over the GPUs
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        return on_diag + self.lambd * off_diagonal(c).pow(2).sum()


def off_diagonal(x):
    """The n (n - 1) off-diagonal entries of a square matrix, as a flat view (main.py's)."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class LARS(torch.optim.Optimizer):
    """main.py's LARS: groups whose filter excludes ndim == 1 skip decay and trust ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not exclude_bias_and_norm(p):
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(
                        p_norm > 0,
                        torch.where(u_norm > 0, group["eta"] * p_norm / u_norm, one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def exclude_bias_and_norm(p) -> bool:
    return p.ndim == 1


def learning_rate(step, *, batch, warmup_steps, total_steps, end_factor=0.001) -> float:
    """adjust_learning_rate's factor (times lr_weights or lr_biases)."""
    base = batch / 256
    if step < warmup_steps:
        return base * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    return base * q + base * end_factor * (1 - q)


class TorchStep:
    """The official train step on one fixed synthetic batch, ready to be timed."""

    def __init__(
        self,
        *,
        arch="resnet50",
        width=1.0,
        cifar_stem=False,
        stage_sizes=None,
        projector="8192-8192-8192",
        batch=256,
        image_size=224,
        dtype="float32",
        lambd=0.0051,
        lr_weights=0.2,
        lr_biases=0.0048,
        weight_decay=1.5e-6,
        eta=0.001,
        device=None,
        channels_last=None,
        seed=0,
    ):
        torch.manual_seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as main.py
        channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        backbone = ResNet(arch, width, cifar_stem, stage_sizes)
        self.model = BarlowTwins(backbone, projector, batch, lambd).to(
            self.device, memory_format=memory_format
        )
        weights = [p for p in self.model.parameters() if p.ndim != 1]
        biases = [p for p in self.model.parameters() if p.ndim == 1]
        self.optimizer = LARS(
            [{"params": weights}, {"params": biases}], lr=0, weight_decay=weight_decay, eta=eta
        )
        self.lrs = (lr_weights, lr_biases)
        self.batch, self.step_count = batch, 0
        self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        shape = (batch, 3, image_size, image_size)
        self.views = [
            torch.randn(shape, device=self.device).contiguous(memory_format=memory_format)
            for _ in range(2)
        ]

    def step(self) -> torch.Tensor:
        factor = learning_rate(
            self.step_count, batch=self.batch, warmup_steps=10, total_steps=10**6
        )
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = factor * lr
        self.optimizer.zero_grad()
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            loss = self.model(*self.views)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, from a synchronised start to a synchronised end."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return time.perf_counter() - t0

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


def describe() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
