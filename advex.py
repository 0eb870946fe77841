"""advex: "Adversarial Examples Are Not Bugs, They Are Features" (Ilyas et al. 2019, arXiv 1905.02175) and the six
responses of the Distill 2019 discussion around it, in one file you can read top to bottom.

    python advex.py ilyas --scale quick        # Sec. 3 end to end at tiny size: seconds on a CPU, numbers meaningless
    python advex.py ilyas --scale cpu          # laptop scale, real data: all of run_all.sh in ~38 min on 2 CPU cores
    python advex.py ilyas                      # full size: one GPU (README: Speed)
    python advex.py EXPERIMENT --help          # the flags EXPERIMENT reads, with their units
    model = advex.load("runs/artifacts/robust-fastnet-s0-....pt")     # from Python: [0,1] images in, logits out

The file in order. The science first, in the paper's order: Config; Data; Models; Attacks (PGD); Inversion (Sec. 3.1);
Relabelling (Sec. 3.2); Training; Evaluation; Experiments (Ilyas Sec. 3 and Fig. 3, then the responses: Wallace,
Nakkiran, Goh's leakage, Gilmer & Hendrycks, Goh's linear features, Nakano). After the PLUMBING banner, what a reader
of the method can skip: the artifact cache, results and claims, figures, files, the CLI.
Where to change what:
  * a new way to build a training set (Sec. 3): one function and one row of CONSTRUCTIONS; its keyword arguments
    are Config fields (add one for a new knob), and they, its inputs and this file's text key its artifact.
  * a new experiment: a function exp_NAME(cfg, dev) -> records, and one row of EXPERIMENTS.
  * a new claim: one row of CLAIMS; a published number: one entry of PAPER.
Conventions, everywhere in this file:
  * images live in [0,1] pixel space, (B, C, H, W); each model normalises inside itself, so every eps is in pixel
    units: an L2 radius over all C*H*W values, or an Linf bound (8/255 = 0.0314).
  * g(x) = model.features(x), the penultimate representation (B, D); logits = model.head(g(x)).
  * attacks keep x and delta in fp32; only the model's forward pass runs in bf16 (autocast), on CUDA and on CPUs with
    AMX (--precision fp32: never); the inversion's steps too, its target g(x) and the distance it reports in fp32.
  * every stage's output (checkpoint, dataset, evaluation) is stored under a key made of its settings, the
    fingerprints of the tensors and models it was made from, the seed and this file's text: a changed procedure or
    input never reuses an old artifact, and an interrupted run resumes.
  * one seed, one result: the same command with the same seed on a CPU writes the same numbers.
Measured numbers, with hardware and wall times, are in README.md.
"""
import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("fastnet", "resnet18", "resnet50", "vgg16")  # CIFAR-10 architectures (Models)

# =====================================================================================================================
# Config: every setting, its unit and its allowed values; the CLI is generated from it (python advex.py EXP --help)
# =====================================================================================================================

def knob(default, allowed):
    """A Config field whose allowed values are not the rule for numbers (finite and > 0): one of RULES, a tuple of
    choices (for a tuple field: of each element), 'file' (empty or an existing file) or a regular expression."""
    return dataclasses.field(default=default, metadata={"allowed": allowed})


RULES = {">0": lambda v: v > 0, ">=0": lambda v: v >= 0, ">=2": lambda v: v >= 2, "0 or >=2": lambda v: v == 0 or v >= 2,
         "[0,1)": lambda v: 0 <= v < 1, "(0,1]": lambda v: 0 < v <= 1, "1..16": lambda v: 1 <= v <= 16,
         "0..15": lambda v: 0 <= v <= 15, "1..32": lambda v: 1 <= v <= 32, ">=16": lambda v: v >= 16, "(0,100]": lambda v: 0 < v <= 100}


@dataclass
class Config:
    # where things are and how to run; none of these changes a number, so none is part of a key
    data: str = "data"            # dataset root in torchvision's layout: cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/
    out: str = "runs"             # results.json, results.md, PNG figures, artifacts/ (checkpoints, datasets, evaluations)
    download: bool = True         # try torchvision's download when dataset files are missing
    device: str = knob("auto", re.compile(r"auto|cpu|cuda(:\d+)?"))  # auto (cuda when there is one) | cpu | cuda | cuda:N
    precision: str = knob("auto", ("auto", "fp32"))  # auto: models run in bf16 on CUDA and on CPUs with AMX, fp32 elsewhere | fp32: everywhere
    compile: bool = False         # CUDA only: torch.compile each model's body, CUDA graphs (eager if that fails)
    attack_batch: int = 4096      # images per attack, inversion and evaluation chunk (lower it when memory is short)
    seed: int = knob(0, ">=0")    # the first seed
    seeds: int = 1                # how many seeds: --seed, --seed+1, ...; results.md shows mean ± std over them
    scale: str = knob("full", ("full", "cpu", "quick", "paper"))  # full: one GPU | cpu: laptop | quick: seconds, for tests | paper: the paper's recipe (SCALES)
    since: float = knob(0.0, ">=0")  # report: time only the stages run after this Unix time (run_all.sh passes its start)
    # the paper's own source models (MadryLab's release; README, "Use from Python")
    standard_from: str = knob("", "file")  # checkpoint used as the standard model (MadryLab's ResNet-50 cifar_nat.pt)
    robust_from: str = knob("", "file")    # ... as the robust model (cifar_l2_0_5.pt, or RobustBench's Engstrom2019Robustness)
    # the standard source: Ilyas et al.'s standard model, whose D_NR, D_rand and D_det Sec. 3 is about, of the paper's
    # kind: accurate and NOT robust. Its recipe (README, "The standard source"): a plain network (ReLU, average pooling,
    # no logit scale), the standard recipe below with plain cross-entropy, trained long (robustness kept falling with
    # epochs long after accuracy stopped rising). The paper's: a ResNet-50, 150 epochs.
    std_arch: str = knob("resnet18", ARCHS)  # its architecture (also Fig. 3's source)
    std_epochs: int = 40          # its epochs of standard training
    std_augment: str = knob("crop+flip", ("crop+flip", "flip", "none"))  # its augmentation (laptop scale: flips only)
    # every other model (the paper trains a ResNet-50 for 150 epochs; the fast net gets close in ~10)
    arch: str = knob("fastnet", ARCHS)  # CIFAR-10 model: the robust source, the models trained on constructed sets, ...
    width: int = knob(64, ">=2")  # base channel width (fastnet: w, 4w, 4w; resnets and vgg16: w..8w)
    fastnet_act: str = knob("relu", ("relu", "gelu"))  # fastnet: activation (airbench: gelu)
    fastnet_pool: str = knob("avg", ("avg", "max"))  # fastnet: global pooling after the last block (airbench: max)
    fastnet_scale: float = 1.0    # fastnet: g(x) times this (airbench: 1/8, small early logits)
    n_train: int = knob(0, ">=0")  # use the first n training images (0 = all)
    n_test: int = knob(0, ">=0")  # evaluate on the first n test images (0 = all)
    n_val: int = 5000             # ablations: validate on the last n training images, held out (never the test images)
    epochs: int = 10              # epochs of standard training
    batch: int = 512              # training batch size
    lr: float = 0.2               # peak learning rate: linear warm-up over 20% of the steps, then linear to 0
    momentum: float = knob(0.9, "[0,1)")  # SGD momentum
    optimizer: str = knob("sgd", ("sgd", "step"))  # sgd: Nesterov, one cycle (lr up over 20% of the steps, then to 0) | step: MadryLab's (lr / 10 after each third)
    wd: float = knob(5e-4, ">=0")  # weight decay
    augment: bool = True          # CIFAR training augmentation: random crop with 4-px zero padding, horizontal flip
    # adversarial training (Ilyas et al. App. C / Madry et al. 2018): L2 PGD inside the training loop
    adv_epochs: int = 20          # epochs of adversarial training
    adv_eps: float = knob(0.5, ">=0")  # L2 radius, pixel units
    adv_steps: int = 7            # PGD steps per training batch
    adv_step: float = 0.1         # L2 step length; the highest-loss iterate is used
    # evaluation: untargeted L2 PGD, step 2.5*eps/steps; the paper's own attack (7 steps of eps/5) is reported too
    eval_eps: tuple = knob((0.25,), ">=0")  # L2 radii, comma list
    eval_steps: int = 20          # PGD steps
    eval_restarts: int = 1        # >1: extra random starts; an example is robust only if no iterate of any start fools it
    # Ilyas Sec. 3.1: robust / non-robust datasets by representation inversion
    inv_method: str = knob("fast", ("fast", "paper"))  # fast: Polyak step lengths, momentum 0.8 | paper: 1000 plain steps of 0.1
    inv_steps: int = 150          # gradient steps on ||g(z) - g(x)||_2 (--inv-method paper: 1000 unless given)
    inv_step: float = 1.0         # L2 step length, pixel units: fast: the longest step | paper: every step (0.1 unless given)
    # Ilyas Sec. 3.2: relabelled adversarial datasets by targeted L2 PGD on the standard model
    rel_eps: float = knob(1.0, ">=0")  # L2 radius, pixel units (the paper: 0.5; README, Deviations)
    rel_steps: int = 50           # PGD steps (the paper: 100; 50 of 0.2 reach 100's fooling rate and margin: RESULTS.md)
    rel_step: float = 0.2         # L2 step length
    rel_keep: str = knob("best", ("best", "final"))  # the iterate kept: the closest to t (MadryLab's use_best) | the last
    rel_lr: float = 0.1           # peak lr on D_rand (the paper: 0.01 there vs 0.1 elsewhere; see README, Deviations)
    con_epochs: int = 15          # epochs of each fresh model trained on D_R, D_NR or D_rand
    det_flips: bool = True        # D_det also from each training image's mirror image, attacked on its own (2N images)
    det_epochs: int = 30          # epochs of each fresh model trained on D_det or its control (over 2N images with det_flips)
    dataset: str = ""             # train-on: folder with CIFAR_ims and CIFAR_lab (MadryLab's released layout)
    export: str = ""              # also write each constructed dataset to EXPORT/NAME/{CIFAR_ims,CIFAR_lab} (float32)
    # Wallace's response: learning from a model's wrong labels
    mis_arch: str = knob("resnet18", ARCHS)  # mislabeled: the teacher's and the student's architecture (Wallace's)
    mis_teacher_epochs: int = 2   # mislabeled: the weak teacher's schedule, in epochs (response: ResNet-18, 2 epochs)
    mis_teacher_acc: float = knob(62.5, "(0,100]")  # mislabeled: ...and it stops once its training accuracy reaches this (%)
    mis_epochs: int = 50          # mislabeled: epochs of the student trained on the teacher's errors only
    mnist_epochs: int = 3         # mnist-fashion: epochs of the MNIST CNN teacher and of each student
    mnist_batch: int = 128        # mnist-fashion: batch size
    mnist_lr: float = 0.05        # mnist-fashion: peak learning rate (same one-cycle schedule)
    # Nakkiran's response; Goh's robust feature leakage; Ilyas Fig. 3
    bugs_k: int = 5               # bugs: ensemble size (Nakkiran: 10); costs K trainings and K+1 passes per attack step
    squares_arch: str = knob("resnet18", ARCHS)  # squares: the memorising network's architecture (Nakkiran's)
    squares_n: int = 10000        # squares: training images (the test set is a tenth of it)
    squares_epochs: int = 20      # squares: epochs of the network that memorises the noisy labels (Adam, batch 128)
    squares_lr: float = 1e-5      # squares: Adam's constant learning rate (Nakkiran: 1e-5)
    leak_eps: float = knob(1.0, ">=0")  # leakage: L2 radius of its adversarial training (0.5 left Spec 2 unmet: README)
    leak_epochs: int = 10         # leakage: epochs of that linear classifier
    leak_lr: float = 0.002        # leakage: its peak lr (a linear model on 3072 correlated pixels diverges at 0.2)
    leak_batch: int = 512         # leakage: its batch size (a linear model is launch-bound on a GPU: RESULTS.md)
    transfer_archs: tuple = knob(("fastnet", "resnet18", "vgg16"), ARCHS)  # transfer: architectures, --std-arch among them
    transfer_width: int = knob(0, "0 or >=2")  # transfer: base width of the architectures other than the source (0 = --width)
    # Gilmer & Hendrycks: frequency
    freq_high: int = knob(8, "1..16")  # frequency: the high-pass filter keeps the 2D frequencies with max(|kx|,|ky|) >= this
    freq_low: int = knob(2, "0..15")  # frequency: the low-pass filter keeps max(|kx|,|ky|) <= this
    freq_norm: float = 4.0        # frequency: L2 norm (pixel units) of each Fourier basis perturbation (Yin et al.: 4)
    freq_images: int = 1000       # frequency: test images per Fourier basis image of the heat map (Yin et al.: 1000)
    # Goh: two examples of useful, non-robust features (CIFAR-10 trucks vs frogs)
    lin_eps: float = 0.25         # linear-features: L2 radius of robust usefulness
    lin_robustness: float = knob(0.0037, "(0,1]")  # linear-features: ensemble of the directions below this x the top robustness
    #                               (Goh's threshold, e^-9.115, was e^-5.6 = 0.0037 of his most robust direction's)
    lin_size: int = knob(32, "1..32")  # linear-features: image side after area downsampling (32: all 3072 values; quick: 8)
    lin_null: int = 1000          # linear-features: shuffles of the training labels in the ensemble's permutation null
    # Nakano: robust style transfer
    style_eps: tuple = (0.25, 0.5)  # style: L2 radii of the layer robustness R(f), pixel units
    style_steps: int = 20         # style: PGD steps of R(f)'s inner max
    style_images: int = 1000      # style: test images that R(f) averages over
    style_size: int = knob(64, ">=16")  # style: side of the stylised images (CIFAR content is upsampled to it)
    style_iters: int = 300        # style: Adam steps of the style transfer
    style_image: str = knob("", "file")    # style: the style image (JPEG, PNG, ...; default: a seeded texture)
    content_image: str = knob("", "file")  # style: the content image (default: the first four CIFAR-10 test images)


# Sizes by --scale, applied to every field a flag does not set; "full" is the defaults above (README: Deviations).
# cpu: chosen by measurement on a 2-core CPU (RESULTS.md, "How the laptop preset was chosen").
# quick: every experiment in seconds (the tests). paper: the paper's own recipe, for GPU-hours (README, Speed).
SCALES = {
    "full": {},
    "cpu": dict(n_train=10000, n_test=2000, n_val=2000, leak_batch=256, std_arch="fastnet", std_epochs=30, std_augment="flip", width=16, epochs=15, batch=256, adv_epochs=10, adv_steps=4, adv_step=0.2,
                eval_steps=10, attack_batch=256, inv_steps=30, rel_eps=2.0, rel_steps=20, rel_step=0.25,
                con_epochs=25, det_epochs=50, mis_teacher_epochs=8, mis_epochs=20, mnist_epochs=10, bugs_k=3, squares_n=2000,
                squares_lr=3e-4, transfer_width=8, freq_images=200, style_images=200, style_steps=10, style_iters=150),
    "quick": dict(n_train=200, n_test=100, n_val=50, leak_batch=50, std_arch="fastnet", std_epochs=2, width=8, epochs=2, adv_epochs=1, batch=50, adv_steps=2, eval_steps=3,
                  attack_batch=256, inv_steps=5, rel_steps=5, con_epochs=2, det_epochs=1, mis_teacher_epochs=1, mis_epochs=2,
                  mnist_epochs=1, mnist_batch=50, bugs_k=2, squares_n=400, squares_epochs=3, leak_epochs=2,
                  freq_images=4, lin_size=8, lin_robustness=0.5, lin_null=50, style_images=8, style_steps=2, style_size=32, style_iters=3),
    # paper: Ilyas et al.'s recipe (App. C; MadryLab's robustness library where the paper is silent; README, Deviations):
    # ResNet-50 for every Sec. 3 model, 150 epochs of SGD lr 0.1 (D_rand 0.01), momentum 0.9, wd 5e-4, batch 128, lr / 10
    # at epochs 50 and 100; the attacks, the inversion (1000 steps of 0.1) and the relabelling at their paper settings.
    "paper": dict(std_arch="resnet50", arch="resnet50", std_epochs=150, epochs=150, adv_epochs=150, con_epochs=150,
                  det_epochs=150, det_flips=False, rel_eps=0.5, rel_steps=100, rel_step=0.1, batch=128, lr=0.1, rel_lr=0.01, optimizer="step",
                  inv_method="paper", transfer_archs=("resnet50", "resnet18", "vgg16")),
}


class AdvexError(Exception):
    """Bad input (missing data, wrong shapes, bad settings, NaN loss): the CLI prints it as one line, exit 2."""


def log(msg):
    print(msg, flush=True)


# =====================================================================================================================
# Data: each split lives in one uint8 tensor on the device (loaded once: Files); floats in [0,1] are made per batch
# =====================================================================================================================

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def to_float(x):
    """uint8 [0,255] -> float32 [0,1]; fp16 / fp32 images (constructed datasets) -> float32 as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def augment_batch(x, pad=4, fill=0.0):
    """Random crop with `pad`-pixel padding of value `fill` (CIFAR's convention: 0) and a random horizontal flip, per
    image, on x's device. x: (B, C, H, W) float -> (B, C, H, W). One gather instead of a Python loop over images."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    rows = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device) + torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    cols = torch.where(torch.rand(B, 1, 1, device=x.device) < 0.5, W - 1 - cols, cols)  # flip
    cols = cols + torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device)
    return xp[torch.arange(B, device=x.device).view(B, 1, 1), :, rows, cols].permute(0, 3, 1, 2)  # (B,H,W,C) -> NCHW


def seed_all(seed, stream):
    """The one seeding helper, called before anything random is drawn. Each stage gets its own stream, so a
    stage's output does not depend on whether the stages before it were computed now or read from disk."""
    torch.manual_seed(zlib.crc32(f"{stream}:{seed}".encode()))


# =====================================================================================================================
# Models: pixels in [0,1] -> normalise -> body -> g(x) (B, D) -> head -> logits (B, classes)
# =====================================================================================================================

class Net(nn.Module):
    """Base of every advex model: normalisation is part of the model, so attacks work in pixel space.
    `stage_ends`: the indices of `body` after which a stage (the stem, each block) ends (Nakano's layers).
    `pixels`: the range its images live in, [0,1] but for Nakkiran's squares. Images beyond it by more than SLACK
    are refused, as uint8 images are: 0..255 floats, or images normalised twice, would give garbage logits."""
    stage_ends, pixels = (), (0.0, 1.0)
    SLACK = 0.5  # advex's own filtered and re-standardised images leave [0,1] by up to 0.3 (low-pass; Fashion-MNIST)

    def __init__(self, mean=None, std=None):
        super().__init__()
        if mean is not None:  # buffers travel with the state_dict, so a checkpoint knows its normalisation
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalize(self, x):
        name, (lo, hi), c = type(self).__name__, self.pixels, self.mean.shape[1]
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != c:
            raise AdvexError(f"{name} takes images (B, {c}, H, W), not {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():  # uint8 pixels would be read as values in [0,255] and give garbage logits
            raise AdvexError(f"{name} takes float images in [{lo:g},{hi:g}], not {x.dtype} (advex.to_float converts uint8)")
        if x.numel() and (x.device.type == "cpu" or not getattr(self, "checked", False)):  # on a GPU the first batch only
            a, b = (v.item() for v in torch.aminmax(x.detach()))
            if not (math.isfinite(a) and math.isfinite(b)):
                raise AdvexError(f"{name}: the images hold NaN or infinite values")
            if a < lo - self.SLACK or b > hi + self.SLACK:
                raise AdvexError(f"{name} takes float images in [{lo:g},{hi:g}], got values from {a:.4g} to {b:.4g} (pixels "
                                 f"in 0..255? divide by 255; normalised images? the model normalises them itself)")
            self.checked = True
        return (x.float() - self.mean) / self.std  # float64 images meet float32 weights as float32

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, act=nn.GELU, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act())


class FastNet(Net):
    """~2M-parameter CIFAR net in the spirit of airbench (Jordan 2024): a conv stem, then three blocks of
    conv -> 2x2 max-pool -> BN -> act -> conv -> BN -> act (widths w, 4w, 4w), a global pool, g scaled by `scale`.
    airbench's choices (GELU, global max-pool, scale 1/8: small early logits for large learning rates) each make a
    standard model more robust than the paper's (README, "The standard source"); act / pool / scale choose."""
    stage_ends = (0, 5, 10, 15)

    def __init__(self, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, act="gelu", pool="max", scale=0.125):
        super().__init__(mean, std)
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        layers, cin = [conv_bn(3, width // 2, act)], width // 2
        for c in (width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c), act(),
                       conv_bn(c, c, act)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes, bias=False)
        self.pool, self.scale = pool, scale

    def features(self, x):  # (B,3,32,32) -> (B,4w)
        h = self.body(self.normalize(x))  # (B,4w,4,4)
        return (h.amax(dim=(2, 3)) if self.pool == "max" else h.mean(dim=(2, 3))) * self.scale


class Block(nn.Module):
    """ResNet block (He et al. 2016): basic (two 3x3 convs) or bottleneck (1x1, 3x3 with the stride, 1x1 with 4x
    expansion), the parameter order of MadryLab's and RobustBench's CIFAR ResNets (Files: their checkpoints load)."""

    def __init__(self, cin, w, stride, bottleneck):
        super().__init__()
        cout = 4 * w if bottleneck else w
        if bottleneck:
            self.body = nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                      conv_bn(w, w, nn.ReLU, stride),
                                      nn.Conv2d(w, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.body = nn.Sequential(conv_bn(cin, w, nn.ReLU, stride),
                                      nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w))
        self.skip = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class ResNet(Net):
    """CIFAR ResNet (3x3 stem, no max-pool), as in Ilyas et al. and MadryLab's robustness library.
    ResNet-18: basic blocks [2,2,2,2]; ResNet-50: bottleneck blocks [3,4,6,3] (g(x) is 2048-d)."""

    def __init__(self, depths, bottleneck, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(mean, std)
        layers, cin = [conv_bn(3, width, nn.ReLU)], width
        for i, n in enumerate(depths):
            for j in range(n):
                layers.append(Block(cin, width * 2 ** i, 2 if i > 0 and j == 0 else 1, bottleneck))
                cin = width * 2 ** i * (4 if bottleneck else 1)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)
        self.stage_ends = tuple(itertools.accumulate([0, *depths]))  # the stem, then the end of each group

    def features(self, x):  # (B,3,32,32) -> (B,8w) or (B,32w)
        return self.body(self.normalize(x)).mean(dim=(2, 3))


class VGG(Net):
    """VGG-16 with BatchNorm (Simonyan & Zisserman 2015), CIFAR variant: 13 convs, one linear head."""

    def __init__(self, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(mean, std)
        plan = [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"]  # widths in units of w
        layers, cin = [], 3
        for p in plan:
            layers.append(nn.MaxPool2d(2) if p == "M" else conv_bn(cin, p * width, nn.ReLU))
            cin = cin if p == "M" else p * width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)
        self.stage_ends = tuple(i for i, p in enumerate(plan) if p == "M")

    def features(self, x):  # (B,3,32,32) -> (B,8w)
        return self.body(self.normalize(x)).flatten(1)


class MnistCNN(Net):
    """Small MNIST CNN (LeNet-like): conv5-pool-conv5-pool-fc128, as in Wallace's response."""

    def __init__(self, classes=10, mean=(0.1307,), std=(0.3081,)):
        super().__init__(mean, std)
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def features(self, x):  # (B,1,28,28) -> (B,128)
        return self.body(self.normalize(x))


class LinearNet(Net):
    """A linear classifier on normalised pixels (Goh's robust linear model): g(x) is the normalised image
    flattened (B, C*H*W); the head's C logits are its linear features."""

    def __init__(self, classes=10, shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(mean, std)
        self.head = nn.Linear(math.prod(shape), classes)

    def features(self, x):
        return self.normalize(x).flatten(1)


def make_model(arch, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD, design=None):
    """A fresh model by name (CIFAR-sized: 32x32x3 inputs in [0,1], unless mean/std say otherwise); design: FastNet's
    act / pool / scale (default: airbench's, FastNet's own; the CLI's Config default is the plain design)."""
    if arch == "fastnet":
        return FastNet(width, classes, mean, std, **(design or {}))
    if arch in ("resnet18", "resnet50"):
        return ResNet([2, 2, 2, 2] if arch == "resnet18" else [3, 4, 6, 3], arch == "resnet50", width, classes, mean, std)
    if arch == "vgg16":
        return VGG(width, classes, mean, std)
    if arch == "mnist_cnn":
        return MnistCNN(classes)
    if arch == "linear":
        return LinearNet(classes, mean=mean, std=std)
    raise AdvexError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def stages(model, x, upto=None):
    """Nakano's layers: the activations after each stage of model.body (the stem, then each block or group of
    blocks), [(B, C_s, H_s, W_s)], computed up to stage `upto` (default: all). Any input size."""
    out, h = [], model.normalize(x)
    last = model.stage_ends[-1 if upto is None else upto]
    for i, layer in enumerate(model.body[:last + 1]):
        h = layer(h)
        if i in model.stage_ends:
            out.append(h)
    return out


def cpu_has_amx():
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later) and oneDNN may use them (ONEDNN_MAX_CPU_ISA
    unset or an AMX level). Only there do bf16 convolutions pay on a CPU: measured 1.6x (FastNet-16) to 2.6x
    (ResNet-18) faster than fp32 per training step; with AVX-512-BF16 alone, or emulated, bf16 was slower than fp32."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() and (isa == "ALL" or "AMX" in isa)


BF16 = {"cuda": True, "cpu": False}  # device types whose forward passes run in bf16; main() sets the CPU's (--precision)


@contextlib.contextmanager
def bf16_on(device_type, on):
    """BF16[device_type] = on while inside (main(): --precision), then as it was."""
    was = BF16.get(device_type, False)
    BF16[device_type] = on
    try:
        yield
    finally:
        BF16[device_type] = was


def autocast(device, enabled=True):
    """bf16 autocast for a model's forward pass on a device type that BF16 allows (CUDA; a CPU with AMX), else a
    no-op (fp32). Images, perturbations and losses stay fp32: only the model runs in bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and BF16.get(device.type, False))


@torch.no_grad()
def over_set(model, fn, x, batch=4096, amp=True):
    """fn(x_batch) over a whole set in chunks, in eval mode (the model's mode is restored), under bf16 autocast on
    CUDA when amp. x: (N, ...) uint8 or float images -> torch.cat of fn's outputs."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = to_float(x[i:i + batch])
        with autocast(xb.device, amp):
            out.append(fn(xb))
    model.train(was)
    return torch.cat(out)


def predict(model, x, batch=4096):
    """Argmax predictions (N,)."""
    return over_set(model, lambda xb: model(xb).argmax(dim=1), x, batch)


def pct(mask):
    """The share of True in a boolean tensor, in %, exact (7 of 50: 14.0; no elements: nan)."""
    return 100 * mask.sum().item() / mask.numel() if mask.numel() else math.nan


def accuracy(model, x, y, batch=4096):
    """% of x that the model classifies as y."""
    return pct(predict(model, x, batch) == y)


# =====================================================================================================================
# Attacks: projected gradient descent (Madry et al. 2018) in pixel space
# =====================================================================================================================

def make_objective(loss_fn, amp=True):
    """A pgd objective from loss_fn(x', y) -> (loss (B,) to ascend, success (B,) bool or None): it maps (x' (B,...)
    fp32, y, need_grad) to (loss, d loss / d x' or None, success). Only loss_fn (the model) runs under autocast."""
    def fn(xa, y, need_grad=True):
        xa = xa.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad), autocast(xa.device, amp):
            loss, hit = loss_fn(xa, y)
        grad = torch.autograd.grad(loss.sum(), xa)[0] if need_grad else None
        return loss.detach(), grad, torch.zeros(len(xa), dtype=torch.bool, device=xa.device) if hit is None else hit

    return fn


def ce_objective(model, targeted=False):
    """pgd's default objective. Untargeted: ascend CE(model(x'), y); success = the prediction is not y.
    Targeted (y = targets): ascend -CE(model(x'), y); success = the prediction is y."""
    def loss(xa, y):
        logits = model(xa).float()
        pred = logits.argmax(1)
        return (-1.0 if targeted else 1.0) * F.cross_entropy(logits, y, reduction="none"), (pred == y) if targeted else (pred != y)

    return make_objective(loss)


def project(delta, eps, norm):
    """Per-example projection of delta (B, ...) onto the eps-ball of the given norm (eps may be inf)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return delta * (eps / n).clamp(max=1.0)


def pgd(model, x, y, eps, steps, norm="l2", step=None, targeted=False, random_start=False, lo=0.0, hi=1.0,
        batch=4096, objective=None, momentum=0.0, polyak=0.0, name="", keep="best"):
    """Projected gradient ascent on a per-example objective, `batch` images at a time.

    x: (N, ...) images in [lo, hi] (uint8 or float); y: (N, ...) labels, targets, or what the objective takes.
    Objective (see ce_objective): default cross-entropy against y, untargeted or targeted.
    Steps: L2 along the per-example normalised gradient, Linf along its sign; length `step` (default
    2.5 * eps / steps). momentum > 0 steps along a running sum of normalised gradients instead (heavy ball,
    as MI-FGSM, Dong et al. 2018). polyak > 0, for an objective whose maximum is 0: each example's step is
    min(step, polyak * -loss / ||grad||), Polyak's step size (long while far from the optimum, short near it).
    Both are used by `invert`.
    After each step: project onto the eps-ball around x, then clamp to [lo, hi].
    Returns (x_adv, success): x_adv (N, ...) fp32 is each example's highest-loss iterate (MadryLab's
    `use_best`; the start counts), or its last with keep='final', with ||x_adv - x|| <= eps and lo <= x_adv <= hi;
    success (N,) bool is True where *any* iterate reached the objective's goal (so a robust accuracy built on it is
    an honest upper bound). BatchNorm and dropout are in eval mode while attacking; the model's mode is restored."""
    if not eps >= 0:
        raise AdvexError(f"pgd: eps must be >= 0, got {eps}")
    if steps < 1:
        raise AdvexError(f"pgd: steps must be >= 1, got {steps}")
    if norm not in ("l2", "linf") or keep not in ("best", "final"):
        raise AdvexError(f"pgd: norm must be 'l2' or 'linf' and keep 'best' or 'final', got {norm!r}, {keep!r}")
    step = 2.5 * eps / steps if step is None else step
    objective = objective or ce_objective(model, targeted)
    was_training = model.training
    model.eval()
    progress = Progress(name, len(x)) if name else None
    try:
        xs, ss = [], []
        for i in range(0, len(x), batch):
            xa, s = _pgd_batch(objective, to_float(x[i:i + batch]), y[i:i + batch], eps, steps, step, norm,
                               random_start, lo, hi, momentum, polyak, keep)
            xs.append(xa)
            ss.append(s)
            if progress:
                progress(i + len(xa))
        return torch.cat(xs), torch.cat(ss)
    finally:
        model.train(was_training)


def _pgd_batch(objective, x, y, eps, steps, step, norm, random_start, lo, hi, momentum, polyak, keep):
    view = (-1,) + (1,) * (x.dim() - 1)  # broadcast a per-example scalar over an image
    unit = lambda g: g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view) if norm == "l2" else g.sign()
    xa = x
    if random_start:  # uniform in the Linf box; for L2 a random direction at a uniform radius in [0, eps]
        r = torch.empty_like(x).uniform_(-1, 1) if norm == "linf" else torch.randn_like(x)
        if norm == "l2":
            r = r / r.flatten(1).norm(dim=1).view(view) * torch.rand(len(x), device=x.device).view(view)
        xa = (x + project(r * eps, eps, norm)).clamp(lo, hi)
    best_x, best_loss = xa, torch.full((len(x),), -math.inf, device=x.device)
    success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    velocity = torch.zeros_like(x)
    for i in range(steps + 1):  # the last round only scores the final iterate
        loss, grad, hit = objective(xa, y, need_grad=i < steps)
        better = loss > best_loss  # torch.where, not boolean indexing: no host sync inside the loop
        best_loss = torch.where(better, loss, best_loss)
        best_x = torch.where(better.view(view), xa, best_x)
        success |= hit
        if i == steps:
            break
        with torch.no_grad():
            velocity = momentum * velocity + unit(grad)
            length = step
            if polyak:  # loss = -f with f >= 0 and f* = 0
                length = (polyak * -loss / grad.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=step).view(view)
            xa = (x + project(xa + length * unit(velocity) - x, eps, norm)).clamp(lo, hi)
    return (best_x if keep == "best" else xa), success


def nontransferable_objective(target, members):
    """Nakkiran (Distill 2019): adversarial examples that fool `target` towards t but not the independently
    trained `members`: ascend -CE(target(x'), t) - mean_k CE(member_k(x'), y), with y = torch.stack([t, y], 1).
    The gradient is accumulated member by member, so only one model's graph is alive at a time.
    Success: the target predicts t. The members are put in eval mode (pgd only sets the target's)."""
    for m in members:
        m.eval()
    fool, keep = ce_objective(target, targeted=True), [ce_objective(m, targeted=True) for m in members]

    def objective(xa, ty, need_grad=True):  # ty: (B, 2) = (target class, true class)
        loss, grad, hit = fool(xa, ty[:, 0], need_grad)
        for k in keep:  # -CE(member(x'), y): the "targeted" objective towards the true class
            lk, gk, _ = k(xa, ty[:, 1], need_grad)
            loss = loss + lk / len(keep)
            grad = grad + gk / len(keep) if need_grad else None
        return loss, grad, hit

    return objective


# =====================================================================================================================
# Inversion: robust-feature datasets (Ilyas et al. Sec. 3.1)
# =====================================================================================================================

def features(model, x, batch=4096):
    """g(x) for a whole set, fp32 throughout (no autocast): (N, ...) -> (N, D)."""
    return over_set(model, lambda xb: model.features(xb).float(), x, batch, amp=False)


def invert(model, x, x0, steps, step, method="fast", batch=4096, name="", amp=False):
    """Ilyas et al. Sec. 3.1: for each target x, find z in [0,1]^d whose representation matches x's,
    z = argmin ||g(z) - g(x)||_2, starting from x0, with no eps-ball, only the [0,1] clamp. This is PGD with an
    infinite radius on the loss -||g(z) - g(x)||^2 (the square has the same descent direction), keeping each
    example's best iterate, so the result is never worse than x0. The target g(x) and the distance returned are fp32;
    amp runs the steps' forward passes under bf16 autocast: its ~0.4% rounding leaves the match up to ~8% looser
    through a standard source, and fresh models learn as much from the result (RESULTS.md, "Inversion in 150 steps").
      method 'paper': `steps` L2-normalised gradient steps of length `step` (the paper: 1000 of 0.1).
      method 'fast': Polyak step lengths, min(step, 0.5 * f / ||grad f||) with f = ||g(z) - g(x)||^2, along a
        heavy-ball momentum (0.8) of normalised gradients: 150 steps match g(x) more closely than the paper's
        1000 and end about as far from x0 (RESULTS.md, "Inversion in 150 steps"; test_advex.py checks both).
    x, x0: (N, C, H, W) in [0,1]. Returns z (N, C, H, W) fp32 and the relative distance
    ||g(z) - g(x)|| / ||g(x)|| (N,), the construction's quality."""
    if method not in ("fast", "paper"):
        raise AdvexError(f"unknown inversion method {method!r}; choose fast or paper")
    gx = features(model, x, batch)  # (N, D)
    match = make_objective(lambda z, target: (-(model.features(z).float() - target).pow(2).sum(dim=1), None), amp)
    fast = method == "fast"
    z, _ = pgd(model, x0, gx, math.inf, steps, "l2", step, batch=batch, objective=match,
               momentum=0.8 if fast else 0.0, polyak=0.5 if fast else 0.0, name=name)
    rel = (features(model, z, batch) - gx).norm(dim=1) / gx.norm(dim=1).clamp_min(1e-12)
    return z, rel


def random_other(n, device="cpu"):
    """For each i in 0..n-1 an index j != i drawn uniformly from the other n-1 (the start image x0 of
    inversion must be a *different* training image, Ilyas Sec. 3.1)."""
    return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n


# =====================================================================================================================
# Relabelling (Ilyas et al. Sec. 3.2; Wallace's response)
# =====================================================================================================================

def relabel_targets(y, rule, classes=10):
    """Targets of the relabelled adversarial datasets, Ilyas Sec. 3.2.
    'det':  t = (y + 1) mod C, a deterministic shift: every robust feature now points to the wrong class.
    'rand': t ~ Uniform{0..C-1}, independent of y, as the paper writes it. About 1 in C draws t = y; such an
            example's label was drawn without looking at y, so it carries no more label information than the rest;
            it is only a weaker attack (no class to leave). We keep the paper's rule and report the fooling rate
            over t != y."""
    if rule == "det":
        return (y + 1) % classes
    if rule == "rand":
        return torch.randint(0, classes, y.shape, device=y.device)
    raise AdvexError(f"unknown relabelling rule {rule!r}")


def keep_wrong(model, x, y, batch=4096):
    """Wallace, "Learning from Incorrectly Labeled Data": relabel every image with the model's prediction
    and keep only those where it is wrong. Returns the kept images (a subset of x), their (wrong) labels
    and the boolean mask (N,)."""
    pred = predict(model, x, batch)
    keep = pred != y
    return x[keep], pred[keep], keep


# =====================================================================================================================
# Training: SGD with Nesterov momentum and a one-cycle schedule (or Adam); optional L2 PGD adversarial training
# =====================================================================================================================

def train(model, x, y, epochs, batch, lr, momentum=0.9, wd=5e-4, augment=False, adv_eps=0.0, adv_steps=7,
          adv_step=0.1, optimizer="sgd", stop=None, name="train", pad=4, pad_fill=0.0):
    """Train in place with plain cross-entropy (as the paper and MadryLab do: no label smoothing).
    x: (N, C, H, W) uint8 or float images on the training device; y: (N,) int64.
    optimizer 'sgd': Nesterov momentum, lr rising linearly to `lr` over the first 20% of the steps, then
      linearly to 0, which reaches good accuracy in few epochs. 'step': MadryLab's robustness library's, the
      paper's (App. C): SGD with momentum, `lr` divided by 10 after each third of the epochs (150: at 50 and 100).
      'adam': Adam at a constant `lr`, no weight decay (Nakkiran's squares).
    adv_eps > 0: adversarial training (Madry et al. 2018; Ilyas et al. App. C): each batch is replaced by its
      highest-loss L2 PGD iterate (adv_steps steps of adv_step).
    stop(epochs_done) -> bool is asked ten times an epoch; True ends training there, on the same schedule
      (Wallace's weak teacher stops at a training accuracy; Nakkiran's "1 epoch" model is the memorising
      run stopped after its first epoch). Never chosen on test data. Returns the epochs trained (float)."""
    dev, N = x.device, len(x)
    steps_per_epoch = max(1, N // batch)  # the ragged last batch is dropped (a batch of 1 breaks BatchNorm)
    batch, total = min(batch, N), epochs * steps_per_epoch
    check = max(1, steps_per_epoch // 10)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    elif optimizer == "step":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** min(2, 3 * s // total))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=wd)
        warm = max(1, int(0.2 * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    first_bad = torch.tensor(-1, device=dev)  # first step with a non-finite loss, tracked without a sync
    loss_sum = torch.zeros((), device=dev)
    progress = Progress(name, total * batch)
    model.train()
    s = 0
    for epoch in range(epochs):
        perm = torch.randperm(N, device=dev)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = to_float(x[idx]), y[idx]
            if augment:
                xb = augment_batch(xb, pad, pad_fill)
            if adv_eps > 0:
                xb, _ = pgd(model, xb, yb, adv_eps, adv_steps, step=adv_step, batch=len(xb))
            with autocast(dev):
                loss = F.cross_entropy(model(xb).float(), yb)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), s + 1, first_bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            s += 1
            last = i == steps_per_epoch - 1
            if s == total or last or time.time() - progress.last > progress.every:
                if first_bad.item() > 0:
                    raise AdvexError(f"{name}: the training loss became NaN/inf at step {first_bad.item()} "
                                     f"of {total} (lr {lr}); lower --lr or check the data")
                if last:
                    progress.last = 0  # always print at an epoch's end
                progress(s * batch, f" | step {s}/{total} epoch {epoch + 1}/{epochs} loss {loss_sum.item() / (i + 1):.3f}")
            if stop and ((i + 1) % check == 0 or last) and stop(s / steps_per_epoch):
                model.eval()
                return s / steps_per_epoch
        loss_sum.zero_()
    model.eval()
    return float(epochs)


# =====================================================================================================================
# Evaluation
# =====================================================================================================================

def robust_accuracy(model, x, y, eps, steps, step=None, restarts=1, norm="l2", batch=4096, name=""):
    """% of examples that no untargeted PGD iterate of any restart misclassifies (the clean image is the
    first iterate of restart 0, so this never exceeds the standard accuracy). Restart 0 starts at x; each
    further restart at a random point of the ball. An upper bound on the true robust accuracy, as every
    attack-based number is; more steps and restarts can only lower it."""
    fooled = torch.zeros(len(x), dtype=torch.bool, device=y.device)
    for r in range(restarts):
        fooled |= pgd(model, x, y, eps, steps, norm, step, random_start=r > 0, batch=batch, name=name)[1]
    return pct(~fooled)


def linear_weights(model, shape):
    """A LinearNet's logits as an exact affine map of pixels, in float64: f(x) = W x + b, W (C, D), b (C,)."""
    W = model.head.weight.double() / model.std.double().expand(1, *shape).flatten(1)
    return W, model.head.bias.double() - W @ model.mean.double().expand(1, *shape).flatten()


@torch.no_grad()
def linear_certified(model, x, labels, r):
    """Exact L2 certificates for a LinearNet: per example, True where no perturbation of L2 radius r (pixel
    units) can make any class j beat `labels`. A perturbation d changes f_l - f_j by (w_l - w_j) . d, at most
    r * ||w_l - w_j||_2 (Cauchy-Schwarz, attained). In float64, so no TF32 or bf16 rounding flips a borderline case.
    labels = y: certified robust accuracy; labels = the predictions: stability (Goh's Spec 2).
    The [0,1] box is ignored, so both are lower bounds."""
    W, b = linear_weights(model, x.shape[1:])
    f = to_float(x).double().flatten(1) @ W.T + b  # (N, C)
    margin = f.gather(1, labels[:, None]) - f  # (N, C), 0 at j = label
    reach = r * (W[labels][:, None, :] - W[None, :, :]).norm(dim=2)  # (N, C), 0 at j = label
    return ((margin > reach) | (torch.arange(f.shape[1], device=x.device) == labels[:, None])).all(dim=1)


@torch.no_grad()
def linear_robust_usefulness(model, x, y, eps):
    """Goh's Spec 1 (Robust Feature Leakage), exact for a linear model: the robust usefulness of each of its C
    linear features f_i for each class c, gamma_ic = E[y_c f_i(x)] - eps ||w_i|| / sd_i, with f_i centred and
    scaled to unit variance on x (Ilyas et al.'s normalisation, sd_i its standard deviation) and y_c = +1 on class c,
    -1 elsewhere: E[inf over ||d||_2 <= eps of y_c f_i(x + d)] (the [0,1] box ignored). Returns (C, C) float64."""
    W, b = linear_weights(model, x.shape[1:])
    f = to_float(x).double().flatten(1) @ W.T + b  # (N, C)
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-12)
    yc = 2.0 * (y[:, None] == torch.arange(f.shape[1], device=y.device)).double() - 1  # (N, C) labels +-1 per class
    useful = ((f - mu) / sd).T @ yc / len(f)  # (C features, C classes)
    return useful - (eps * W.norm(dim=1) / sd)[:, None]


def eval_attacks(cfg):
    """The attacks every robust accuracy is measured with: untargeted L2 PGD at each --eval-eps with
    --eval-steps steps of 2.5*eps/steps, and the paper's own (Ilyas et al.: 7 steps of eps/5, eps 0.25)."""
    attacks = {f"robust acc L2 {e:g}": dict(norm="l2", eps=e, steps=cfg.eval_steps, step=round(2.5 * e / cfg.eval_steps, 6),
                                            restarts=cfg.eval_restarts) for e in cfg.eval_eps}
    attacks["robust acc L2 0.25, 7 steps of eps/5"] = dict(norm="l2", eps=0.25, steps=7, step=0.05, restarts=1)
    return attacks


def evaluate(cfg, model, x, y):
    """Standard accuracy and robust accuracy under each attack of eval_attacks, computed once per model, test set
    and attack: [(metric, value %, attack settings)]."""
    attacks = eval_attacks(cfg)

    def run():
        values = {"standard acc": accuracy(model, x, y, cfg.attack_batch)}
        for metric, a in attacks.items():
            values[metric] = robust_accuracy(model, x, y, a["eps"], a["steps"], a["step"], a["restarts"],
                                             batch=cfg.attack_batch, name=f"eval {model.name}: {metric}")
        return values

    values = stage(cfg, "eval", run, dict(attacks=attacks), inputs=(x, y), models=(model,), title=f"eval {model.name}")
    return [("standard acc", values["standard acc"], {})] + [(m, values[m], a) for m, a in attacks.items()]


# =====================================================================================================================
# Experiments. Each takes (cfg, device) and returns records (record(): one number, its metric and attack settings).
# =====================================================================================================================

RA = "robust acc L2 0.25"
# The published numbers ours are printed beside, by (experiment, metric) or (experiment, metric, arch).
PAPER = {  # Ilyas et al. Table 1 / Fig. 2 (the standard model's 4.5% is under the paper's 7 steps of eps/5; Fig. 3: ResNet-50 source)
    ("standard", "standard acc"): 95.3, ("standard", "robust acc L2 0.25, 7 steps of eps/5"): 4.5,
    ("robust", "standard acc"): 90.8, ("robust", RA): 82.3, ("d_r", "standard acc"): 84.10, ("d_r", RA): 48.27,
    ("d_nr", "standard acc"): 87.68, ("d_nr", RA): 0.82, ("d_rand", "standard acc"): 63.3, ("d_det", "standard acc"): 43.7,
    ("transfer", "D_det-trained test acc", "resnet18"): 41, ("transfer", "D_det-trained test acc", "resnet50"): 45,
    ("transfer", "D_det-trained test acc", "vgg16"): 28, ("transfer", "transfer rate", "resnet18"): 92,
    ("transfer", "transfer rate", "resnet50"): 100, ("transfer", "transfer rate", "vgg16"): 66,
    # Wallace: CIFAR-10 (ResNet-18), MNIST -> Fashion-MNIST, the 2D toy (one seed)
    ("mislabeled", "teacher epochs trained"): 2, ("mislabeled", "teacher train acc"): 62.5,
    ("mislabeled", "teacher test acc"): 63.1, ("mislabeled", "student test acc"): 49.7,
    ("mnist-fashion", "teacher MNIST test acc"): 99.1, ("mnist-fashion", "student MNIST test acc (own stats)"): 91.04,
    ("mnist-fashion", "student MNIST test acc (mnist stats)"): 94.5, ("toy2d", "model 2: original points right, median"): 23,
    # Nakkiran: attack success, transfer, and a model trained on the set (true / shifted labels); the squares
    **{(f"bugs {n} {m}", metric): v for (n, m), vs in {
        ("l2", "pgd"): (99.9, 82.5, 33.2, 27.3), ("l2", "bugs"): (99.3, 1.7, 2.8, 70.8),
        ("linf", "pgd"): (99.6, 52.1, 23.7, 40.4), ("linf", "bugs"): (98.6, 0.8, 2.5, 75.9)}.items()
       for metric, v in zip(("attack success on target", "transfer to fresh model", "trained-on: test acc, true labels",
                             "trained-on: test acc, shifted labels"), vs)},
    ("squares", "linear: flipped by Linf 0.89"): 0, ("squares", "net memorising: train acc"): 99.9,
    # Goh, robust feature leakage (his deep model on the same D_rand: 88%)
    ("leakage", "robust linear: stable predictions L2 0.25"): 80, ("leakage", "linear on features, trained on d_rand"): 23.5,
    ("leakage", "linear on features, trained on d_det"): 6.81, ("leakage", "deep model trained on d_rand: test acc"): 88,
    # Gilmer & Hendrycks: fog on CIFAR-10, natural vs adversarially trained; Goh's linear features (trucks vs frogs)
    ("frequency", "standard model: fog acc, mean over severities"): 85.7, ("frequency", "robust model: fog acc, mean over severities"): 55.3,
    ("linear-features", "most useful eigenvector: usefulness"): 0.386, ("linear-features", "ensemble: directions"): 349,
    ("linear-features", "ensemble: usefulness on its training labels (signs chosen there)"): 0.208,
}


def recipe(cfg, adversarial=False, **over):
    """What makes a trained model besides its data and seed: the architecture and the schedule (adversarial: Ilyas
    App. C). Optional: optimizer ('adam'), stop_acc (%, on 2000 training images), stop_epochs, classes, norm, pad (the
    augmentation's crop padding in pixels: 4, CIFAR's; 0, flips only) and pad_fill (what it pads with: 0.5 for images
    centred on grey)."""
    r = dict(arch=cfg.arch, width=cfg.width, batch=cfg.batch, lr=cfg.lr, momentum=cfg.momentum, wd=cfg.wd,
             optimizer=cfg.optimizer, augment=cfg.augment, epochs=cfg.adv_epochs if adversarial else cfg.epochs)
    if adversarial:
        r.update(adv_eps=cfg.adv_eps, adv_steps=cfg.adv_steps, adv_step=cfg.adv_step)
    r.update(over)
    if r["arch"] == "fastnet":
        r["design"] = dict(act=cfg.fastnet_act, pool=cfg.fastnet_pool, scale=cfg.fastnet_scale)
    return r


def train_model(cfg, dev, name, x, y, r):
    """A fresh model trained on (x, y) with recipe r, in eval mode on dev (or the same model read back: stage)."""
    def run():
        model = new_model(r, dev)
        maybe_compile(model, x, cfg.compile)
        stop = None
        if "stop_acc" in r:  # Wallace's weak teacher; checked on training images only, never on test data
            stop = lambda e: accuracy(model, x[:2000], y[:2000], cfg.attack_batch) >= r["stop_acc"]
        if "stop_epochs" in r:
            stop = lambda e: e >= r["stop_epochs"]
        done = train(model, x, y, r["epochs"], r["batch"], r["lr"], r["momentum"], r["wd"], r["augment"],
                     r.get("adv_eps", 0.0), r.get("adv_steps", 0), r.get("adv_step", 0.0), r.get("optimizer", "sgd"),
                     stop, name, r.get("pad", 4), r.get("pad_fill", 0.0))
        return checkpoint(model, r, done)

    title = f"{name} ({r['arch']})"
    ck = stage(cfg, name, run, r, inputs=(x, y), title=title)
    model = maybe_compile(new_model(r, dev, ck["state_dict"]), x, cfg.compile)
    model.name, model.key, model.epochs_done, model.file = title, ck["key"], ck["epochs_done"], ck["file"]
    return model


def standard_model(cfg, dev, data):
    """Ilyas et al.'s standard model, the standard source: --std-arch trained on D for --std-epochs with the standard
    recipe (or --standard-from: the paper's own, MadryLab's cifar_nat.pt)."""
    if cfg.standard_from:
        return external_model(cfg.standard_from, "standard", dev)
    return train_model(cfg, dev, "standard", data[0], data[1], standard_recipe(cfg))


def standard_recipe(cfg):
    """The standard source's recipe: the standard one with its own architecture, epochs and augmentation (crops are
    padded by 4 pixels; 'flip': flips only)."""
    return recipe(cfg, arch=cfg.std_arch, epochs=cfg.std_epochs, augment=cfg.std_augment != "none",
                  pad=4 * (cfg.std_augment == "crop+flip"))


def natural_recipe(cfg, **over):
    """The robust model's recipe without its attack: the same architecture, epochs (--adv-epochs), augmentation and
    learning rate, so that what differs between the two is adversarial training alone."""
    return recipe(cfg, **{"epochs": cfg.adv_epochs, **over})


def natural_model(cfg, dev, data):
    """The robust model's natural twin (natural_recipe). Where a standard and a robust model are compared as such
    (Gilmer & Hendrycks', Nakano's "natural vs adversarially trained"), and for Nakkiran, whose target and ensemble
    are alike. With --standard-from, that file (the twin of MadryLab's robust one)."""
    if cfg.standard_from:
        return external_model(cfg.standard_from, "standard", dev)
    return train_model(cfg, dev, "natural", data[0], data[1], natural_recipe(cfg))


def robust_model(cfg, dev, data):
    """The robust model: L2 adversarial training on D (or --robust-from: MadryLab's cifar_l2_0_5.pt)."""
    if cfg.robust_from:
        return external_model(cfg.robust_from, "robust", dev)
    return train_model(cfg, dev, "robust", data[0], data[1], recipe(cfg, adversarial=True))


def eval_records(cfg, experiment, model, data, **extra):
    """evaluate()'s numbers as records; a model read from --standard-from / --robust-from names its file."""
    source = {"source": os.path.basename(model.file)} if "file" in model.key else {}
    return [record(cfg, experiment, m, v, arch=model.key.get("arch"), **s, **extra, **source)
            for m, v, s in evaluate(cfg, model, data[2], data[3])] + [record(cfg, experiment, "test images", len(data[3]))]


def exp_standard(cfg, dev):
    """Ilyas et al.: a standard CIFAR-10 model on D (the paper's: a ResNet-50; its numbers in PAPER)."""
    cfg, data = cifar(cfg, dev)
    return eval_records(cfg, "standard", standard_model(cfg, dev, data), data)


def exp_robust(cfg, dev):
    """Ilyas et al. App. C: L2 adversarial training, eps 0.5, 7 steps of 0.1 (--adv-*)."""
    cfg, data = cifar(cfg, dev)
    return eval_records(cfg, "robust", robust_model(cfg, dev, data), data)


AIRBENCH, PLAIN = dict(fastnet_act="gelu", fastnet_pool="max", fastnet_scale=0.125), \
    dict(fastnet_act="relu", fastnet_pool="avg", fastnet_scale=1.0)
# What makes a standard model robust (README, "The standard source"): each variant sets these Config fields of the
# standard source; its epochs are multiples of --epochs, every other model's.
ABLATION = {
    "fastnet airbench (gelu, max pool, scale 1/8)": dict(AIRBENCH),
    "fastnet airbench, relu": dict(AIRBENCH, fastnet_act="relu"),
    "fastnet airbench, avg pool": dict(AIRBENCH, fastnet_pool="avg"),
    "fastnet airbench, scale 1": dict(AIRBENCH, fastnet_scale=1.0),
    "fastnet plain (relu, avg pool, scale 1)": dict(PLAIN),
    "fastnet airbench, 2x epochs": dict(AIRBENCH, epochs_x=2),
    "fastnet plain, 2x epochs": dict(PLAIN, epochs_x=2),
    "fastnet plain, 4x epochs": dict(PLAIN, epochs_x=4),
    "fastnet plain, 2x epochs, flips only": dict(PLAIN, epochs_x=2, std_augment="flip"),
    "fastnet plain, 4x epochs, flips only": dict(PLAIN, epochs_x=4, std_augment="flip"),
    "fastnet plain, 2x epochs, no augmentation": dict(PLAIN, epochs_x=2, std_augment="none"),
    "fastnet plain, 4x epochs, no augmentation": dict(PLAIN, epochs_x=4, std_augment="none"),
    "resnet18": dict(std_arch="resnet18"),
    "resnet18, 2x epochs": dict(std_arch="resnet18", epochs_x=2),
    "resnet18, flips only": dict(std_arch="resnet18", std_augment="flip"),
    "resnet18, 2x epochs, flips only": dict(std_arch="resnet18", epochs_x=2, std_augment="flip"),
}


def exp_ablation(cfg, dev):
    """The standard source: which of FastNet's airbench choices (GELU, global max-pool, g scaled by 1/8), how much
    training and whether augmentation make a standard model robust, beside a ResNet-18 (the paper's kind of network).
    For each variant of ABLATION: a standard model, its clean and robust accuracy (eval_attacks) on the validation
    slice (these rows choose the source: never the test images), its robust accuracy as a share of the images it
    classifies correctly (robust accuracy cannot exceed clean accuracy, so raw robust accuracies of models of
    different accuracy do not compare), and each number minus the first row's at the same seed (over --seeds: the
    paired difference and its spread)."""
    cfg, data = cifar(cfg, dev, validation=True)
    recs, first = [], {}
    for variant, change in ABLATION.items():
        change = dict(dict(std_arch="fastnet", std_augment="crop+flip", epochs_x=1), **change)
        vcfg = dataclasses.replace(cfg, standard_from="", std_epochs=cfg.epochs * change.pop("epochs_x"), **change)
        model = standard_model(vcfg, dev, data)
        values = evaluate(vcfg, model, data[2], data[3])
        clean = values[0][1]
        values += [(f"{m}, % of correct", 100 * v / max(clean, 1e-9), {}) for m, v, _ in values[1:]]
        rec = functools.partial(record, vcfg, "ablation", paper=None, arch=model.key["arch"], epochs=vcfg.std_epochs,
                                augment=vcfg.std_augment, width=vcfg.width, evaluated_on="validation")
        recs += [rec(f"{variant}: {m}", v, **s) for m, v, s in values]
        recs += [rec(f"{variant}: {m}, minus the first row", v - first[m]) for m, v, _ in values if first]
        first = first or {m: v for m, v, _ in values}
    return recs


# What lets a fresh model learn D_det from its non-robust features (issue 33). Each variant changes the laptop or
# full-size settings in one place: the standard source (std_epochs_x: times --std-epochs; std_*), the relabelling
# attack (rel_*, det_flips), or the fresh models (con_epochs_x: times --con-epochs and --det-epochs; fresh: their
# recipe's arch, width, lr_x);
# sets: the constructions trained (D_rand and D_det, or D_det alone where only its fresh model changes).
DET_ABLATION = {
    "reference (this scale's settings)": dict(sets=("d_rand", "d_det", "d_shortcut")),
    "source: 2x epochs": dict(std_epochs_x=2),
    "source: crops and flips": dict(std_augment="crop+flip"),
    "source: resnet18": dict(std_arch="resnet18"),
    "attack: eps x0.5": dict(rel_eps_x=0.5),
    "attack: eps x1.5": dict(rel_eps_x=1.5),
    "attack: eps x2": dict(rel_eps_x=2.0),
    "attack: 2x steps, each half as long": dict(rel_steps_x=2),
    "attack: the last iterate": dict(rel_keep="final"),
    "attack: no mirror images": dict(det_flips=False, sets=("d_det", "d_shortcut")),
    "fresh: 2x epochs": dict(con_epochs_x=2, sets=("d_det",)),
    "fresh: 4x epochs": dict(con_epochs_x=4, sets=("d_det",)),
    "fresh: lr x0.5": dict(fresh=dict(lr_x=0.5), sets=("d_det",)),
    "fresh: 2x width": dict(fresh=dict(width_x=2), sets=("d_det",)),
    "fresh: resnet18, source resnet18": dict(std_arch="resnet18", fresh=dict(arch="resnet18"), sets=("d_det",)),
    "attack: eps x2; fresh: 2x epochs": dict(rel_eps_x=2.0, con_epochs_x=2, sets=("d_det", "d_shortcut")),
    "attack: eps x2; fresh: 4x epochs": dict(rel_eps_x=2.0, con_epochs_x=4, sets=("d_det", "d_shortcut")),
}


def exp_ablation_det(cfg, dev):
    """Sec. 3.2's levers (issue 33): for each variant of DET_ABLATION, the standard source, D_rand and D_det (and, in the
    first row, the shortcut control) built from it, a fresh model on each, and on the validation slice (never the test
    images): its accuracy on the true labels and, for D_det, on the shifted labels y + 1 (the robust mapping a model
    learns instead of t's features), with the attack's fooling rate and the source's margin on t; each number also
    minus the first row's at the same seed (over --seeds: paired differences and their spread)."""
    cfg, data = cifar(cfg, dev, validation=True)
    xv, yv = data[2], data[3]
    recs, first = [], {}
    for variant, change in DET_ABLATION.items():
        change, sets = dict(change), change.get("sets", ("d_rand", "d_det"))
        fresh = dict(change.pop("fresh", {}))
        vcfg = dataclasses.replace(
            cfg, standard_from="", std_epochs=cfg.std_epochs * change.pop("std_epochs_x", 1),
            con_epochs=cfg.con_epochs * change.get("con_epochs_x", 1), det_epochs=cfg.det_epochs * change.pop("con_epochs_x", 1),
            rel_eps=cfg.rel_eps * change.pop("rel_eps_x", 1),
            rel_steps=cfg.rel_steps * change.pop("rel_steps_x", 1),
            **{k: v for k, v in change.items() if k != "sets"})
        vcfg = dataclasses.replace(vcfg, rel_step=cfg.rel_step * change.get("rel_eps_x", 1) * cfg.rel_steps / vcfg.rel_steps)
        over = dict(arch=fresh.get("arch", vcfg.arch), width=int(vcfg.width * fresh.get("width_x", 1)))
        src, values = standard_model(vcfg, dev, data), []
        for name in sets:
            ds = construct(vcfg, dev, data, name, None if name == "d_shortcut" else src)
            lr = CONSTRUCTIONS[name][3](vcfg).get("lr", vcfg.lr) * fresh.get("lr_x", 1)
            model = constructed_model(vcfg, dev, name, ds, lr=lr, **over)
            values.append((f"{name}: val acc", accuracy(model, xv, yv, cfg.attack_batch)))
            if name != "d_rand":
                values.append((f"{name}: val acc on shifted labels y+1", accuracy(model, xv, (yv + 1) % 10, cfg.attack_batch)))
            values += [(f"{name}: {r['metric']}", r["value"]) for r in construction_records(vcfg, name, ds)
                       if r["metric"].startswith(("fooling", "source's margin"))]
        rec = functools.partial(record, vcfg, "ablation-det", paper=None, arch=over["arch"], source=src.key["arch"],
                                source_epochs=vcfg.std_epochs, rel_eps=vcfg.rel_eps, rel_steps=vcfg.rel_steps,
                                det_flips=vcfg.det_flips, epochs=vcfg.con_epochs, det_epochs=vcfg.det_epochs,
                                evaluated_on="validation")
        recs += [rec(f"{variant}: {m}", v) for m, v in values]
        recs += [rec(f"{variant}: {m}, minus the first row", v - first[m]) for m, v in values if first and m in first]
        first = first or dict(values)
    return recs


# ---------------------------------------------------------------------------------------- Ilyas et al. Sec. 3

def inverted_set(src, x, y, name, *, inv_method, inv_steps, inv_step, attack_batch):
    """Sec. 3.1: every training image x is replaced by an image z whose representation g(z) matches g(x), found
    from a *different*, randomly drawn training image x0, and z keeps x's label y. g of the robust model gives
    D_R, of the standard model D_NR. Also kept: each start image's index, the source's prediction on z. The steps'
    forward passes run in bf16 where the device allows (RESULTS.md, "Inversion in 150 steps": a fresh model learns
    as much from D_NR made so as from fp32 steps)."""
    j = random_other(len(x), x.device)
    z, rel = invert(src, x, x[j], inv_steps, inv_step, inv_method, attack_batch, name=f"invert {name}", amp=True)
    return dict(images=z, labels=y, start=j, rel_dist=rel, src_pred=predict(src, z, attack_batch))


def relabelled_set(src, x, y, name, *, rule, rel_eps, rel_steps, rel_step, rel_keep, attack_batch):
    """Sec. 3.2: targeted L2 PGD on the standard model towards t (relabel_targets), and the result relabelled t:
    what is left to learn from are the non-robust features of t. Keeps the true labels, the source's predictions
    (its fooling rate) and its margin on t, logit_t - the largest other logit (how strongly t's features were
    written in). The highest-loss (here: closest to t) iterate, as MadryLab's use_best, or the last (rel_keep)."""
    t = relabel_targets(y, rule)
    xa, _ = pgd(src, x, t, rel_eps, rel_steps, step=rel_step, targeted=True, batch=attack_batch, name=f"pgd {name}",
                keep=rel_keep)
    logits = over_set(src, lambda xb: src(xb).float(), xa, attack_batch)  # (N, classes)
    margin = logits.gather(1, t[:, None])[:, 0] - logits.scatter(1, t[:, None], -math.inf).amax(dim=1)
    return dict(images=xa, labels=t, true=y, src_pred=logits.argmax(dim=1), src_margin=margin)


def det_set(src, x, y, name, *, det_flips, rel_eps, rel_steps, rel_step, rel_keep, attack_batch):
    """Sec. 3.2's D_det (t = y + 1). A model trains on it without augmentation (a mirrored perturbation no longer
    points at t), so with det_flips each training image's mirror image joins the set before the attack and is
    attacked on its own: 2N images, the flips' variety kept (KellerJordan/features-not-bugs: perturbations of
    augmented copies; at laptop scale +7.6 points of D_det at equal training cost: RESULTS.md, "D_det at the paper's strength")."""
    x, y = with_mirrors(x, y) if det_flips else (x, y)
    return relabelled_set(src, x, y, name, rule="det", rel_eps=rel_eps, rel_steps=rel_steps, rel_step=rel_step,
                          rel_keep=rel_keep, attack_batch=attack_batch)


def with_mirrors(x, y):
    """(2N, C, H, W) images: x, then each one mirrored left to right; their labels."""
    return torch.cat([x, x.flip(-1)]), torch.cat([y, y])


def shortcut_set(d_det, x, y, name):
    """The control for D_det (Keller Jordan, cifar10-zoo `run1_shortcuts`): D_det's images with each PGD perturbation
    replaced by a fixed random pattern of its target class t = y + 1 (Gaussian, one per class) of the same L2 norm,
    labelled t. The pattern marks t as well as a perturbation could, yet holds no feature of t that a real test image
    of class t has: a model that scores on the test set after training on it has learnt a shortcut (the few images a
    weak model already calls y + 1), so D_det's accuracy means something only above this one."""
    if len(d_det["labels"]) == 2 * len(x):  # D_det made with its mirror images (det_set)
        x, y = with_mirrors(x, y)
    t, x = d_det["labels"].to(x.device), to_float(x)
    size = (d_det["images"].to(x.device).float() - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # D_det's own norms
    patterns = torch.randn(10, *x.shape[1:], device=x.device)
    patterns = patterns / patterns.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # (10, C, H, W), unit L2 norm
    return dict(images=(x + size * patterns[t]).clamp(0, 1), labels=t, true=y, size=size.flatten())


def d_det_set(cfg, dev, data):
    return construct(cfg, dev, data, "d_det")


# Sec. 3's constructed training sets, one row each: the source (a model, or for the control the set it is made
# from), the procedure (called with the source, the training images and labels, its fixed arguments and the Config
# fields named by its keyword arguments), and how the recipe of the fresh model trained on it differs from the
# standard one (App. C: D_rand at --rel-lr; D_det without augmentation, since its labels depend on the exact
# perturbation, and its control trained the same way, both for --det-epochs; every other for --con-epochs).
CONSTRUCTIONS = {
    "d_r": (robust_model, inverted_set, {}, lambda cfg: {}),
    "d_nr": (standard_model, inverted_set, {}, lambda cfg: {}),
    "d_rand": (standard_model, relabelled_set, {"rule": "rand"}, lambda cfg: {"lr": cfg.rel_lr}),
    "d_det": (standard_model, det_set, {}, lambda cfg: {"augment": False, "epochs": cfg.det_epochs}),
    "d_shortcut": (d_det_set, shortcut_set, {}, lambda cfg: {"augment": False, "epochs": cfg.det_epochs}),
}


def construct(cfg, dev, data, name, source=None):
    """One row of CONSTRUCTIONS built from the training images (or read back): a dict with images (fp16: exact to
    ~5e-4, where uint8 would round by ~0.06 of L2 over an image), labels and what the procedure also keeps."""
    source_of, build, fixed, _ = CONSTRUCTIONS[name]
    src = source or source_of(cfg, dev, data)
    knobs = {p: getattr(cfg, p) for p in inspect.signature(build).parameters if p in CONFIG_FIELDS}
    x, y = data[0], data[1]
    run = lambda: {k: v.half() if k == "images" else v for k, v in build(src, x, y, name, **fixed, **knobs).items()}
    settings = dict(procedure=build.__name__, **fixed, **{k: v for k, v in knobs.items() if k not in WHERE})
    if isinstance(src, nn.Module):
        return stage(cfg, name, run, settings, inputs=(x, y), models=(src,), title=f"{name} from {src.name}")
    return stage(cfg, name, run, settings, inputs=(x, y, src["images"]), title=f"{name} from {src['key']['stage']}")


def constructed_model(cfg, dev, name, ds, **over):
    """A fresh cfg.arch model trained on a constructed set with the recipe of its row of CONSTRUCTIONS (and `over`:
    the D_det ablation's changes to it)."""
    r = recipe(cfg, **{"epochs": cfg.con_epochs, **CONSTRUCTIONS[name][3](cfg), **over})
    return train_model(cfg, dev, f"{name}-model", ds["images"].to(dev), ds["labels"].to(dev), r)


def construction_records(cfg, name, ds):
    """How well a constructed set was made. Inversions: the relative feature distance, and the source model's
    accuracy on the images against their label y and against the start image's label (the paper's construction
    should give ~100% / ~10%: the start image's content must not survive). Relabelled sets: the fooling rate, the
    share of images the source classifies as their target t, over t != y."""
    y, pred = ds["labels"], ds.get("src_pred")
    if "size" in ds:  # the control: no source model
        return [record(cfg, name, "pattern L2 norm, median (D_det's perturbations')", ds["size"].median().item())]
    if "rel_dist" in ds:
        rel = ds["rel_dist"].float()
        recs = [record(cfg, name, "inversion rel. dist median", rel.median().item(), method=cfg.inv_method,
                       steps=cfg.inv_steps, step=cfg.inv_step),
                record(cfg, name, "inversion rel. dist p95", rel.quantile(0.95).item()),
                record(cfg, name, "source acc on images vs y", pct(pred == y), 100)]
        if "start" in ds:  # a construction that starts from an image (not, say, from noise)
            recs.append(record(cfg, name, "source acc on images vs start's label", pct(pred == y[ds["start"]]), 10))
        return recs
    other = y != ds["true"]
    return [record(cfg, name, "fooling rate (t != y)", pct((pred == y)[other]),
                   eps=cfg.rel_eps, steps=cfg.rel_steps, step=cfg.rel_step, keep=cfg.rel_keep),
            record(cfg, name, "source's margin on t, median (t != y)", ds["src_margin"][other].median().item()),
            record(cfg, name, "share with t = y", pct(~other))]


def exp_constructed(cfg, dev, name):
    """Build one of D_R, D_NR, D_rand, D_det, train a fresh cfg.arch model on it, evaluate it on the real CIFAR-10
    test set (Ilyas et al. Sec. 3.1 / 3.2, Table 1 / Fig. 2)."""
    cfg, data = cifar(cfg, dev)
    ds = construct(cfg, dev, data, name)
    dataset_grid(cfg, name, data, ds)
    export_dataset(cfg, name, ds)
    model = constructed_model(cfg, dev, name, ds)
    r = model.key
    recs = construction_records(cfg, name, ds) + eval_records(cfg, name, model, data, lr=r["lr"], augment=r["augment"],
                                                              epochs=r["epochs"])
    if name in ("d_det", "d_shortcut"):  # high here: the model learnt the robust mapping y -> y+1, not t's features
        recs.append(record(cfg, name, "test acc on shifted labels y+1",
                           accuracy(model, data[2], (data[3] + 1) % 10, cfg.attack_batch)))
    return recs


def exp_ilyas(cfg, dev):
    """Ilyas et al. Sec. 3 end to end: both source models, D_R, D_NR, D_rand, D_det, a fresh model on each."""
    recs = exp_standard(cfg, dev) + exp_robust(cfg, dev)
    for name in CONSTRUCTIONS:
        recs += exp_constructed(cfg, dev, name)
    figure_fig2(cfg, recs)
    return recs


def exp_train_on(cfg, dev):
    """Train a fresh model on a released dataset folder (CIFAR_ims / CIFAR_lab: MadryLab's d_robust_CIFAR, or one
    written by --export) with the standard recipe and evaluate it on the real CIFAR-10 test set."""
    ims, lab = load_released(cfg.dataset)
    cfg, data = cifar(cfg, dev)
    n = min(cfg.n_train, len(ims))
    model = train_model(cfg, dev, "train-on", ims[:n].to(dev), lab[:n].to(dev), recipe(cfg))
    return eval_records(cfg, f"train-on {os.path.basename(os.path.normpath(cfg.dataset))}", model, data)


def exp_transfer(cfg, dev):
    """Ilyas Fig. 3: architectures that learn more from the source's D_det are those its adversarial examples
    transfer to. D_det is Sec. 3's, built on the standard source (--std-arch; the paper's: ResNet-50). For each
    architecture: test accuracy after training on that D_det, and the share of D_det's targeted examples that a
    standard model of it classifies as the target. As in the paper, the source's own row is self-transfer (the
    source model itself is attacked: the paper's 100%); every other architecture's is an independently trained
    standard model (--epochs). The paper's numbers are attached only when the source is a ResNet-50, as there."""
    cfg, data = cifar(cfg, dev)
    source = standard_model(cfg, dev, data)
    src = source.key["arch"]
    ds = construct(cfg, dev, data, "d_det", source)
    xa, t = ds["images"].to(dev), ds["labels"].to(dev)
    recs = []
    for arch in cfg.transfer_archs:
        acfg = dataclasses.replace(cfg, arch=arch, width=cfg.width if arch == src else cfg.transfer_width or cfg.width)
        attacked = source if arch == src else train_model(acfg, dev, "natural", data[0], data[1], recipe(acfg))
        transfer = accuracy(attacked, xa, t, cfg.attack_batch)
        acc = accuracy(constructed_model(acfg, dev, "d_det", ds), data[2], data[3], cfg.attack_batch)
        paper = lambda m: PAPER.get(("transfer", m, arch)) if src == "resnet50" else None
        recs += [record(cfg, "transfer", "D_det-trained test acc", acc, paper("D_det-trained test acc"), arch, source=src),
                 record(cfg, "transfer", "transfer rate", transfer, paper("transfer rate"), arch, source=src,
                        self_transfer=arch == src)]
    figure_transfer(cfg, recs)
    return recs + [record(cfg, "transfer", "test images", len(data[3]), arch=src),
                   record(cfg, "transfer", "D_det images", len(t), arch=src)]


# ---------------------------------------------------------------------------------------- Wallace (Distill 2019)

def exp_mislabeled(cfg, dev):
    """Wallace, "Learning from Incorrectly Labeled Data": a deliberately weak teacher relabels the CIFAR-10 training
    set with its own predictions; only the images it gets *wrong* are kept; a fresh model trained on them alone is
    tested on the real test set (his numbers, ResNet-18 for 2 epochs: PAPER). Our teacher stops as soon as its
    accuracy on (2000) training images reaches his, --mis-teacher-acc, so it is as weak as his whatever the
    architecture and scale (at most --mis-teacher-epochs)."""
    cfg, (x, y, xte, yte) = cifar(dataclasses.replace(cfg, arch=cfg.mis_arch), dev)
    teacher = train_model(cfg, dev, "mislabeled-teacher", x, y,
                          recipe(cfg, epochs=cfg.mis_teacher_epochs, stop_acc=cfg.mis_teacher_acc))
    xk, yk, keep = keep_wrong(teacher, x, y, cfg.attack_batch)
    log(f"[mislabeled] kept {len(xk)} of {len(x)} training images, all labelled with the teacher's wrong class")
    student = train_model(cfg, dev, "mislabeled-student", xk, yk, recipe(cfg, epochs=cfg.mis_epochs))
    e = "mislabeled"
    return [record(cfg, e, "teacher epochs trained", teacher.epochs_done, stop_acc=cfg.mis_teacher_acc),
            record(cfg, e, "teacher train acc", pct(~keep)),
            record(cfg, e, "teacher test acc", accuracy(teacher, xte, yte, cfg.attack_batch)),
            record(cfg, e, "kept (wrong) images", len(xk), 18768 if len(x) == 50000 else None, of=len(x)),
            record(cfg, e, "student test acc", accuracy(student, xte, yte, cfg.attack_batch), epochs=cfg.mis_epochs),
            record(cfg, e, "test images", len(yte))]


def fashion_as_mnist(xf, variant, mnist_mean=0.1307, mnist_std=0.3081):
    """Fashion-MNIST images prepared for an MNIST network, whose normalisation (x - 0.1307) / 0.3081 is
    inside it. What the network's first layer sees:
      'own':   (x - mean_F) / std_F, Fashion standardised with its own statistics (computed here from
               the images given), the way it would be fed with its own Normalize transform.
               In pixel space: x' = (x - mean_F) / std_F * 0.3081 + 0.1307 (may leave [0,1]).
      'mnist': (x - 0.1307) / 0.3081, Fashion standardised with MNIST's statistics: x' = x.
    xf: (N,1,28,28) uint8 -> float32."""
    x = to_float(xf)
    if variant == "mnist":
        return x
    return (x - x.mean()) / x.std() * mnist_std + mnist_mean


def exp_mnist_fashion(cfg, dev):
    """Wallace: an MNIST CNN labels the Fashion-MNIST training images (their own labels are never read); a fresh CNN
    trained on those pairs is tested on MNIST, with Fashion normalised by its own statistics and by MNIST's."""
    cfg, (xm, ym, xf, xmt, ymt) = mnist_and_fashion(cfg, dev)
    views = {v: fashion_as_mnist(xf, v) for v in ("own", "mnist")}  # 'own' leaves [0,1]: what the models are fed
    pixels = (min(0.0, *(math.floor(100 * v.min().item()) / 100 for v in views.values())),
              max(1.0, *(math.ceil(100 * v.max().item()) / 100 for v in views.values())))
    mnist = dict(arch="mnist_cnn", width=0, batch=cfg.mnist_batch, lr=cfg.mnist_lr, momentum=cfg.momentum, wd=cfg.wd,
                 augment=False, epochs=cfg.mnist_epochs, pixels=pixels)
    teacher = train_model(cfg, dev, "mnist-teacher", xm, ym, mnist)
    e = "mnist-fashion"
    recs = [record(cfg, e, "teacher MNIST test acc", accuracy(teacher, xmt, ymt, cfg.attack_batch), arch="mnist_cnn",
                   epochs=cfg.mnist_epochs)]
    for variant, xv in views.items():
        labels = predict(teacher, xv, cfg.attack_batch)  # the teacher's argmax labels on Fashion images
        hist = torch.bincount(labels, minlength=10).tolist()
        log(f"[{e}] Fashion-MNIST relabelled by the MNIST teacher ({variant} statistics): label histogram {hist}")
        student = train_model(cfg, dev, f"mnist-student-{variant}", xv, labels, mnist)
        recs.append(record(cfg, e, f"student MNIST test acc ({variant} stats)", accuracy(student, xmt, ymt, cfg.attack_batch),
                           arch="mnist_cnn", label_hist=hist, epochs=cfg.mnist_epochs))
    return recs


# ---------------------------------------------------------------------------------------- Nakkiran (Distill 2019)

def exp_bugs(cfg, dev):
    """Nakkiran, "Adversarial Examples are Just Bugs, Too": adversarial examples made *not* to transfer. Targeted PGD
    towards t = (y + 1) mod 10 on the target (the standard model) while an ensemble of K independently trained
    models is kept on y (nontransferable_objective). Beside plain targeted PGD with the same budget, report the
    attack success on the target, the transfer to a fresh model, and a fresh model trained on the D_det-style set
    (x', t) as he trained it (like a standard model, without augmentation): test accuracy on the true and on the
    shifted labels. These "bugs" carry no features that generalise; plain PGD examples do."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    target = natural_model(cfg, dev, data)
    members = [train_model(cfg, dev, f"bugs-member{k}", x, y, natural_recipe(cfg, member=k)) for k in range(cfg.bugs_k)]
    fresh = train_model(cfg, dev, "bugs-fresh", x, y, natural_recipe(cfg, member="fresh"))  # trained like the target
    t = (y + 1) % 10
    recs = []
    for norm, eps, step in (("l2", 2.5, 0.5), ("linf", 8 / 255, 2 / 255)):
        for method in ("pgd", "bugs"):
            name, ensemble = f"bugs-{norm}-{method}", members if method == "bugs" else []

            def run():
                if method == "pgd":
                    xa, _ = pgd(target, x, t, eps, 10, norm, step, targeted=True, batch=cfg.attack_batch, name=name)
                else:
                    xa, _ = pgd(target, x, torch.stack([t, y], 1), eps, 10, norm, step, batch=cfg.attack_batch,
                                objective=nontransferable_objective(target, members), name=name)
                return dict(images=xa.half(), labels=t)

            ds = stage(cfg, name, run, dict(norm=norm, eps=eps, step=step, steps=10), inputs=(x, y),
                       models=(target, *ensemble), title=f"{name} from {target.name}")
            xa = ds["images"].to(dev)
            model = train_model(cfg, dev, f"{name}-model", xa, ds["labels"].to(dev), recipe(cfg, augment=False))
            e = f"bugs {norm} {method}"
            recs += [record(cfg, e, "attack success on target", accuracy(target, xa, t, cfg.attack_batch),
                            norm=norm, eps=round(eps, 5), steps=10, step=round(step, 5), k=len(ensemble)),
                     record(cfg, e, "transfer to fresh model", accuracy(fresh, xa, t, cfg.attack_batch)),
                     record(cfg, e, "trained-on: test acc, true labels", accuracy(model, xte, yte, cfg.attack_batch)),
                     record(cfg, e, "trained-on: test acc, shifted labels",
                            accuracy(model, xte, (yte + 1) % 10, cfg.attack_batch))]
    return recs + [record(cfg, "bugs", "attacked images", len(x)), record(cfg, "bugs", "test images", len(xte))]


def squares_data(n, flip=0.1, noise=0.1, size=32, generator=None):
    """Nakkiran's adversarial squares: a sign s = +-1 per image; the image is s everywhere plus uniform noise
    in [-noise, noise] per pixel, so it lives in [-1-noise, 1+noise], not [0,1]; the label is (s > 0),
    flipped with probability `flip`. Every useful feature is robust. Returns (n,3,size,size) float32, (n,)."""
    s = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    x = s.view(n, 1, 1, 1) + (torch.rand(n, 3, size, size, generator=generator) * 2 - 1) * noise
    y = ((s > 0) ^ (torch.rand(n, generator=generator) < flip)).long()
    return x, y


def exp_squares(cfg, dev):
    """Nakkiran: on adversarial squares a linear classifier (the sign of the mean pixel) is robust up to Linf 0.9,
    yet a network that memorises the noisy labels (his: ResNet-18, Adam lr 1e-5, batch 128, 20 epochs, 99.9% train
    accuracy) is flipped by Linf 0.01 on almost every test point, while the same run stopped after its first epoch
    is not. The attack clamps to [-1.1, 1.1], the images' range."""
    cfg, g = dataclasses.replace(cfg, arch=cfg.squares_arch), torch.Generator().manual_seed(cfg.seed)
    x, y = (t.to(dev) for t in squares_data(cfg.squares_n, generator=g))
    xte, yte = (t.to(dev) for t in squares_data(max(cfg.squares_n // 10, 100), generator=g))

    def flipped(m, eps):  # share of test points some Linf PGD iterate moves off the model's own prediction
        _, moved = pgd(m, xte, predict(m, xte, cfg.attack_batch), eps, 10, "linf", lo=-1.1, hi=1.1, batch=cfg.attack_batch)
        return pct(moved)

    linear = LinearNet(2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).to(dev)
    linear.pixels = (-1.1, 1.1)
    with torch.no_grad():  # logit_1 - logit_0 = 2 * mean pixel: each pixel keeps its sign under Linf < 0.9
        linear.head.weight.copy_(torch.stack([-torch.ones(x[0].numel()), torch.ones(x[0].numel())]).to(dev) / x[0].numel())
        linear.head.bias.zero_()
    linear_flipped = flipped(linear, 0.89)
    if linear_flipped != 0:  # true by construction: a sanity check of pgd and the data, not one of the claims
        raise AdvexError(f"squares: the linear classifier was flipped at Linf 0.89 on {linear_flipped}% of points")
    e = "squares"
    recs = [record(cfg, e, "test points", len(yte)),
            record(cfg, e, "linear: test acc", accuracy(linear, xte, yte, cfg.attack_batch), arch="linear"),
            record(cfg, e, "linear: flipped by Linf 0.89", linear_flipped, arch="linear", norm="linf", eps=0.89, steps=10)]
    r = recipe(cfg, epochs=cfg.squares_epochs, batch=128, lr=cfg.squares_lr, optimizer="adam", augment=False, classes=2,
               norm=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), pixels=(-1.1, 1.1))
    for what, ri in (("memorising", r), ("1 epoch", dict(r, stop_epochs=1))):  # the same run, stopped early
        m = train_model(cfg, dev, "squares-net", x, y, ri)
        recs += [record(cfg, e, f"net {what}: train acc", accuracy(m, x, y, cfg.attack_batch), epochs=m.epochs_done),
                 record(cfg, e, f"net {what}: test acc", accuracy(m, xte, yte, cfg.attack_batch)),
                 record(cfg, e, f"net {what}: flipped by Linf 0.01", flipped(m, 0.01), norm="linf", eps=0.01, steps=10)]
    return recs


# ---------------------------------------------------------------------------------------- Goh, "Robust Feature Leakage"

def fit_linear(f, y, steps=500, lr=0.05):
    """Multinomial logistic regression on standardised features, full batch (Adam). f: (N, D) -> a function
    mapping features to logits. Seed the caller's stream first: the layer's initial weights are random."""
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    lin = nn.Linear(f.shape[1], 10).to(f.device)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    z = (f - mu) / sd
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(lin(z), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lambda h: lin((h - mu) / sd)


def exp_leakage(cfg, dev):
    """Goh, "Robust Feature Leakage": the 10 linear features of a robust linear classifier (L2 adversarial training)
    carry information into D_rand but not into D_det: a linear model on those features trained on D_rand is well
    above chance on the real test set, on D_det not (his numbers, and his deep model's on D_rand: PAPER). His
    features meet two specifications, both exact for a linear model: Spec 1, each feature is robustly useful for
    some class within L2 0.25 (linear_robust_usefulness); Spec 2, the classifier is stable (>= 80% of test
    predictions certified unchanged within L2 0.25)."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    lin = train_model(cfg, dev, "leakage-linear", x, y, recipe(
        cfg, arch="linear", width=0, epochs=cfg.leak_epochs, lr=cfg.leak_lr, batch=cfg.leak_batch, augment=False, adv_eps=cfg.leak_eps,
        adv_steps=cfg.adv_steps, adv_step=2.5 * cfg.leak_eps / cfg.adv_steps))
    e = "leakage"
    feats = lambda imgs: over_set(lin, lambda xb: lin(xb).float(), imgs, cfg.attack_batch)  # (N, 10): its features
    gamma = linear_robust_usefulness(lin, xte, yte, 0.25)  # (10 features, 10 classes)
    recs = [record(cfg, e, "robust linear: test acc", accuracy(lin, xte, yte, cfg.attack_batch), arch="linear",
                   adv_eps=cfg.leak_eps),
            record(cfg, e, "robust linear: features robustly useful at L2 0.25 (of 10)",
                   (gamma.amax(dim=1) >= 0).sum().item(), arch="linear", worst=round(gamma.amax(dim=1).min().item(), 4)),
            record(cfg, e, "robust linear: certified acc L2 0.25",
                   pct(linear_certified(lin, xte, yte, 0.25)), arch="linear"),
            record(cfg, e, "robust linear: stable predictions L2 0.25",
                   pct(linear_certified(lin, xte, predict(lin, xte, cfg.attack_batch), 0.25)),
                   arch="linear"),
            record(cfg, e, "test images", len(yte))]
    seed_all(cfg.seed, "leakage-head")
    head = fit_linear(feats(x), y)
    f_test = feats(xte)
    recs.append(record(cfg, e, "linear on features, trained on D", pct(head(f_test).argmax(1) == yte), arch="linear"))
    for name in ("d_rand", "d_det"):
        ds = construct(cfg, dev, data, name)
        seed_all(cfg.seed, f"leakage-head-{name}")
        head = fit_linear(feats(ds["images"].to(dev)), ds["labels"].to(dev))
        acc = pct(head(f_test).argmax(1) == yte)
        recs += [record(cfg, e, f"linear on features, trained on {name}", acc, arch="linear"),
                 record(cfg, e, f"deep model trained on {name}: test acc",
                        accuracy(constructed_model(cfg, dev, name, ds), xte, yte, cfg.attack_batch))]
    return recs


# ---------------------------------------------------------------------------------------- Gilmer & Hendrycks (Distill 2019)

def freq_radius(h, w, device="cpu"):
    """max(|ky|, |kx|) of every entry of an (h, w) torch.fft.fft2 output: the integer frequency, 0 (DC) to h/2."""
    ky, kx = (torch.fft.fftfreq(n, 1 / n, device=device).abs() for n in (h, w))
    return torch.maximum(ky[:, None], kx[None, :])


def band_pass(x, lo=0, hi=math.inf):
    """x with only its 2D frequencies lo <= max(|ky|,|kx|) <= hi kept, per channel: (N,C,H,W) float -> same, real."""
    r = freq_radius(*x.shape[-2:], x.device)
    return torch.fft.ifft2(torch.fft.fft2(x) * ((r >= lo) & (r <= hi))).real


def energy_share(x, lo=0, hi=math.inf):
    """The share of x's non-DC energy (|FFT|^2 summed over the set and channels, all frequencies but 0) in the band."""
    r = freq_radius(*x.shape[-2:], x.device)
    e = torch.fft.fft2(x).abs().pow(2).sum(dim=(0, 1))
    return (e * ((r >= lo) & (r <= hi) & (r > 0))).sum().item() / (e * (r > 0)).sum().clamp_min(1e-30).item()


def fourier_basis(size, i, j):
    """Yin et al. 2019's Fourier basis image U_ij (size, size): the real image whose only 2D frequencies are +-(i, j)
    (the inverse FFT of (1+i)/2 at (i, j) and (1-i)/2 at (-i, -j), or 1 where they coincide), of unit L2 norm."""
    m = torch.arange(size, dtype=torch.float64)
    theta = 2 * math.pi * (i * m[:, None] + j * m[None, :]) / size
    self_conjugate = (2 * i) % size == 0 and (2 * j) % size == 0
    u = theta.cos() if self_conjugate else theta.cos() - theta.sin()
    return (u / u.norm()).float()


def fourier_heatmap(model, x, y, norm, batch):
    """Yin et al. 2019's Fourier heat map (Gilmer & Hendrycks' Fig. 2), per image: whether the model errs on (x, y)
    when norm * s * U_ij, s a random sign per image and channel, is added to every image and the result clipped to
    [0,1], for each frequency (i, j), i, j in -size/2 .. size/2 - 1; the map is its mean over the images. As Yin et
    al., (i, j) and (-i, -j), the same frequency, share one measurement. The images go through the model at as many
    frequencies at once as `batch` holds (a heat map is a thousand small passes otherwise). Returns (N, size, size)
    bool, DC at [:, size/2, size/2] (per image, so that two models' maps on the same images compare pairwise)."""
    size, half = x.shape[-1], x.shape[-1] // 2
    xs, wrong, cells, measured = to_float(x), torch.zeros(len(x), size, size, dtype=torch.bool), [], set()
    for i in range(-half, half):
        for j in range(-half, half):
            here, mirror = (i + half, j + half), ((-i + half) % size, (-j + half) % size)  # where (-i, -j) sits
            if mirror not in measured:
                cells.append((i, j, here, mirror))
                measured.add(here)
    group = max(1, batch // len(x))  # frequencies per pass
    for k in range(0, len(cells), group):
        part = cells[k:k + group]
        signs = [torch.randint(0, 2, (len(x), x.shape[1], 1, 1), device=x.device) * 2 - 1 for _ in part]
        xp = torch.cat([(xs + norm * s * fourier_basis(size, i, j).to(x.device)).clamp(0, 1)
                        for s, (i, j, _, _) in zip(signs, part)])  # (len(part) * N, C, H, W)
        w = (predict(model, xp, batch) != y.repeat(len(part))).view(len(part), len(x)).cpu()
        for (_, _, here, mirror), wf in zip(part, w):
            wrong[:, here[0], here[1]] = wrong[:, mirror[0], mirror[1]] = wf
    return wrong


def band_mean(err, lo=0, hi=math.inf):
    """The mean of Fourier heat maps (..., size, size; frequency 0 at [size/2, size/2]) over lo <= max(|ky|,|kx|) <= hi:
    a float for one map, (N,) for N per-image maps."""
    r = freq_radius(*err.shape[-2:]).roll((err.shape[-2] // 2, err.shape[-1] // 2), (0, 1))
    m = err.float()[..., (r >= lo) & (r <= hi)].mean(dim=-1)
    return m.item() if m.dim() == 0 else m


def plasma_fractal(n, size=32, decay=3.0):
    """n diamond-square plasma fractals (n, size, size) in [0,1], size a power of two: CIFAR-10-C's fog (Hendrycks &
    Dietterich 2019). From a zero map, each level sets the centre of every square to the mean of its corners and then
    every edge midpoint to the mean of its four neighbours (the map wraps around), each plus uniform noise in
    [-w^2, w^2]; w starts at 100 and is divided by `decay` at every level (larger decay: smoother fog)."""
    m, step, w = torch.zeros(n, size, size), size, 100.0
    noise = lambda like: (torch.rand_like(like) * 2 - 1) * w * w
    while step >= 2:
        h = step // 2
        c = m[:, ::step, ::step]  # corners
        m[:, h::step, h::step] = (c + c.roll(-1, 1) + c.roll(-1, 2) + c.roll((-1, -1), (1, 2))) / 4 + noise(c)
        c, d = m[:, ::step, ::step], m[:, h::step, h::step]  # corners, centres
        top, left = c + c.roll(-1, 2) + d + d.roll(1, 1), c + c.roll(-1, 1) + d + d.roll(1, 2)
        m[:, ::step, h::step], m[:, h::step, ::step] = top / 4 + noise(top), left / 4 + noise(left)
        step, w = h, w / decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def corrupt(x, kind, severity):
    """CIFAR-10-C's recipes with their published constants, severity 1..5; x (N,3,H,W) in [0,1] -> the same range.
    fog: + a * plasma (the same map on every channel), rescaled by m / (m + a), m the image's maximum;
    contrast: scaled by c around each channel's mean; noise: + N(0, sigma^2) per pixel. Then clipped to [0,1]."""
    if kind == "fog":
        a, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
        m = x.amax(dim=(1, 2, 3), keepdim=True)
        out = (x + a * plasma_fractal(len(x), x.shape[-1], decay).to(x.device)[:, None]) * m / (m + a)
    elif kind == "contrast":
        c, mean = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1], x.mean(dim=(2, 3), keepdim=True)
        out = (x - mean) * c + mean
    else:
        out = x + torch.randn_like(x) * (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return out.clamp(0, 1)


def exp_frequency(cfg, dev):
    """Gilmer & Hendrycks, "Adversarial Example Researchers Need to Expand What is Meant by 'Robustness'":
    (a) a model trained and tested on high-pass filtered images, which look flat grey to a person, still generalises
        (ImageNet: above 50% top-1; low-pass: above 30%); here the standard recipe on CIFAR-10 kept to the
        frequencies max(|k|) >= --freq-high (shifted to grey 0.5, not clipped) or <= --freq-low;
    (b) Fourier heat maps (Yin et al. 2019) of the standard and the robust model: adversarial training trades
        robustness to high-frequency perturbations for fragility at low frequencies;
    (c) CIFAR-10-C's fog, contrast and Gaussian noise, severities 1-5 (adversarial training lowers fog accuracy:
        PAPER): accuracy and accuracy retained (corrupted / clean; the two models' clean accuracies differ)."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    e, recs, xf = "frequency", [], to_float(xte)
    filters = {"high-pass": dict(lo=cfg.freq_high, grey=0.5), "low-pass": dict(hi=cfg.freq_low, grey=0.0)}
    shown = {}
    for name, band in filters.items():
        f = lambda imgs: band_pass(to_float(imgs), band.get("lo", 0), band.get("hi", math.inf)) + band["grey"]
        model = train_model(cfg, dev, name, f(x), y, recipe(cfg, pad_fill=band["grey"]))  # crops padded with grey
        shown[name] = f(xte[:10])
        recs += [record(cfg, e, f"{name}: test acc (filtered test set)", accuracy(model, f(xte), yte, cfg.attack_batch),
                        keep=f"max|k| >= {cfg.freq_high}" if name == "high-pass" else f"max|k| <= {cfg.freq_low}"),
                 record(cfg, e, f"{name}: share of non-DC energy kept (%)",
                        100 * energy_share(xf, band.get("lo", 0), band.get("hi", math.inf)))]
    std, rob = natural_model(cfg, dev, data), robust_model(cfg, dev, data)
    n = min(cfg.freq_images, len(xte))
    bands = {"high": (cfg.freq_high, math.inf), "low": (0, cfg.freq_low)}
    maps, excess, retained = {}, {}, {}  # excess: per image and band; retained: per corruption, (value, SE)
    for kind, model in (("standard", std), ("robust", rob)):
        wrong = stage(cfg, "heatmap", lambda: dict(wrong=fourier_heatmap(model, xte[:n], yte[:n], cfg.freq_norm, cfg.attack_batch)),
                      dict(norm=cfg.freq_norm), inputs=(xte[:n], yte[:n]), models=(model,), title=f"heatmap {model.name}")["wrong"]
        maps[kind] = 100 * wrong.float().mean(dim=0)  # (size, size) error rate, %
        clean, rec = accuracy(model, xte, yte, cfg.attack_batch), functools.partial(record, cfg, e, arch=model.key.get("arch"))
        clean_wrong = (predict(model, xte[:n], cfg.attack_batch) != yte[:n]).float().cpu()  # (n,) the map's own images
        for band, (lo, hi) in bands.items():
            excess[kind, band] = 100 * (band_mean(wrong, lo, hi) - clean_wrong)  # (n,) points
            recs += [rec(f"{kind} model: heat map error, {band} frequencies (%)", band_mean(maps[kind], lo, hi), images=n,
                         norm=cfg.freq_norm, band=f"{lo} <= max|k| <= {hi}"),
                     rec(f"{kind} model: heat map excess error, {band} frequencies", excess[kind, band].mean().item(),
                         clean_error=round(100 * clean_wrong.mean().item(), 4))]
        recs.append(rec(f"{kind} model: clean test acc", clean))
        for corruption in ("fog", "contrast", "noise"):
            accs = []
            for severity in range(1, 6):
                seed_all(cfg.seed, f"{corruption}{severity}")  # the same corrupted images for both models
                accs.append(accuracy(model, corrupt(xf, corruption, severity), yte, cfg.attack_batch))
                recs.append(rec(f"{kind} model: {corruption} severity {severity} acc", accs[-1]))
            mean = sum(accs) / 5  # a mean of five binomials on the same images: its SE is at most one's
            retained[kind, corruption] = (100 * mean / max(clean, 1e-9), 100 * se(mean, len(yte)) / max(clean, 1e-9))
            recs += [rec(f"{kind} model: {corruption} acc, mean over severities", mean),
                     rec(f"{kind} model: {corruption} accuracy retained (%)", retained[kind, corruption][0])]
    for band in bands:  # robust - standard, paired over the heat map's images (the same images and signs for both)
        d = excess["robust", band] - excess["standard", band]
        recs += [record(cfg, e, f"heat map excess error, robust - standard, {band} frequencies", d.mean().item()),
                 record(cfg, e, f"heat map excess error, robust - standard, {band} frequencies: SE",
                        d.std().item() / math.sqrt(n), images=n)]
    for corruption in ("fog", "contrast", "noise"):
        (r, r_se), (s_, s_se) = retained["robust", corruption], retained["standard", corruption]
        recs += [record(cfg, e, f"accuracy retained, robust - standard, {corruption}", r - s_),
                 record(cfg, e, f"accuracy retained, robust - standard, {corruption}: SE", math.hypot(r_se, s_se))]
    recs.append(record(cfg, e, "test images", len(yte)))
    figure_frequency(cfg, maps, xf[:10], yte[:10], shown)
    return recs


# ---------------------------------------------------------------------------------------- Goh, "Two Examples of Useful, Non-Robust Features"

def linear_feature_stats(a, xc, y, cov):
    """Goh's measures of linear features f(x) = a.x / ||a||_S, a (K, D), on centred images xc (N, D) with labels
    y = +-1, (N,) for all K or (N, K) one column per feature, and the training covariance S = cov (D, D), float64:
    usefulness E[y f(x)] (K,) and robustness ||a||_S / ||a|| (K,), which for an eigenvector of S is the square root of
    its eigenvalue. Robust usefulness at L2 eps is usefulness - eps / robustness (the worst perturbation moves f by
    eps ||a|| / ||a||_S)."""
    norm_s = ((a @ cov) * a).sum(dim=1).clamp_min(0).sqrt()
    m = xc.T @ y / len(y)  # (D,) or (D, K): the label-weighted mean image
    return (a @ m if y.dim() == 1 else (a * m.T).sum(dim=1)) / norm_s, norm_s / a.norm(dim=1)


def principal_directions(x):
    """The unit eigenvectors of the covariance S of centred images x (N, D), the most robust (largest eigenvalue)
    first, (K, D), and S (D, D): only the K directions the images span (fewer images than pixels, as in the tests,
    leave some of zero variance)."""
    cov = x.T @ x / len(x)
    lam, eigs = torch.linalg.eigh(cov)
    return eigs.T.flip(0)[lam.flip(0) > 1e-10 * lam.max()], cov


def well_estimated(x, block=32, factor=2.0):
    """How many of the most robust directions of the training images x (N, D, centred) are estimated well enough to
    judge, chosen on those images alone: the directions of one random half are kept, the most robust first, while on
    the other half their variance stays within `factor` x their eigenvalue (the median of each `block` of
    neighbours). Beyond, an eigenvalue from N/2 images of D values understates what new images do. Half the images
    estimate fewer directions well than all of them, so the count is on the safe side."""
    order = torch.randperm(len(x), device=x.device)
    a, b = x[order[:len(x) // 2]], x[order[len(x) // 2:]]
    eigs, cov = principal_directions(a - a.mean(dim=0))
    ratio = ((b - a.mean(dim=0)) @ eigs.T).var(dim=0) / ((eigs @ cov) * eigs).sum(dim=1)  # (K,)
    block = min(block, len(ratio))
    blocks = ratio[:len(ratio) // block * block].view(-1, block).median(dim=1).values
    bad = (blocks > factor).nonzero().flatten().tolist()
    return (bad[0] if bad else len(blocks)) * block  # whole blocks only, every one of them checked


def ensemble(directions, x, labels):
    """Goh's ensemble: the sum of the unit directions (K, D), each signed to be useful for the labels on the centred
    images x (N, D). labels (N, L), one label vector per ensemble -> (L, D). Only x and the labels choose the signs, so
    on other images (the test set) the ensemble's usefulness is held out."""
    return (directions @ (x.T @ labels)).sign().T @ directions


def ensemble_null(directions, x, y, xt, yt, cov, draws):
    """A permutation null for the ensemble's held-out usefulness: `draws` shuffles of the training labels y, the
    signs chosen again on the training images x each time, each ensemble measured on the test images (xt, yt).
    Returns the draws' test usefulness (draws,), their usefulness on their own shuffled labels and their robustness."""
    shuffled = torch.stack([y[torch.randperm(len(y), device=y.device)] for _ in range(draws)], dim=1)  # (N, draws)
    a = ensemble(directions, x, shuffled)  # (draws, D)
    return (linear_feature_stats(a, xt, yt, cov)[0],) + linear_feature_stats(a, x, shuffled, cov)


def exp_linear_features(cfg, dev):
    """Goh's two constructions on CIFAR-10 trucks (+1) vs frogs (-1), with all 10,000 training images of the two
    classes at every scale (S is 3072 x 3072; its eigenvectors are the linear features):
    * every eigenvector of S as a feature: the robust (low-frequency) ones are the useful ones (his figure: log
      robustness vs usefulness). Judged held out: each direction's sign chosen on the training images, its usefulness
      measured on the test images, over the most robust directions up to a cut chosen on the training images alone
      (well_estimated). Beyond it the directions are poorly estimated from 10,000 images of 3,072 values: on new
      images their variance exceeds their training eigenvalue (recorded), so their usefulness is inflated. The
      Spearman at every twelfth of the directions is recorded too, so the cut's effect can be seen;
    * ensemble: the sign-weighted sum of the unit eigenvectors less robust than --lin-robustness times the most robust
      one's (Goh: 349 directions, each of usefulness <= 0.027, together 0.208, signs chosen on the images he measured
      on). Here the signs come from the training images and the usefulness from the test images, against a
      permutation null: --lin-null shuffles of the training labels, the signs chosen again on each;
    * containment, a demonstration: (1 - alpha) a_nonrobust + alpha a_robust (unit eigenvectors, alpha from 1 down to
      1e-9) keeps most of a_robust's usefulness while its robustness falls by orders of magnitude."""
    xtr, ytr, xte, yte = cifar_full(cfg)

    def trucks_frogs(x, y):
        keep = (y == 9) | (y == 6)
        small = F.interpolate(to_float(x[keep]), size=cfg.lin_size, mode="area")  # the identity at 32
        return small.flatten(1).double().to(dev), (2.0 * (y[keep] == 9) - 1).double().to(dev)

    (x, y), (xt, yt) = trucks_frogs(xtr, ytr), trucks_frogs(xte, yte)
    mu = x.mean(dim=0)
    x, xt = x - mu, xt - mu
    eigs, cov = principal_directions(x)  # (K, D)
    useful, robust = linear_feature_stats(eigs, x, y, cov)
    eigs, useful = eigs * useful.sign()[:, None], useful.abs()  # each direction's sign makes it useful (on training images)
    held_out = linear_feature_stats(eigs, xt, yt, cov)[0]
    ratio = (xt @ eigs.T).var(dim=0) / robust.pow(2)  # test variance of a.x over the training eigenvalue
    seed_all(cfg.seed, "linear-features-cut")
    cut = min(well_estimated(x), len(eigs))
    e, n = "linear-features", len(xt)
    rec = functools.partial(record, cfg, e, arch="linear")
    rho = lambda k: spearman(robust[:k].log().tolist(), held_out[:k].tolist())
    step = max(3, len(eigs) // 12)
    recs = [rec("training images", len(x)), rec("test images", n), rec("eigenvectors", len(eigs), side=cfg.lin_size),
            rec("eigenvectors up to the cut", cut, chosen_on="the training images (well_estimated)"),
            rec("eigenvectors up to the cut: Spearman(log robustness, test usefulness)", rho(cut),
                by_cut={k: round(rho(k), 4) for k in range(step, len(eigs) + 1, step)}),
            rec("eigenvectors, all: Spearman(log robustness, test usefulness)", rho(len(eigs))),
            rec("eigenvectors, all: Spearman(log robustness, usefulness on training images)",
                spearman(robust.log().tolist(), useful.tolist())),
            rec("eigenvectors up to the cut: test variance / eigenvalue, median", ratio[:cut].median().item()),
            rec("eigenvectors beyond the cut: test variance / eigenvalue, median",
                ratio[cut:].median().item() if cut < len(eigs) else math.nan),
            rec("most useful eigenvector: usefulness", useful.max().item(), rank_by_robustness=int(useful.argmax()))]
    seed_all(cfg.seed, e)
    below = robust < cfg.lin_robustness * robust.max()
    a = ensemble(eigs[below], x, y[:, None])  # (1, D)
    (u_in, r_in), (u_out, _) = linear_feature_stats(a, x, y, cov), linear_feature_stats(a, xt, yt, cov)
    null_out, null_in, null_r = ensemble_null(eigs[below], x, y, xt, yt, cov, cfg.lin_null)
    p99, p = null_out.quantile(NULL_Q).item(), (1 + (null_out >= u_out).sum().item()) / (1 + cfg.lin_null)
    recs += [rec("ensemble: directions", int(below.sum()), threshold=cfg.lin_robustness),
             rec("ensemble: usefulness on its training labels (signs chosen there)", u_in.item()),
             rec("ensemble: usefulness on test images", u_out.item()),
             rec("ensemble: variance of f on test images", (xt @ a[0]).var().item() / (a[0] @ cov @ a[0]).item()),
             rec("ensemble: robustness", r_in.item()),
             rec(f"ensemble: robust usefulness at L2 {cfg.lin_eps:g} (test)", u_out.item() - cfg.lin_eps / r_in.item()),
             rec("shuffled-label null: draws", cfg.lin_null),
             rec(f"shuffled-label null: test usefulness, {100 * NULL_Q:g}th percentile", p99),
             rec("shuffled-label null: test usefulness, mean", null_out.mean().item(), sd=round(null_out.std().item(), 4)),
             rec("shuffled-label null: usefulness on their own training labels, mean", null_in.mean().item()),
             rec("ensemble: p-value against the shuffled-label null", p)]
    alpha = torch.logspace(0, -9, 200, dtype=torch.float64, device=dev)[:, None]
    a_r, a_nr = eigs[int(useful.argmax())], eigs[-1]  # the most useful direction; the least robust one
    path = linear_feature_stats((1 - alpha) * a_nr + alpha * a_r, x, y, cov)
    kept = path[0] >= 0.9 * path[0][0]  # path[.][0]: alpha = 1, a_robust itself
    drop = (path[1][kept].min() / path[1][0]).item()
    recs.append(rec("containment: robustness left while keeping 90% of a_robust's usefulness (%)", 100 * drop))
    figure_linear_features(cfg, useful, robust, dict(ensemble=(r_in.item(), u_out.item()),
                                                     null=(null_r.median().item(), p99)), path,
                           (useful.max().item(), robust[int(useful.argmax())].item()))
    return recs


# ---------------------------------------------------------------------------------------- Nakano (Distill 2019) and the authors' reply

def layer_robustness(model, x, eps, steps, batch=4096):
    """The authors' reply to Nakano: R(f) = E[max over ||x' - x1||_2 <= eps of ||f(x') - f(x1)||] / E[||f(x1) - f(x2)||],
    x1, x2 independent test images, f each stage of the model (its `stages`). The inner max by PGD from a random
    point of the ball (at x1 itself the gradient is 0). x (N, C, H, W) -> [(R, its standard error) per stage]: R is
    a ratio of two means over the images, its SE the delta method's."""
    x = to_float(x)
    x2 = x[random_other(len(x), x.device)]
    out = []
    for s in range(len(model.stage_ends)):
        f = lambda z: over_set(model, lambda zb: stages(model, zb, s)[s].flatten(1).float(), z, batch, amp=False)
        fx = f(x)
        change = make_objective(lambda z, t: ((stages(model, z, s)[s].flatten(1).float() - t).pow(2).sum(dim=1), None), amp=False)
        xa, _ = pgd(model, x, fx, eps, steps, "l2", random_start=True, batch=batch, objective=change)  # ascend the change^2
        a, b = (f(xa) - fx).norm(dim=1).double(), (fx - f(x2)).norm(dim=1).double()  # (N,) each
        r, cov = a.mean() / b.mean(), torch.cov(torch.stack([a, b]))
        var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (len(a) * b.mean() ** 2)
        out.append((r.item(), var.clamp_min(0).sqrt().item()))
    return out


def gram(h):
    """Gatys et al.'s style statistic: (B, C, H, W) -> (B, C, C) channel correlations, divided by C*H*W."""
    f = h.flatten(2)
    return f @ f.transpose(1, 2) / f[0].numel()


def style_distances(model, a, b):
    """||G_s(a) - G_s(b)||^2 at every stage s of the model: (B, stages); b may be one image, broadcast."""
    return torch.stack([(gram(p) - gram(q)).pow(2).sum(dim=(1, 2)) for p, q in zip(stages(model, a), stages(model, b))], 1)


def untrained_judge(r, dev):
    """A network of recipe r that has learnt nothing, so shares no Gram statistics with either model it judges: He et
    al.'s variance-preserving initialisation (Kaiming, ReLU gain) for every convolution, BatchNorm at its initial
    statistics (the identity in eval mode), so every stage's activations, and its Gram matrices, keep their scale."""
    judge = new_model(r, dev)
    for m in judge.modules():
        if isinstance(m, nn.Conv2d):  # drawn in the standard layout, so the same numbers with or without channels_last
            w = nn.init.kaiming_normal_(torch.empty(m.weight.shape, device=dev), nonlinearity="relu")
            with torch.no_grad():
                m.weight.copy_(w)
    return judge


def style_transfer(style_model, content_model, content, style, iters, content_stage=2):
    """Gatys et al. 2016 with the style of one network and the content of another (the authors' control: the style
    network matters, the content network barely): from z = content, Adam (lr 0.02) on z in [0,1] minimises
    sum_s ||G_s(z) - G_s(style)||^2 / ||G_s(content) - G_s(style)||^2 (every stage of style_model) +
    ||h(z) - h(content)||^2 / ||h(style) - h(content)||^2 (h: stage `content_stage` of content_model), each term 1 at
    the start or at the style. content (B, 3, H, W), style (1, 3, H, W) in [0,1] -> (B, 3, H, W)."""
    with torch.no_grad():
        g_style = [gram(h) for h in stages(style_model, style)]
        g_scale = [(gram(h) - g).pow(2).sum(dim=(1, 2)) for h, g in zip(stages(style_model, content), g_style)]
        h_content = stages(content_model, content, content_stage)[content_stage]
        h_scale = (stages(content_model, style, content_stage)[content_stage] - h_content).pow(2).flatten(1).sum(dim=1)
    z = content.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.02)
    for _ in range(iters):
        loss = sum(((gram(h) - g).pow(2).sum(dim=(1, 2)) / s.clamp_min(1e-12)).sum()
                   for h, g, s in zip(stages(style_model, z), g_style, g_scale))
        loss = loss + ((stages(content_model, z, content_stage)[content_stage] - h_content).pow(2).flatten(1).sum(dim=1)
                       / h_scale.clamp_min(1e-12)).sum()
        z.grad = torch.autograd.grad(loss, z)[0]  # no parameter gradients: only z is optimised
        opt.step()
        with torch.no_grad():
            z.clamp_(0, 1)
    return z.detach()


def texture(size):
    """A synthetic style image (3, size, size) in [0,1] from the current random stream: three coloured sinusoidal
    gratings, each of random orientation, period (size/8 to size/3 pixels) and colour, over grey."""
    m = torch.arange(size, dtype=torch.float32)
    img = torch.full((3, size, size), 0.5)
    for _ in range(3):
        angle, period, colour = torch.rand(()) * math.pi, size / (3 + 5 * torch.rand(())), torch.rand(3, 1, 1) - 0.5
        wave = torch.sin(2 * math.pi * (m[:, None] * angle.sin() + m[None, :] * angle.cos()) / period)
        img = img + 0.5 * colour * wave
    return img.clamp(0, 1)


def exp_style(cfg, dev):
    """Nakano, "Adversarially Robust Neural Style Transfer", and the authors' reply. (a) Layer robustness R(f) of each
    stage of the standard and the robust model at L2 --style-eps (their figure, ImageNet ResNet-50: standard ~0.5,
    robust ~0.06; they give no radius). (b) Gatys style transfer with each model's Gram matrices (the content loss
    always on the standard model), from CIFAR test images upsampled to --style-size (or --content-image) towards
    --style-image (or a synthetic texture): how much closer to the style the output is than the content, judged by the
    Gram distance of a neutral network (an untrained one of the same architecture, which shares no training, and so
    no Gram statistics, with either model), and, as description, where the change (output - content) puts its
    energy: at low (max|k| <= size/8) and high (>= size/4) frequencies. Nakano's own (qualitative) observation: robust
    stylisations work and are slightly noisier. The content images are 32-pixel images upsampled, and Adam is not his
    L-BFGS, so the bands describe our outputs, not his."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    std, rob = natural_model(cfg, dev, data), robust_model(cfg, dev, data)
    seed_all(cfg.seed, "style-judge")
    judge = untrained_judge(recipe(cfg), dev)
    n, e, recs = min(cfg.style_images, len(xte)), "style", []
    worst, margin = 0.0, math.inf
    for eps in cfg.style_eps:
        rs = {}
        for kind, model in (("standard", std), ("robust", rob)):
            seed_all(cfg.seed, f"style-R-{kind}-{eps}")
            rs[kind] = layer_robustness(model, xte[:n], eps, cfg.style_steps, cfg.attack_batch)
            recs += [record(cfg, e, f"{kind} model: R(f) stage {s + 1}, L2 {eps:g}", r, arch=model.key.get("arch"),
                            images=n, steps=cfg.style_steps, se=round(r_se, 5)) for s, (r, r_se) in enumerate(rs[kind])]
        for (r, r_se), (s_, s_se) in zip(rs["robust"], rs["standard"]):  # the two draw their own second images
            worst, margin = max(worst, r / s_), min(margin, (s_ - r) / max(math.hypot(r_se, s_se), 1e-12))
    recs += [record(cfg, e, "R(f) robust / standard, largest over stages and radii", worst, radii=list(cfg.style_eps)),
             record(cfg, e, "R(f) standard - robust, smallest over stages and radii, in SE", margin)]
    size = cfg.style_size
    up = lambda img: F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    content = up(read_image(cfg.content_image)[None]) if cfg.content_image else up(to_float(xte[:8]))
    seed_all(cfg.seed, "style-texture")
    style = up(read_image(cfg.style_image)[None]) if cfg.style_image else texture(size)[None]
    content, style = content.to(dev), style.to(dev)
    outs, closer = {}, {}
    for kind, model in (("standard", std), ("robust", rob)):
        outs[kind] = style_transfer(model, std, content, style, cfg.style_iters)
        with torch.no_grad():  # per stage, how much of the content's distance to the style is left: (B, stages)
            ratio = style_distances(judge, outs[kind], style) / style_distances(judge, content, style).clamp_min(1e-30)
        closer[kind] = ratio.mean(dim=1)  # (B,) every stage weighs the same, whatever the scale of its Gram matrices
        rec = functools.partial(record, cfg, e, arch=model.key.get("arch"))
        recs += [rec(f"{kind} style: judge's style distance, output / content", closer[kind].mean().item(),
                     judge="untrained, Kaiming", size=size, iters=cfg.style_iters, images=len(content)),
                 *(rec(f"{kind} style: judge's stage {k + 1} distance, output / content", v.item())
                   for k, v in enumerate(ratio.mean(dim=0))),
                 rec(f"{kind} style: share of the change's energy at low frequencies (%)",
                     100 * energy_share(outs[kind] - content, hi=size // 8), band=f"max|k| <= {size // 8}"),
                 rec(f"{kind} style: share of the change's energy at high frequencies (%)",
                     100 * energy_share(outs[kind] - content, lo=size // 4), band=f"max|k| >= {size // 4}")]
    d = closer["standard"] - closer["robust"]  # paired over the content images; one image (--content-image): no SE
    recs += [record(cfg, e, "judge's style distance, standard - robust: SE", d.std().item() / math.sqrt(len(d)),
                    images=len(d))] if len(d) > 1 else []
    grid(os.path.join(cfg.out, "style.png"), f"Nakano: style transfer with a standard vs a robust model ({tag(cfg)})",
         [torch.stack([c, style[0], outs["standard"][i], outs["robust"][i]]) for i, c in enumerate(content[:4])],
         [f"content {i + 1}" for i in range(len(content[:4]))], ["content", "style", "standard model's style",
                                                              "robust model's style"], scale=max(1, 192 // size),
         note=f"{cfg.arch}-{cfg.width} models; content loss on the standard model's stage 3; {cfg.style_iters} Adam steps")
    return recs


# #####################################################################################################################
# PLUMBING. Everything below is bookkeeping that a reader of the method can skip: the artifact cache (keys, files,
# timing, FLOP counts), results and the claims table, figures, file formats and their checks, the command line.
# #####################################################################################################################

# =====================================================================================================================
# Artifact cache: one helper, stage(), runs a stage or reads back what it made, keyed by everything that made it
# =====================================================================================================================

with open(__file__, "rb") as _f:
    CODE = hashlib.sha1(_f.read()).hexdigest()[:10]  # this file's text: part of every key
WHERE = {"data", "out", "export", "download", "device", "compile", "attack_batch", "seed", "seeds", "since"}  # never in a key
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}
STAGES = []   # this process's timed stages; main() adds them to results.json
MEMO = {}     # artifact path -> what stage() returned for it, in this process
FLOPS = [0]   # FLOPs counted by count_flops
_NESTED = []  # [seconds, flops, planned...] of the stages inside each running stage (a stage's own excludes them)
_FINGERPRINTS = {}


def fingerprint(*tensors):
    """The identity of the exact tensors a stage used: sha1 of their dtypes, shapes and bytes (10 hex digits)."""
    h = hashlib.sha1()
    for t in tensors:
        ref, version, digest = _FINGERPRINTS.get(id(t), (None, None, None))
        if ref is None or ref() is not t or version != t._version:  # hashed once per tensor object and version
            c = t.detach().contiguous().cpu()
            d = hashlib.sha1(f"{c.dtype}{tuple(c.shape)}".encode())
            d.update(c.reshape(-1).view(torch.uint8).numpy())
            digest = d.hexdigest()
            _FINGERPRINTS[id(t)] = (weakref.ref(t), t._version, digest)
        h.update(digest.encode())
    return h.hexdigest()[:10]


def settings_key(settings):
    """Short hash of a settings dict (plain values, nested dicts): names artifacts and runs."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def stage(cfg, name, run, settings=None, inputs=(), models=(), title=None):
    """Run one stage of an experiment, or read back what it made before. run() -> a dict of tensors and plain values,
    stored at OUT/artifacts/TITLE-sSEED-KEY.pt, KEY a hash of `settings`, the stage's name, the fingerprints of the
    tensors `inputs`, the keys of `models` (what they were made from), the seed and CODE (this file's text): a changed
    setting, input, upstream model or procedure gives a new key. run() draws from its own random stream (seed_all(seed, name)).
    The stage's seconds and FLOPs (without those of stages inside it) go to the stage table. Returns the stored dict
    (on the CPU) with 'key' (its key's contents) and 'file' (its path)."""
    key = dict(settings or {}, stage=name, inputs=fingerprint(*inputs), models=[m.key for m in models], seed=cfg.seed,
               precision=cfg.precision, code=CODE)
    title = title or name
    slug = re.sub(r"[^\w.]+", "-", title).strip("-")  # 'standard (fastnet)' -> standard-fastnet
    path = os.path.join(cfg.out, "artifacts", f"{slug}-s{cfg.seed}-{settings_key(key)}.pt")
    if path in MEMO:
        return MEMO[path]
    start, out = [time.time(), FLOPS[0], *PLANNED], None
    _NESTED.append([0.0] * len(start))
    if os.path.isfile(path):
        try:
            out = read_artifact(path, key)
            log(f"[{title}] reading {path}")
        except AdvexError as e:  # truncated (a full disk, a killed copy) or foreign: made again, in its place
            log(f"advex: warning: {e}; making it again")
    loaded = out is not None
    if not loaded and PLANNING:  # a plan makes nothing: run() ran on probes (Plan) and its output is a placeholder
        seed_all(cfg.seed, name)
        out = dict(run(), key=key, file=path)
    elif not loaded:
        seed_all(cfg.seed, name)
        save_atomic(dict(run(), key=json.dumps(key, sort_keys=True)), path)
        log(f"[{title}] done in {fmt_time(time.time() - start[0])}; saved {path}")
        out = read_artifact(path, key)
    inner = _NESTED.pop()
    spent = [now - then for now, then in zip([time.time(), FLOPS[0], *PLANNED], start)]  # seconds, FLOPs, planned
    if _NESTED:
        _NESTED[-1][:] = [a + b for a, b in zip(_NESTED[-1], spent)]
    own = [a - b for a, b in zip(spent, inner)]  # without the stages inside this one
    STAGES.append(dict(stage=title, seconds=round(own[0], 3), tflop=round(own[1] / 1e12, 4), loaded=loaded, file=path,
                       time=time.time(), **(dict(here=round(own[2], 2), h100=round(own[3], 2)) if PLANNING else {})))
    MEMO[path] = out
    return out


def read_artifact(path, key):
    """An artifact written by stage() for this key, read with weights_only=True (tensors and plain values only)."""
    d = torch_load(path)
    if not isinstance(d, dict) or d.get("key") != json.dumps(key, sort_keys=True):
        raise AdvexError(f"{path} is not what advex wrote here for this stage")
    return dict(d, key=key, file=path)


def save_atomic(obj, path):
    """torch.save (text for a str, PNG for a Pillow image) to PATH.tmpPID, then rename: an interrupt never leaves half
    a file, and a failed write (disk full, a file-size limit) removes its temporary and names the file. A tensor that
    views a larger one (the first 200 of 50,000 labels) is saved alone, not with the whole storage it views."""
    tmp = f"{path}.tmp{os.getpid()}"
    compact = lambda v: v.clone() if torch.is_tensor(v) and v.untyped_storage().nbytes() > v.nbytes else v
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if isinstance(obj, str):
            with open(tmp, "w") as f:
                f.write(obj)
        elif hasattr(obj, "save"):
            obj.save(tmp, format="PNG")
        else:
            torch.save({k: compact(v) for k, v in obj.items()} if isinstance(obj, dict) else compact(obj), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError ("unexpected pos")
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cut, free = getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "unexpected pos" in str(e), -1
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        cause = (f"the disk is full: {free:,} bytes free" if cut and 0 <= free < 2 ** 24 else
                 f"the write was cut short with {free:,} bytes free on the disk: a file-size limit?" if cut else why(e))
        raise AdvexError(f"cannot write {path} ({cause})") from None


def remove_stale_temporaries(cfg):
    """Delete the PATH.tmpPID files in OUT, OUT/artifacts and --export's dataset folders that a process which is no
    longer running left behind (killed mid-write); a running process's temporaries are left alone."""
    exported = os.listdir(cfg.export) if cfg.export and os.path.isdir(cfg.export) else []
    for folder in [cfg.out, os.path.join(cfg.out, "artifacts")] + [os.path.join(cfg.export, n) for n in exported]:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            pid = re.search(r"\.tmp(\d+)$", name)
            if pid and not pid_alive(int(pid[1])):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        pass
    return True


def checkpoint(model, r, epochs_done):
    """A trained model as stage() stores it: state_dict, what make_model needs to rebuild it, the epochs it trained."""
    return dict(state_dict=model.state_dict(), arch=r["arch"], width=r["width"], classes=r.get("classes", 10),
                design=r.get("design", {}), pixels=r.get("pixels", Net.pixels), epochs_done=float(epochs_done))


def new_model(r, dev, state=None):
    """A model of recipe r on dev, fresh from the current random stream or with `state`. Channels_last from base
    width 16 up, on every device and precision, where it trained faster on both CPU paths; at width 8 (Fig. 3's
    laptop ResNet-18 and VGG-16) the standard layout was the faster (RESULTS.md, "Memory layout")."""
    model = make_model(r["arch"], r["width"], r.get("classes", 10), *r.get("norm", (CIFAR_MEAN, CIFAR_STD)),
                       r.get("design")).to(dev)
    model.pixels = tuple(r.get("pixels", Net.pixels))
    if r["width"] >= 16:
        model = model.to(memory_format=torch.channels_last)
    if state is not None:
        model.load_state_dict(state)
    for part in {getattr(model, "body", model.head), model.head}:  # LinearNet is all head
        part.register_forward_hook(count_flops)
    return model.eval()


COMPILE = {"cuda": dict(mode="reduce-overhead")}  # --compile: torch.compile's arguments per device type (CUDA graphs)


def maybe_compile(model, x, enabled):
    """--compile: torch.compile the model's body on the device types of COMPILE (the state_dict keys stay as they are:
    only the bound forward is replaced). CUDA graphs (mode 'reduce-overhead') replay each step's hundreds of kernel
    launches as one, the cure for the launch-bound small models (README, Speed; unmeasured: no GPU was lent). A
    forward/backward probe on two of x's images, in eval mode so BatchNorm's statistics are not touched, catches a
    compiler that fails; the model then stays eager."""
    if not (enabled and x.device.type in COMPILE and hasattr(model, "body")):
        return model
    was = model.training
    try:
        model.body.forward = torch.compile(model.body.forward, **COMPILE[x.device.type])
        model.eval()
        probe = to_float(x[:2]).requires_grad_(True)
        torch.autograd.grad(model(probe).float().sum(), probe)
    except Exception as e:
        log(f"advex: torch.compile failed ({why(e)}); running eagerly")
        vars(model.body).pop("forward", None)
    model.train(was)
    return model


def flops_per_image(module, x):
    """2 x the multiply-adds of every conv and linear layer in `module` (what torch's FlopCounterMode counts) for one
    image of x, found by passing x[:1] through it once with a hook on each of those layers."""
    if isinstance(module, nn.Linear):  # a head: no layers inside to hook
        return 2 * module.in_features * module.out_features
    n = [0]

    def leaf(m, inputs, out):
        per_output = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        n[0] += 2 * out.numel() * per_output

    hooks = [m.register_forward_hook(leaf) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = module.training
    module.eval()  # BatchNorm's running statistics stay as they are
    with torch.no_grad():
        type(module).forward(module, x[:1])  # not __call__ (no count_flops) nor a compiled forward (no new shape)
    module.train(was)
    for h in hooks:
        h.remove()
    return n[0]


def count_flops(module, inputs, output):
    """Forward hook on every model's body and head (new_model installs it): one call per pass of a batch, which adds
    the module's FLOPs per image (measured on its first batch) x the batch x 3 for a training step (forward and
    backward), 2 for an attack or inversion step (forward and the input gradient), 1 for a forward pass alone.
    From outside every loop of the science; the stage table divides by each stage's seconds."""
    if not hasattr(module, "flops_per_image"):
        module.flops_per_image = flops_per_image(module, inputs[0])
    FLOPS[0] += (3 if module.training else 2 if torch.is_grad_enabled() else 1) * module.flops_per_image * len(inputs[0])


def fmt_time(s):
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}m" if s < 5400 else f"{s / 3600:.1f}h"


class Progress:
    """Prints `[name] done/total unit, rate/s, ETA` at most every `every` seconds, and at the end."""

    def __init__(self, name, total, unit="img", every=10.0):
        self.name, self.total, self.unit, self.every = name, total, unit, every
        self.t0 = self.last = time.time()

    def __call__(self, done, extra=""):
        now = time.time()
        if now - self.last < self.every and done < self.total:
            return
        self.last, el = now, now - self.t0
        rate = done / max(el, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        log(f"[{self.name}] {done}/{self.total} {self.unit} {rate:,.0f} {self.unit}/s "
            f"elapsed {fmt_time(el)} ETA {fmt_time(eta)}{extra}")


# =====================================================================================================================
# Plan: what a run would cost, before it runs (python advex.py plan EXPERIMENT ... [flags])
# =====================================================================================================================
# The experiments run as written, but the primitives that do the work (train, pgd, over_set, style_transfer) are
# replaced by probes: each runs the real primitive on a slice (one training step at the run's batch size, one attack
# step, one batch of a forward pass, on at most PROBE images), counts its FLOPs with the same hooks as a real run,
# times it, and scales both by the work the call stands for; it returns a placeholder of the right shape. Stages whose
# artifacts exist are read back, as a real run would. Nothing is written but OUT/plan.json.

PLANNING = False   # True while plan() runs the experiments on probes
PLANNED = [0.0, 0.0]  # seconds of the work planned so far: here (measured probes), on one H100 (H100_RATES)
PROBE = 256        # images a probe runs on, at most
_PROBED = {}       # probe key -> (FLOPs, seconds, output) of the slice, measured once per process
_REAL = {}         # the primitives plan() replaces, as they are
# TFLOP/s of advex's counted FLOPs per model type and kind of work, measured on one H200 (report2.txt of the full run,
# ../shared/runs/h200-full-2026-12-04: fresh FastNets 78-82 in training, robust training 68, PGD 125-134, evaluation
# 139, ResNet-18 training 94-160 at batch 512 and 29 at Nakkiran's batch 128, VGG-16 108-119); an H100 has the same
# dense bf16 peak. ResNet-50 (no measurement) is taken as ResNet-18. Tiny models are launch-bound: LAUNCH seconds per
# pass (the linear model's 2 ms a pass on the H200) floor their time; START covers process start, data, cuDNN tuning.
H100_RATES = {("FastNet", "train"): 80, ("FastNet", "adv-train"): 68, ("FastNet", "attack"): 130, ("FastNet", "forward"): 139,
              ("ResNet", "train"): 125, ("ResNet", "adv-train"): 100, ("ResNet", "attack"): 130, ("ResNet", "forward"): 139,
              ("VGG", "train"): 114, ("VGG", "adv-train"): 100, ("VGG", "attack"): 114, ("VGG", "forward"): 139}
LAUNCH, START = 2e-3, 35.0


def _probe(key, model, kind, units, passes, run_slice):
    """Run run_slice() (the real primitive on a slice: one unit of the call's work), or reuse its measurement, and add
    `units` x its FLOPs and seconds to the plan (and its H100 estimate: the FLOPs at H100_RATES, at least
    passes x LAUNCH). Returns the slice's output."""
    global PLANNING
    if key not in _PROBED:
        flops0, PLANNING = FLOPS[0], False  # the real primitives inside, and their hooks' FLOPs, for this slice only
        try:
            for _ in range(2):  # the second run is the one timed: the first pays for oneDNN's / cuDNN's set-up
                t0, f0 = time.time(), FLOPS[0]
                out = run_slice()
                _PROBED[key] = (FLOPS[0] - f0, time.time() - t0, out)
        finally:
            PLANNING, FLOPS[0] = True, flops0
    flops, seconds, out = _PROBED[key]
    rate = H100_RATES.get((type(model).__name__, kind), 29 if kind.endswith("train") else 130) * 1e12
    FLOPS[0] += units * flops
    PLANNED[0] += units * seconds
    PLANNED[1] += max(units * flops / rate, passes * LAUNCH)
    return out


def _shape(model):
    return type(model).__name__, sum(p.numel() for p in model.parameters()), BF16.get(next(model.parameters()).device.type)


def _plan_train(model, x, y, epochs, batch, lr, *args, **kw):
    """train() in a plan: one step at the run's batch size, times the steps the schedule takes (all its epochs: a stop
    rule, as Wallace's teacher's, is not foreseen)."""
    if not PLANNING:  # inside a probe: the real thing
        return _REAL["train"](model, x, y, epochs, batch, lr, *args, **kw)
    a = inspect.signature(_REAL["train"]).bind(model, x, y, epochs, batch, lr, *args, **kw).arguments
    b, steps = min(batch, len(x)), epochs * max(1, len(x) // batch)
    kind = "adv-train" if a.get("adv_eps", 0) > 0 else "train"
    key = ("train", _shape(model), b, tuple(x.shape[1:]), kind, a.get("adv_steps"), a.get("optimizer", "sgd"))
    _probe(key, model, kind, steps, steps * (1 + (a.get("adv_steps", 0) + 1) * (kind == "adv-train")),
           lambda: _REAL["train"](**dict(a, x=x[:b], y=y[:b], epochs=1, batch=b, stop=None)))
    return float(epochs)


def _plan_pgd(model, x, y, eps, steps, *args, **kw):
    """pgd() in a plan: one step on a slice, scaled to every image and step (each step a forward and an input-gradient
    pass, 2 units of a forward; one more forward scores the last iterate). Placeholders: x, no success."""
    if not PLANNING:
        return _REAL["pgd"](model, x, y, eps, steps, *args, **kw)
    a = inspect.signature(_REAL["pgd"]).bind(model, x, y, eps, steps, *args, **kw).arguments
    n, code = min(len(x), a.get("batch", 4096), PROBE), getattr(a.get("objective"), "__qualname__", "ce")
    key = ("pgd", _shape(model), n, tuple(x.shape[1:]), code, id(a.get("objective")))
    _probe(key, model, "attack", len(x) / n * (2 * steps + 1) / 3, math.ceil(len(x) / a.get("batch", 4096)) * (steps + 1),
           lambda: _REAL["pgd"](**dict(a, x=x[:n], y=y[:n], steps=1, name="")))
    return to_float(x).clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)


def _plan_over_set(model, fn, x, batch=4096, amp=True):
    """over_set() in a plan: fn on one slice, scaled to the whole set; a placeholder of fn's output's shape."""
    if not PLANNING:
        return _REAL["over_set"](model, fn, x, batch, amp)
    n = min(len(x), batch, PROBE)
    plain = tuple(c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, (int, float, str)))
    key = ("over_set", _shape(model), n, tuple(x.shape[1:]), fn.__code__, plain, amp)  # plain: e.g. the stage measured
    out = _probe(key, model, "forward", len(x) / n, math.ceil(len(x) / batch),
                 lambda: _REAL["over_set"](model, fn, x[:n], batch, amp))
    return out.new_zeros((len(x),) + out.shape[1:])


def _plan_style_transfer(style_model, content_model, content, style, iters, *args):
    """style_transfer() in a plan: one Adam step, times the iterations; the content as a placeholder."""
    if not PLANNING:
        return _REAL["style_transfer"](style_model, content_model, content, style, iters, *args)
    key = ("style", _shape(style_model), tuple(content.shape), id(style_model))
    _probe(key, style_model, "attack", iters, iters,
           lambda: _REAL["style_transfer"](style_model, content_model, content, style, 1, *args))
    return content.clone()


@contextlib.contextmanager
def planning():
    """The experiments run inside on probes (the primitives replaced by _plan_*), making nothing."""
    global PLANNING
    stubs = dict(train=_plan_train, pgd=_plan_pgd, over_set=_plan_over_set, style_transfer=_plan_style_transfer,
                 log=lambda msg: None, save_atomic=lambda obj, path: None)  # no progress lines, no figures, no files
    _REAL.update({name: globals()[name] for name in stubs})
    globals().update(stubs)
    PLANNING = True
    try:
        yield
    finally:
        PLANNING = False
        globals().update(_REAL)


def plan_table(stages, unstaged, scale, device):
    """The plan as markdown: per stage its TFLOP and predicted seconds here and on one H100, read-back stages apart,
    the work outside stages, and the totals (with START on the H100)."""
    lines = [f"Plan, scale {scale}: predicted seconds here ({device}: probes of this machine's throughput, at most "
             f"{PROBE} images each) and on one H100 (the H200 run's rates; H100_RATES in advex.py). Not foreseen: a "
             f"training's early stop, the read-back of a model trained on predictions (Wallace's students), toy2d.py.", "",
             "| stage | TFLOP | predicted here (s) | predicted H100 (s) |", "|---|---|---|---|"]
    total = [0.0, 0.0, 0.0]
    for s in stages:
        if s["loaded"]:
            lines.append(md_row(f"{s['stage']}: read back from {os.path.basename(s['file'])}", 0, 0, 0))
            continue
        total = [t + v for t, v in zip(total, (s["tflop"], s["here"], s["h100"]))]
        lines.append(md_row(s["stage"], f"{s['tflop']:.3g}", f"{s['here']:.1f}", f"{s['h100']:.1f}"))
    total = [t + v for t, v in zip(total, unstaged)]
    lines.append(md_row("outside the stages (evaluations, records)", f"{unstaged[0]:.3g}", f"{unstaged[1]:.1f}", f"{unstaged[2]:.1f}"))
    lines.append(md_row("total", f"{total[0]:.3g}", f"{total[1]:.1f} ({fmt_time(total[1])})",
                        f"{total[2] + START:.1f} ({fmt_time(total[2] + START)}, with {START:g} s of start-up)"))
    return "\n".join(lines) + "\n"


# =====================================================================================================================
# Results: OUT/results.json (every number, the run settings behind it, stage times and files) and OUT/results.md
# (one scale's table beside the paper's numbers, and a verdict for each claim from one run)
# =====================================================================================================================

RUNS = {}  # run key -> run settings of this process's records; main() adds them to results.json
_PAPER = object()  # record(): look the published number up in PAPER


def run_settings(cfg):
    """The settings of a run that can change its numbers (every Config field but WHERE's) and the code."""
    return dict({k: v for k, v in dataclasses.asdict(cfg).items() if k not in WHERE}, code=CODE)


def make_record(run, seed, arch, experiment, metric, value, paper=None, **settings):
    """One number. Its identity is (experiment, metric, arch, seed, run), run being the key of the settings
    of the run that made it: a rerun with the same settings replaces it, a run with other settings adds a row."""
    RUNS[settings_key(run)] = run
    return dict(experiment=experiment, metric=metric, value=round(float(value), 4), paper=paper, seed=seed,
                arch=arch, scale=run.get("scale", "any"), run=settings_key(run), settings=settings)


def record(cfg, experiment, metric, value, paper=_PAPER, arch=None, **settings):
    """A number of an advex experiment, beside PAPER's (unless given); cfg holds the n_train / n_test used."""
    paper = PAPER.get((experiment, metric)) if paper is _PAPER else paper
    return make_record(run_settings(cfg), cfg.seed, arch or cfg.arch, experiment, metric, value, paper, **settings)


def read_results(out, must_exist=False):
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        if must_exist:
            raise AdvexError(f"{path} not found: no advex results in --out {out}")
        return dict(records=[], runs={}, stages=[], not_run={})
    try:
        with open(path) as f:
            res = json.load(f)
        assert isinstance(res["records"], list) and isinstance(res["runs"], dict) and isinstance(res["stages"], list)
        assert all({"experiment", "metric", "value", "seed", "arch", "run", "scale", "settings"} <= set(r) and
                   isinstance(r["value"], (int, float)) and isinstance(r["settings"], dict) for r in res["records"])
        assert all(isinstance(s, dict) and {"stage", "seconds", "tflop", "loaded", "time"} <= set(s) for s in res["stages"])
        assert isinstance(res.setdefault("not_run", {}), dict) and all(isinstance(v, dict) for v in res["not_run"].values())
    except Exception:
        raise AdvexError(f"{path} is not an advex results file (unreadable, or written by another version); "
                         f"move it away or choose another --out") from None
    return res


def latest_scale(res):
    return next((r["scale"] for r in reversed(res["records"]) if r["scale"] != "any"), "any")


def write_results(out, records, runs, stages=(), scale=None, not_run=None):
    """Merge records (and the settings of their runs, and stage times) into OUT/results.json; rewrite results.md
    for `scale` (default: the latest run's). not_run: {experiment: why it could not run, or None: it ran} at `scale`.
    Under a lock on OUT/results.json.lock, so processes writing to one --out at once all keep their records."""
    import fcntl  # POSIX
    with open(os.path.join(out, "results.json.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        res = read_results(out)
        ident = lambda r: (r["experiment"], r["metric"], r["arch"], r["seed"], r["run"])
        new = {ident(r) for r in records}
        res["records"] = [r for r in res["records"] if ident(r) not in new] + list(records)
        res["runs"].update(runs)
        res["stages"] += list(stages)
        res.setdefault("data", {}).update(PROVENANCE)
        for experiment, why in (not_run or {}).items():
            res["not_run"].setdefault(scale, {})[experiment] = why
            if why is None:
                del res["not_run"][scale][experiment]
        save_atomic(json.dumps(res, indent=1), os.path.join(out, "results.json"))
        table = results_table(res, scale or latest_scale(res))
        save_atomic(table, os.path.join(out, "results.md"))
    return table


def groups(records):
    """Records grouped by (experiment, metric, arch, run), in order of each group's latest record: one group
    holds the seeds of one setting, never numbers made with different settings."""
    g = {}
    for r in records:
        k = (r["experiment"], r["metric"], r["arch"], r["run"])
        g[k] = g.pop(k, []) + [r]
    return g


def mean_std(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def results_table(res, scale):
    records = [r for r in res["records"] if r["scale"] in (scale, "any")]
    others = sorted({r["scale"] for r in res["records"]} - {scale, "any"})
    lines = [f"# advex results: scale {scale}", ""]
    if scale == "quick":
        lines += ["**Quick scale: tiny sizes that test the code path. These numbers mean nothing about the papers' "
                  "claims; the verdicts below are not results.**", ""]
    lines += [f"Data (the latest run's): {name}, {copy}." for name, copy in res["data"].items()] + [""] if res.get("data") else []
    lines += ["Mean ± std over seeds (n). One row per experiment, metric, architecture and run settings (the `run` "
              "column; what each run changed from the full-size defaults is listed below the table)." +
              (f" results.json also holds scale {', '.join(others)} (`advex.py report --scale S`)." if others else ""),
              "", "| experiment | metric | arch | run | ours | n | paper | settings |", "|---|---|---|---|---|---|---|---|"]
    g = groups(records)
    for (exp, metric, arch, run), rs in g.items():
        m, s = mean_std([r["value"] for r in rs])
        ours = f"{m:.2f}" + (f" ± {s:.2f}" if len(rs) > 1 else "")
        paper = "" if rs[-1]["paper"] is None else f"{rs[-1]['paper']:g}"
        sets = ", ".join(f"{k} {v}" for k, v in rs[-1]["settings"].items())
        lines.append(md_row(exp, metric, arch, run, ours, len(rs), paper, sets))
    lines += ["", "| run | scale | settings that differ from the full-size defaults |", "|---|---|---|"]
    defaults = run_settings(Config())
    for run in dict.fromkeys(k[3] for k in g):
        s = res["runs"].get(run, {})
        diff = ", ".join(f"{k} {v}" for k, v in s.items() if k != "scale" and defaults.get(k, None) != v)
        lines.append(md_row(run, s.get("scale", ""), diff or "none"))
    not_run = res["not_run"].get(scale, {})
    if not_run:
        lines += ["", "## Not run", "", "Experiments that could not run here, at their latest attempt at this scale:", ""]
        lines += [f"- `{e}`: {why}" for e, why in not_run.items()]
    lines += ["", "## Claims", "", f"Each claim of the paper and the responses, its kind, its criterion, our values (mean "
              f"over seeds) from one run of scale {scale} (the latest that has any of them) and the verdict. MIXED: that "
              f"run lacks some of the values, which only other runs have; NOT RUN: no run of this scale has them, or a "
              f"relative claim's run lacks its baseline. Kinds: absolute (a bar that means the same at every scale), "
              f"relative (ours over this run's baseline >= {REL:g} x the paper's ratio over its own), comparison (two of "
              f"this run's numbers, apart by more than {Z:g} standard errors). In parentheses: the ratio or the margin "
              f"each verdict rests on; standard errors are binomial at the number of images, or paired over images "
              f"where the experiment records one.", "",
              "| claim | kind | criterion | ours | verdict | run |", "|---|---|---|---|---|---|"]
    lines += [md_row(*row) for row in check_claims(records, not_run)]
    return "\n".join(lines) + "\n"


def md_row(*cells):
    """One row of a markdown table; a | inside a cell (max|k|) is escaped so it does not split the cell."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def spearman(a, b):
    """Spearman rank correlation of two equal-length lists, with average ranks for ties; nan if a value is not finite."""
    a, b = (torch.tensor(v, dtype=torch.float64) for v in (a, b))
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    ranks = lambda v: torch.stack([(v < u).sum() + ((v == u).sum() - 1) / 2 for u in v]).double()
    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    return (ra * rb).sum().item() / max(1e-12, (ra.norm() * rb.norm()).item())


# The claims: one row per claim of the paper and the responses. Each is of one of three kinds (issue 34):
#   absolute:   a bar in percent or pixels that means the same at every scale (below chance: "not robust"; Goh's 80%);
#   relative:   the paper's own statement is relative to its baseline (D_R's 84.1% against a standard 95.3%): ours, over
#               this run's baseline (the last value a row needs), must reach REL x the paper's ratio, PAPER's numbers;
#   comparison: two of this run's numbers, ordered, by more than Z standard errors of their difference.
# Besides the papers' numbers (PAPER) and chance (a tenth, or half for a two-way label), these are the only constants
# in CLAIMS, each named once:
CHANCE = 10.0    # %: ten classes (CIFAR-10, MNIST)
REL = 0.75       # relative claims: at least 3/4 of the paper's ratio
Z = 3.0          # standard errors: a difference, or a margin over chance, within them is noise, not a HOLDS
NULL_Q = 0.99    # Goh's ensemble: above this quantile of its permutation null
FLAT = 10.0      # %: a high-pass filter keeping at most this share of the non-DC energy leaves images flat grey


def se(p, n):
    """The binomial standard error, in points, of a percentage p measured on n images, at Agresti and Coull's estimate
    (k + 2) / (n + 4) of the rate, so that 0% and 100% have one too (over n, not n + 4: on the safe side)."""
    q = (p / 100 * n + 2) / (n + 4)
    return 100 * math.sqrt(q * (1 - q) / n)


def beyond(a, b, s, what):
    """a above b by more than Z standard errors s of their difference: (bool, 'WHAT a - b (Z SE)')."""
    return a - b > Z * s, f"{what}{a - b:+.3g} ({Z:g} SE {Z * s:.3g})"


def above_chance(a, n, what=""):
    """a, a percentage of n images, above chance by more than Z standard errors (something was learnt)."""
    bar = CHANCE + Z * se(CHANCE, n)
    return a > bar, f"{what}{a:.3g} > chance + {Z:g} SE {bar:.3g}"


def within_chance(a, n, what=""):
    """a below chance + Z standard errors: no evidence that anything was learnt."""
    bar = CHANCE + Z * se(CHANCE, n)
    return a < bar, f"{what}{a:.3g} < chance + {Z:g} SE {bar:.3g}"


def relative(num, base):
    """A relative criterion: ours = value / this run's baseline, against REL x PAPER[num] / PAPER[base]."""
    bar = REL * PAPER[num] / PAPER[base]
    return lambda v, b: ((v / b >= bar, f"{num[0]} ratio {v / b:.3g} vs {REL:g} x {PAPER[num]:g}/{PAPER[base]:g} = {bar:.3g}")
                         if b > 0 else (False, f"{base[0]}'s baseline is {b:g}: no ratio (nothing was learnt to keep)"))


def judged(*parts):
    """Several (bool, note) criteria: all must hold."""
    return all(ok for ok, _ in parts), "; ".join(note for _, note in parts if note)


def within_noise_ties(values, ses):
    """values tied where they are within noise: in sorted order, each value within Z standard errors of the smallest
    of its group joins the group (no chains of small steps), and every group's values are replaced by their mean."""
    order, out = sorted(range(len(values)), key=values.__getitem__), list(values)
    groups = [[order[0]]]
    for j in order[1:]:
        first = groups[-1][0]
        if values[j] - values[first] <= Z * math.hypot(ses[first], ses[j]):
            groups[-1].append(j)
        else:
            groups.append([j])
    for g in groups:
        for k in g:
            out[k] = sum(values[i] for i in g) / len(g)
    return out


def _fig3(transfer, acc, n_test, n_images):
    """Ilyas Fig. 3 over the architectures that have both numbers, numbers within noise tied; None if < 3."""
    archs = sorted(set(transfer) & set(acc)) if isinstance(transfer, dict) and isinstance(acc, dict) else []
    if len(archs) < 3:
        return None, "fewer than 3 architectures"
    tr = within_noise_ties([transfer[a] for a in archs], [se(transfer[a], n_images) for a in archs])
    ac = within_noise_ties([acc[a] for a in archs], [se(acc[a], n_test) for a in archs])
    rho, bar = spearman(tr, ac), REL * PAPER_FIG3
    ties = [f"{what} tie within {Z:g} SE: {', '.join(a for a, u in zip(archs, v) if v.count(u) > 1)}" for what, v in
            (("transfer", tr), ("accuracy", ac)) if len(set(v)) < len(v)]
    return rho >= bar, f"Spearman {rho:.3g} vs {REL:g} x the paper's {PAPER_FIG3:g}" + "".join(f"; {t}" for t in ties)


def _nakkiran(his2, pgd2, hisi, pgdi, n, low):
    """Nakkiran's two claims: his examples below chance (transfer) or within noise of it (learnt), plain PGD's above."""
    lows = [(h < CHANCE, f"his {h:.3g} < {CHANCE:g}") if low == "chance" else within_chance(h, n, "his ") for h in (his2, hisi)]
    return judged(*lows, *(above_chance(p, n, "plain PGD ") for p in (pgd2, pgdi)))


S, B, F_, L_, S_ = "standard", "bugs {} {}", "frequency", "linear-features", "style"
ACC, R7, N = "standard acc", "robust acc L2 0.25, 7 steps of eps/5", "test images"
PAPER_FIG3 = spearman(*[[PAPER[("transfer", m, a)] for a in ("vgg16", "resnet18", "resnet50")]
                        for m in ("transfer rate", "D_det-trained test acc")])
BUGS = [B.format(n, m) for n in ("l2", "linf") for m in ("bugs", "pgd")]  # his L2, plain L2, his Linf, plain Linf
# (claim, kind, criterion, the (experiment, metric) values it needs, test(*values) -> bool or (bool or None, note)).
# A value is the mean over seeds of one run; a metric recorded for several architectures gives {arch: value}. A
# relative claim's last value is its baseline: where this run lacks it, the claim is NOT RUN. test_advex.py holds
# each row's cases just inside and outside its bounds: a new row needs its own.
CLAIMS = [
    ("Ilyas: a standard model is not robust", "absolute",
     f"robust acc under the paper's attack (7 steps of eps/5) < chance ({CHANCE:g}); clean acc > chance + {Z:g} SE",
     [(S, R7), (S, ACC), (S, N)], lambda r, a, n: judged((r < CHANCE, ""), above_chance(a, n, "clean "))),
    ("Ilyas: adversarial training makes a robust model", "relative",
     "the robust model's robust acc / the standard model's clean acc",
     [("robust", RA), (S, ACC)], relative(("robust", RA), (S, ACC))),
    ("Ilyas 3.1: non-robust features alone give no robustness", "absolute", f"D_NR robust acc < chance ({CHANCE:g})",
     [("d_nr", RA)], lambda r: r < CHANCE),
    ("Ilyas 3.1: robust features alone give robustness", "relative", "D_R's robust acc / the robust model's",
     [("d_r", RA), ("robust", RA)], relative(("d_r", RA), ("robust", RA))),
    ("Ilyas 3.1: D_R and D_NR both generalise to the real test set", "relative",
     "D_R's and D_NR's clean acc / the standard model's", [("d_r", ACC), ("d_nr", ACC), (S, ACC)],
     lambda r, nr, b: judged(relative(("d_r", ACC), (S, ACC))(r, b), relative(("d_nr", ACC), (S, ACC))(nr, b))),
    ("Ilyas 3.2: non-robust features alone generalise: D_rand", "relative", "D_rand's acc / the standard model's",
     [("d_rand", ACC), (S, ACC)], relative(("d_rand", ACC), (S, ACC))),
    ("Ilyas 3.2: non-robust features alone generalise: D_det", "relative", "D_det's acc / the standard model's",
     [("d_det", ACC), (S, ACC)], relative(("d_det", ACC), (S, ACC))),
    ("Ilyas 3.2: D_det is learnt from t's non-robust features", "comparison",
     f"D_det acc above chance, above the shortcut control's (its perturbations replaced by a fixed pattern per class) "
     f"and above its own acc on the shifted labels y+1, each by {Z:g} SE",
     [("d_det", ACC), ("d_shortcut", ACC), ("d_det", "test acc on shifted labels y+1"), ("d_det", N)],
     lambda d, c, sh, n: judged(above_chance(d, n), beyond(d, c, math.hypot(se(d, n), se(c, n)), "- control "),
                                beyond(d, sh, math.hypot(se(d, n), se(sh, n)), "- shifted "))),
    ("Ilyas 3.2: D_rand is learnt better than D_det", "comparison", f"D_rand acc - D_det acc > {Z:g} SE",
     [("d_rand", ACC), ("d_det", ACC), ("d_det", N)], lambda r, d, n: beyond(r, d, math.hypot(se(r, n), se(d, n)), "")),
    ("Ilyas Fig. 3: models learn more from D_det where its examples transfer", "comparison",
     f"Spearman(transfer rate, D_det acc) over >= 3 architectures, numbers within {Z:g} SE tied, >= {REL:g} x the "
     f"paper's", [("transfer", "transfer rate"), ("transfer", "D_det-trained test acc"), ("transfer", N),
                  ("transfer", "D_det images")], _fig3),
    ("Wallace: a model learns from a teacher's errors alone", "absolute", f"student test acc > chance + {Z:g} SE",
     [("mislabeled", "student test acc"), ("mislabeled", N)], above_chance),
    ("Wallace: an MNIST teacher's labels on Fashion images teach MNIST", "relative",
     "each student's MNIST acc (both normalisations) / the teacher's",
     [("mnist-fashion", f"student MNIST test acc ({v} stats)") for v in ("own", "mnist")] +
     [("mnist-fashion", "teacher MNIST test acc")],
     lambda a, b, t: judged(*(relative(("mnist-fashion", f"student MNIST test acc ({v} stats)"),
                                       ("mnist-fashion", "teacher MNIST test acc"))(u, t) for u, v in ((a, "own"), (b, "mnist"))))),
    ("Wallace: the 2D toy learns from flipped points alone", "absolute",
     "median over seeds > 16 of 32 original points right (chance: half)",
     [("toy2d", "model 2: original points right, median")], lambda m: m > 32 / 2),
    ("Nakkiran: his examples do not transfer; plain PGD's do", "absolute",
     f"transfer to a fresh model (L2 and Linf): his < chance; plain PGD's > chance + {Z:g} SE",
     [(e, "transfer to fresh model") for e in BUGS] + [("bugs", "attacked images")],
     lambda *v: _nakkiran(*v, low="chance")),
    ("Nakkiran: a model trained on his examples learns nothing of the true labels; plain PGD's does", "absolute",
     f"true-label test acc (L2 and Linf): his < chance + {Z:g} SE; plain PGD's > chance + {Z:g} SE",
     [(e, "trained-on: test acc, true labels") for e in BUGS] + [("bugs", N)], lambda *v: _nakkiran(*v, low="noise")),
    ("Nakkiran: on adversarial squares, where every useful feature is robust, a memorising net is not robust",
     "comparison", f"memorising net flipped at Linf 0.01 on most test points (> 50%), more than the same run after 1 "
     f"epoch by {Z:g} SE", [("squares", "net memorising: flipped by Linf 0.01"), ("squares", "net 1 epoch: flipped by "
                                                                                 "Linf 0.01"), ("squares", "test points")],
     lambda net, first, n: judged((net > 100 / 2, ""), beyond(net, first, math.hypot(se(net, n), se(first, n)), ""))),
    ("Goh: his features are robustly useful (Spec 1) and stable (Spec 2)", "absolute",
     f"all 10 linear features robustly useful (gamma >= 0) for some class at L2 0.25; >= "
     f"{PAPER[('leakage', 'robust linear: stable predictions L2 0.25')]:g}% of predictions certified stable",
     [("leakage", "robust linear: features robustly useful at L2 0.25 (of 10)"),
      ("leakage", "robust linear: stable predictions L2 0.25")],
     lambda k, s: k == 10 and s >= PAPER[("leakage", "robust linear: stable predictions L2 0.25")]),
    ("Goh: robust features leak into D_rand, not into D_det", "absolute",
     f"linear on robust features: D_rand acc > chance + {Z:g} SE; D_det acc < chance + {Z:g} SE",
     [("leakage", "linear on features, trained on d_rand"), ("leakage", "linear on features, trained on d_det"),
      ("leakage", N)], lambda r, d, n: judged(above_chance(r, n, "D_rand "), within_chance(d, n, "D_det "))),
    ("Gilmer & Hendrycks: a model trained and tested on high-pass images generalises", "absolute",
     f"high-pass test acc > chance + {Z:g} SE while the filter keeps <= {FLAT:g}% of the non-DC energy",
     [(F_, "high-pass: test acc (filtered test set)"), (F_, "high-pass: share of non-DC energy kept (%)"), (F_, N)],
     lambda acc, kept, n: judged(above_chance(acc, n), (kept <= FLAT, ""))),
    ("Gilmer & Hendrycks (Yin et al.): adversarial training trades high-frequency robustness for low-frequency fragility",
     "comparison", f"Fourier heat map, excess error (over clean), robust - standard, mean over max|k| >= --freq-high: "
     f"< -{Z:g} SE; over max|k| <= --freq-low: > {Z:g} SE (SE paired over the heat map's images)",
     [(F_, f"heat map excess error, robust - standard, {b} frequencies{s}") for b in ("high", "low") for s in ("", ": SE")],
     lambda hi, hi_se, lo, lo_se: judged(beyond(0, hi, hi_se, "high, standard - robust "),
                                         beyond(lo, 0, lo_se, "low, robust - standard "))),
    ("Gilmer & Hendrycks: adversarial training costs robustness to fog and contrast, gains it against noise",
     "comparison", f"accuracy retained (corrupted / clean, mean over severities 1-5), robust - standard: < -{Z:g} SE "
     f"under fog and contrast, > {Z:g} SE under noise", [(F_, f"accuracy retained, robust - standard, {c}{s}")
                                                         for c in ("fog", "contrast", "noise") for s in ("", ": SE")],
     lambda f, fs, c, cs, n, ns: judged(beyond(0, f, fs, "fog, standard - robust "),
                                        beyond(0, c, cs, "contrast, standard - robust "),
                                        beyond(n, 0, ns, "noise, robust - standard "))),
    ("Goh: the useful linear features are the robust ones", "absolute",
     f"Spearman(log robustness, test usefulness) over the eigenvectors up to a cut chosen on the training images (signs "
     f"chosen on training images) > {Z:g} SE (1/sqrt(n - 1))",
     [(L_, "eigenvectors up to the cut: Spearman(log robustness, test usefulness)"), (L_, "eigenvectors up to the cut")],
     lambda rho, n: beyond(rho, 0, 1 / math.sqrt(n - 1), "rho ") if n >= 3 else (None, "fewer than 3 directions")),
    ("Goh: a sum of non-robust directions is a useful, non-robust feature", "absolute",
     f"ensemble usefulness on test images (signs chosen on training images) > the {NULL_Q:g} quantile of a permutation "
     f"null (the training labels shuffled, the signs chosen again, each draw); p printed",
     [(L_, "ensemble: usefulness on test images"), (L_, f"shuffled-label null: test usefulness, {100 * NULL_Q:g}th percentile"),
      (L_, "ensemble: p-value against the shuffled-label null")], lambda u, q, p: u > q),
    ("Nakano (the authors' reply): a robust model's layers are more robust", "comparison",
     f"R(f) standard - robust > {Z:g} SE at every stage and radius (SE over the images)",
     [(S_, "R(f) standard - robust, smallest over stages and radii, in SE")], lambda z: (z > Z, f"{z:.3g} SE vs {Z:g}")),
    ("Nakano: style transfer works with a robust model's Gram matrices, less with a standard one's", "comparison",
     f"an untrained network's Gram distance to the style image (output / content, mean over its stages), standard's "
     f"output - robust's > {Z:g} SE (paired over the content images)",
     [(S_, "standard style: judge's style distance, output / content"),
      (S_, "robust style: judge's style distance, output / content"), (S_, "judge's style distance, standard - robust: SE")],
     lambda std, rob, s: beyond(std, rob, s, "")),
]


def check_claims(records, not_run=None):
    """[(claim, kind, criterion, our values, HOLDS | FAILS | MIXED | NOT RUN, run)], each claim from the latest run (of
    the records given: one scale) that has any of its values. not_run: {experiment: why it could not run}, said in the
    row of a claim that no run has values for. A relative claim whose run lacks its baseline is NOT RUN."""
    order, table = {}, {}
    for i, r in enumerate(records):
        order[r["run"]] = i
        table.setdefault((r["experiment"], r["metric"]), {}).setdefault(r["run"], {}).setdefault(r["arch"], []).append(r["value"])
    num = lambda u: f"{u:.0f}" if abs(u) >= 1000 else f"{u:.3g}"  # counts (test images, eigenvectors) in full
    show = lambda v: " ".join(f"{a} {num(u)}" for a, u in v.items()) if isinstance(v, dict) else num(v)
    rows = []
    for claim, kind, criterion, needs, test in CLAIMS:
        runs = {run for n in needs for run in table.get(n, {})}
        if not runs:
            why = [f"{e}: {w}" for e, w in (not_run or {}).items() if any(n == e or n.startswith(e + " ") or
                                                                        e == "ilyas" and n in SEC3_RECORDS for n, _ in needs)]
            rows.append((claim, kind, criterion, "; ".join(dict.fromkeys(why)), "NOT RUN", ""))
            continue
        run = max(runs, key=order.get)
        missing = [f"{n} {m}" for n, m in needs if run not in table.get((n, m), {})]
        if kind == "relative" and run not in table.get(needs[-1], {}):
            rows.append((claim, kind, criterion, f"no baseline in this run: {' '.join(needs[-1])} (run `{needs[-1][0]}` "
                         f"with the same settings)", "NOT RUN", run))
            continue
        if missing:
            other = all(table.get(n) for n in needs)
            rows.append((claim, kind, criterion, f"this run lacks: {'; '.join(missing)}", "MIXED" if other else "NOT RUN", run))
            continue
        values = []
        for n in needs:
            by_arch = {a: mean_std(v)[0] for a, v in table[n][run].items()}
            values.append(next(iter(by_arch.values())) if len(by_arch) == 1 else by_arch)
        flat = [u for v in values for u in (v.values() if isinstance(v, dict) else [v])]
        ours = ", ".join(show(v) for v in values)
        if not all(math.isfinite(u) for u in flat):
            rows.append((claim, kind, criterion, ours + " (a value is not finite)", "FAILS", run))
            continue
        verdict, note = (lambda v: v if isinstance(v, tuple) else (v, ""))(test(*values))
        rows.append((claim, kind, criterion, ours + (f" ({note})" if note else ""),
                     "NOT RUN" if verdict is None else "HOLDS" if verdict else "FAILS", run))
    return rows


def stage_table(stages, wall=None, planned=None):
    """Where the time went: one row per stage (those read from disk summed into one row each), its share of the
    total, its TFLOP and throughput, and `plan`'s prediction for it (planned: OUT/plan.json, made on this device or
    else its H100 column). wall: the whole run's wall time; what the stages do not cover (process start-up, data
    loading, small steps) gets a row."""
    rows, predicted = {}, {}
    machine = lambda d: d.split(" (")[0]  # 'cpu (2 threads)' -> 'cpu': a plan's thread count may differ from the run's
    here = bool(planned and stages) and machine(planned["device"]) == machine(stages[0].get("device", ""))
    for s in (planned or {}).get("stages", []):
        if not s["loaded"]:
            predicted[s["stage"]] = predicted.get(s["stage"], 0.0) + s["here" if here else "h100"]
    for s in stages:
        r = rows.setdefault((s["stage"], s["loaded"]), dict(s, seconds=0.0, tflop=0.0, n=0))
        r["seconds"] += s["seconds"]
        r["tflop"] += s["tflop"]
        r["n"] += 1
    covered = sum(r["seconds"] for r in rows.values())
    total = max(wall or 0.0, covered) or 1e-9
    lines = [f"| stage | device | seconds | share | TFLOP | TFLOP/s | planned {'here' if here else 'on one H100'} (s) |",
             "|---|---|---|---|---|---|---|"]
    share = lambda s: (f"{s:.1f}", f"{100 * s / total:.1f}%")  # seconds, share of the total
    for (name, loaded), r in rows.items():
        plan_s = "" if loaded or name not in predicted else f"{predicted[name]:.1f}"
        name = f"{name}: read from disk" + (f" x{r['n']}" if r["n"] > 1 else "") if loaded else name
        lines.append(md_row(name, r.get("device", ""), *share(r["seconds"]), f"{r['tflop']:.2f}",
                            f"{r['tflop'] / max(r['seconds'], 1e-9):.2f}", plan_s))
    if wall:
        lines.append(md_row("other: start-up, data loading, small steps", "", *share(total - covered), "", "", ""))
    lines.append(md_row("total", "", *share(total), f"{sum(r['tflop'] for r in rows.values()):.2f}", "",
                        f"{sum(predicted.values()):.1f}" if predicted else ""))
    return "\n".join(lines) + "\n"


# =====================================================================================================================
# Figures: PNG with Pillow (torchvision's dependency), titled with the experiment, scale and seed
# =====================================================================================================================

BLUE, LIGHT_BLUE, ORANGE, LIGHT_ORANGE, GREY = (33, 113, 181), (158, 202, 225), (230, 85, 13), (253, 174, 107), (90, 90, 90)


@functools.cache
def font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def text_width(s, size=14):
    return font(size).getlength(s)


def canvas(width, height, title, note=""):
    """A white image, wide enough for its title and note; returns (image, draw, y where the content starts)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (int(max(width, text_width(title, 20) + 30, text_width(note) + 30)), int(height)), "white")
    d = ImageDraw.Draw(im)
    d.text((12, 8), title, fill="black", font=font(20))
    d.text((12, 36), note, fill=GREY, font=font(14))
    return im, d, 62 if note else 40


def legend(d, x, y, items):
    """Coloured squares with labels, one per line, from (x, y)."""
    for k, (label, colour) in enumerate(items):
        d.rectangle([x, y + 20 * k + 3, x + 12, y + 20 * k + 15], fill=colour)
        d.text((x + 18, y + 20 * k), label, fill="black", font=font(14))


def grid(path, title, rows, row_names, col_names, scale=3, note="", bars=()):
    """PNG of image rows (each (n, C, H, W) in [0,1]) with row names on the left and column names (one or two lines,
    split at a newline) on top of each column. bars: per column, None or (lo, hi, unit, diverging): a colour bar under
    it, colormap's colours from lo to hi, with numbers."""
    from PIL import Image
    n, (_, H, W) = len(rows[0]), rows[0].shape[1:]
    cell = max([W * scale] + [text_width(part) for c in col_names for part in str(c).split("\n")]) + 8
    left, head = max(text_width(r) for r in row_names) + 20, 2 + 18 * max(len(str(c).split("\n")) for c in col_names)
    im, d, top = canvas(left + n * cell + 10, 0, title, note)
    bottom = top + head + len(rows) * (H * scale + 8)
    im, d, top = canvas(im.width, bottom + (40 if any(bars) else 0) + 10, title, note)
    for j, bar in enumerate(bars):
        if bar:
            (lo, hi, unit, diverging), x0 = bar, int(left + j * cell + (cell - W * scale) / 2)
            ramp = torch.linspace(-1 if diverging else 0, 1, W * scale)[None].expand(12, -1)
            im.paste(Image.fromarray(colormap(ramp, diverging).mul(255).round().byte().permute(1, 2, 0).numpy()), (x0, bottom))
            for frac, v in ((0, lo), (0.5, (lo + hi) / 2), (1, hi)):
                label = f"{v:+g}{unit}" if diverging and v else f"{v:g}{unit}"
                d.text((x0 + frac * W * scale - frac * text_width(label, 13), bottom + 15), label, fill="black", font=font(13))
    for j, c in enumerate(col_names):
        for k, part in enumerate(str(c).split("\n")):
            d.text((left + j * cell + (cell - text_width(part)) / 2, top + 18 * k), part, fill="black", font=font(14))
    for i, (r, name) in enumerate(zip(rows, row_names)):
        y0 = top + head + i * (H * scale + 8)
        d.text((10, y0 + H * scale / 2 - 8), name, fill="black", font=font(14))
        for j, img in enumerate(r.float().cpu().clamp(0, 1)):
            tile = Image.fromarray(img.expand(3, H, W).mul(255).round().byte().permute(1, 2, 0).numpy())
            im.paste(tile.resize((W * scale, H * scale), Image.NEAREST), (int(left + j * cell + (cell - W * scale) / 2), y0))
    save_atomic(im, path)


def ticks(a, b, log=False):
    """Round tick values within [a, b] (log: the powers of ten; else steps of 1, 2 or 5 times a power of ten)."""
    if log:
        return [10.0 ** k for k in range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1)]
    step = 10 ** math.floor(math.log10((b - a) / 5 or 1))
    step *= next(m for m in (1, 2, 5, 10) if (b - a) / (step * m) <= 6)
    return [k * step for k in range(math.ceil(a / step - 1e-9), math.floor(b / step + 1e-9) + 1)]


def bars(path, title, ylabel, groups, series, note=""):
    """Grouped bar chart on 0..100: groups (names on the x axis), series [(label, colour, [value or None per group])]."""
    gw, bw = max(40 + 34 * len(series), max(text_width(g) for g in groups) + 20), 30
    im, d, top = canvas(140 + len(groups) * gw + max(text_width(s[0]) for s in series), 480, title, note)
    x0, y0, h = 80, top + 20, 330  # plot area: x0.., y0..y0 + h
    to_y = lambda v: y0 + h - v / 100 * h
    for v in range(0, 101, 20):
        d.line([x0, to_y(v), x0 + len(groups) * gw, to_y(v)], fill=(225, 225, 225))
        d.text((x0 - 36, to_y(v) - 8), f"{v}", fill="black", font=font(13))
    d.text((8, y0 - 18), ylabel, fill="black", font=font(14))
    for g, name in enumerate(groups):
        for k, (label, colour, values) in enumerate(series):
            v, x = values[g], x0 + g * gw + (gw - 34 * len(series)) / 2 + k * 34
            if v is None:
                d.text((x + 2, to_y(0) - 18), "n/a", fill=GREY, font=font(13))
                continue
            d.rectangle([x, to_y(v), x + bw, to_y(0)], fill=colour)
            d.text((x + bw / 2 - text_width(f"{v:.0f}", 13) / 2, to_y(v) - 17), f"{v:.0f}", fill="black", font=font(13))
        d.text((x0 + g * gw + gw / 2 - text_width(name) / 2, y0 + h + 8), name, fill="black", font=font(14))
    d.line([x0, y0 + h, x0 + len(groups) * gw, y0 + h], fill="black")
    legend(d, x0 + len(groups) * gw + 20, y0, [(label, colour) for label, colour, _ in series])
    save_atomic(im, path)


def plot(path, title, xlabel, ylabel, series, xlog=False, note="", xlim=None, ylim=None):
    """Scatter / line plot. series: [dict(label, colour, points [(x, y)], line (bool), size, names (a label per point))];
    xlog: log10 x axis. Point labels are nudged down until they do not overlap."""
    series = [dict(s, points=[p for p in s["points"] if all(map(math.isfinite, p))]) for s in series]  # no nan / inf
    tx = (lambda v: math.log10(max(v, 1e-300))) if xlog else (lambda v: v)
    pts = [(tx(u), v) for s in series for u, v in s["points"]]
    pad = lambda a, b: (a - 0.05 * (b - a or 1), b + 0.05 * (b - a or 1))
    (xa, xb) = (tx(xlim[0]), tx(xlim[1])) if xlim else pad(min(p[0] for p in pts), max(p[0] for p in pts))
    (ya, yb) = ylim or pad(min(p[1] for p in pts), max(p[1] for p in pts))
    x0, w, h = 90, 560, 480
    im, d, top = canvas(x0 + w + 70 + max(text_width(s["label"]) for s in series), h + 150, title, note)
    y0 = top + 20
    to = lambda u, v: (x0 + (tx(u) - xa) / (xb - xa) * w, y0 + h - (v - ya) / (yb - ya) * h)
    d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
    for u in ticks(xa, xb, xlog):
        px = to(u, ya)[0]
        d.line([px, y0 + h, px, y0 + h + 5], fill="black")
        d.text((px - text_width(f"{u:g}", 13) / 2, y0 + h + 8), f"{u:g}", fill="black", font=font(13))
    for v in ticks(ya, yb):
        py = to(10 ** xa if xlog else xa, v)[1]
        d.line([x0 - 5, py, x0, py], fill="black")
        d.text((x0 - 10 - text_width(f"{v:g}", 13), py - 8), f"{v:g}", fill="black", font=font(13))
    d.text((x0 + w / 2 - text_width(xlabel, 15) / 2, y0 + h + 30), xlabel, fill="black", font=font(15))
    d.text((8, y0 - 22), ylabel, fill="black", font=font(15))
    taken = []
    for s in series:
        xy = [to(*p) for p in s["points"]]
        if s.get("line") and len(xy) > 1:
            d.line(xy, fill=s["colour"], width=3)
        for k, (a, b) in enumerate(xy):
            r = s.get("size", 4)
            d.ellipse([a - r, b - r, a + r, b + r], fill=s["colour"])
            if s.get("names"):
                label = s["names"][k]
                x, y = (a + 8, b - 8) if a + 8 + text_width(label, 13) < x0 + w else (a - 8 - text_width(label, 13), b - 8)
                while any(abs(y - ty) < 16 and x < tx_ + tw and tx_ < x + text_width(label, 13) for tx_, ty, tw in taken):
                    y += 16
                taken.append((x, y, text_width(label, 13)))
                if y > b:  # nudged away from its dot: a leader line from the dot to the label's near end
                    d.line([a, b, x if x > a else x + text_width(label, 13), y + 8], fill=GREY)
                d.text((x, y), label, fill="black", font=font(13))
    legend(d, x0 + w + 20, y0, [(s["label"], s["colour"]) for s in series])
    save_atomic(im, path)


VIRIDIS = torch.tensor([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]) / 255.0


def colormap(v, diverging=False):
    """(H, W) values in [0,1] (diverging: [-1,1]) -> (3, H, W) RGB in [0,1]: viridis-like dark blue -> green -> yellow,
    or blue -> white -> red."""
    if diverging:
        p, n = v.clamp(0, 1), (-v).clamp(0, 1)
        return torch.stack([1 - n, 1 - p - n, 1 - p])
    t = v.clamp(0, 1) * (len(VIRIDIS) - 1)
    k = t.floor().long().clamp(max=len(VIRIDIS) - 2)
    return (VIRIDIS[k] + (t - k)[..., None] * (VIRIDIS[k + 1] - VIRIDIS[k])).permute(2, 0, 1)


def source_names(cfg):
    """Sec. 3's models, in words."""
    std = (os.path.basename(cfg.standard_from) if cfg.standard_from else
           f"{cfg.std_arch}-{cfg.width}, {cfg.std_epochs} epochs")
    return f"standard source {std}; robust source and fresh models {cfg.arch}-{cfg.width}"


def tag(cfg):
    return f"scale {cfg.scale}, seed {cfg.seed}"


def dataset_grid(cfg, name, data, ds, n=10):
    """PNG: original x, start x0 (inversions only), constructed image; columns named by their labels (y > t)."""
    x, y = data[0], data[1]
    idx = torch.arange(min(n, len(x)))
    rows, names = [to_float(x[idx])], ["original x"]
    if "start" in ds:
        rows.append(to_float(x[ds["start"][idx].to(x.device)]))
        names.append("start image x0")
    rows.append(ds["images"][idx].float())
    names.append(f"{name} image")
    cols = [f"{CIFAR_CLASSES[a]}\n> {CIFAR_CLASSES[b]}" if a != b else CIFAR_CLASSES[a]
            for a, b in zip(y[idx].tolist(), ds["labels"][idx].tolist())]
    grid(os.path.join(cfg.out, f"{name}.png"), f"{name}: {len(ds['labels'])} images, {tag(cfg)}", rows, names, cols,
         note=f"source: {ds['key']['models'][0].get('arch', '?') if ds['key']['models'] else 'D_det'} "
              f"({os.path.basename(ds['file'])}); column: label of x"
              + (" > label of the constructed image" if "true" in ds else ""))


def figure_fig2(cfg, recs):
    """Ilyas Fig. 2 (standard and robust accuracy after training on D, D with adversarial training, D_R, D_NR) and
    Table 1 (D_rand, D_det), ours beside the paper's."""
    v = {(r["experiment"], r["metric"]): r["value"] for r in recs}
    sets, what = ("standard", "robust", "d_r", "d_nr"), ("D (standard)", "D (adv. trained)", "D_R", "D_NR")
    ra = lambda e: RA + ", 7 steps of eps/5" if e == "standard" else RA  # the standard model's 4.5: the paper's attack
    bars(os.path.join(cfg.out, "fig2.png"), f"Ilyas et al. Fig. 2: models trained on D, D_R, D_NR ({tag(cfg)})",
         "test accuracy (%)", what,
         [("ours: standard acc", BLUE, [v.get((e, "standard acc")) for e in sets]),
          ("paper: standard acc", LIGHT_BLUE, [PAPER.get((e, "standard acc")) for e in sets]),
          ("ours: robust acc", ORANGE, [v.get((e, ra(e))) for e in sets]),
          ("paper: robust acc", LIGHT_ORANGE, [PAPER.get((e, ra(e))) for e in sets])],
         note=f"robust acc: L2 PGD at eps 0.25, {cfg.eval_steps} steps of 2.5 eps/steps; D (standard): both under the "
              f"paper's 7 steps of eps/5, as its 4.5 was measured. Ours: {source_names(cfg)}; the paper's: ResNet-50")
    bars(os.path.join(cfg.out, "table1.png"), f"Ilyas et al. Table 1: D_rand and D_det ({tag(cfg)})",
         "test accuracy (%) on the real test set", ("D_rand", "D_det", "D_det's control"),
         [("ours", BLUE, [v.get((e, "standard acc")) for e in ("d_rand", "d_det", "d_shortcut")]),
          ("ours, on the shifted labels y+1", ORANGE, [None, *(v.get((e, "test acc on shifted labels y+1"))
                                                                for e in ("d_det", "d_shortcut"))]),
          ("paper (CIFAR-10)", LIGHT_BLUE, [PAPER[("d_rand", "standard acc")], PAPER[("d_det", "standard acc")], None])],
         note=f"targeted L2 PGD on the standard model, eps {cfg.rel_eps:g}, {cfg.rel_steps} steps of {cfg.rel_step:g}; "
              f"the control: D_det's perturbations replaced by a fixed pattern per class; chance 10%")


def figure_transfer(cfg, recs):
    v, src = {(r["arch"], r["metric"]): r["value"] for r in recs}, recs[0]["settings"]["source"]
    archs = list(cfg.transfer_archs)
    ours = dict(label=f"ours ({src} source)", colour=BLUE, points=[
        (v[(a, "transfer rate")], v[(a, "D_det-trained test acc")]) for a in archs],
        names=[a + (" (source)" if a == src else "") for a in archs])
    paper = [a for a in ("vgg16", "resnet18", "resnet50")]
    theirs = dict(label="paper (resnet50 source)", colour=LIGHT_ORANGE, names=paper, points=[
        (PAPER[("transfer", "transfer rate", a)], PAPER[("transfer", "D_det-trained test acc", a)]) for a in paper])
    plot(os.path.join(cfg.out, "transfer.png"), f"Ilyas et al. Fig. 3: transfer vs learnability ({tag(cfg)})",
         "transfer rate of the source's D_det examples (%)", "test accuracy after training on D_det (%)",
         [ours, theirs], xlim=(0, 100), ylim=(0, 60), note="each point an architecture; widths: source "
         f"{cfg.width}, others {cfg.transfer_width or cfg.width}")


def figure_frequency(cfg, maps, originals, labels, filtered):
    """frequency.png: the two Fourier heat maps and their difference; filtered.png: test images and their filtered
    versions (as the models see them, and the high-pass ones contrast-stretched x5 to show what is left)."""
    diff = (maps["robust"] - maps["standard"]) / 100
    grid(os.path.join(cfg.out, "frequency.png"), f"Gilmer & Hendrycks: Fourier heat maps ({tag(cfg)})",
         [torch.stack([colormap(maps["standard"] / 100), colormap(maps["robust"] / 100), colormap(diff, diverging=True)])],
         ["error rate"], ["standard model", "robust model", "robust - standard"], scale=8,
         bars=[(0, 100, "%", False), (0, 100, "%", False), (-100, 100, " pts", True)],
         note=f"each pixel: the test error when a Fourier basis image of L2 norm {cfg.freq_norm:g} is added (frequency 0 "
              f"at the centre, +-16 at the edges); difference: blue = robust lower, red = robust higher")
    hp = filtered["high-pass"]
    grid(os.path.join(cfg.out, "filtered.png"), f"Gilmer & Hendrycks: what the filtered models see ({tag(cfg)})",
         [originals, filtered["low-pass"], hp, (hp - 0.5) * 5 + 0.5], ["test image", f"low-pass <= {cfg.freq_low}",
                                                                       f"high-pass >= {cfg.freq_high}", "high-pass x5"],
         [CIFAR_CLASSES[c] for c in labels.tolist()],
         note="frequencies max(|kx|,|ky|) of the 32x32 DFT; high-pass shifted to grey 0.5 (the models see it so)")


def figure_linear_features(cfg, useful, robust, ens, path, robust_point):
    """linear_features.png: Goh's figure, log robustness vs usefulness of every eigenvector, with both constructions."""
    plot(os.path.join(cfg.out, "linear_features.png"), f"Goh: useful non-robust linear features, trucks vs frogs ({tag(cfg)})",
         "robustness ||a||_S / ||a|| (log scale)", "usefulness E[y f(x)]",
         [dict(label="eigenvectors of S (training images)", colour=LIGHT_BLUE, size=2,
               points=list(zip(robust.tolist(), useful.tolist()))),
          dict(label="containment path (1-a) a_nr + a a_r", colour=ORANGE, line=True, size=1,
               points=list(zip(path[1].tolist(), path[0].tolist()))),
          dict(label="a_robust, the most useful", colour=BLUE, size=6, points=[robust_point[::-1]], names=["a_robust"]),
          dict(label="ensemble: held-out usefulness", colour=(200, 0, 0), size=6, points=[ens["ensemble"]],
               names=["ensemble (test)"]),
          dict(label="shuffled-label null: 99th percentile (test)", colour=GREY, size=6, points=[ens["null"]],
               names=["null, 99th pct (test)"])], xlog=True,
         note="usefulness on the training images, each direction's sign chosen there; ensemble and null on test images")


# =====================================================================================================================
# Files: the datasets' formats, checkpoints (advex's, MadryLab's, RobustBench's), released datasets, images
# =====================================================================================================================

CIFAR_BATCH = 10000  # images in each of the six official batch files (the tests write smaller ones)
CIFAR_FILES = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
               "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}  # md5
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {"cifar": ("CIFAR10", "cifar-10-batches-py", CIFAR_FILES), "mnist": ("MNIST", "MNIST/raw", MNIST_FILES),
            "fashion": ("FashionMNIST", "FashionMNIST/raw", MNIST_FILES)}  # torchvision's name, folder under --data, files
DATA = {}  # this process's datasets, read once (main() clears it)
PROVENANCE = {}  # dataset -> which copy this process read (results.md says it)
MADRY_MEAN, MADRY_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # MadryLab's and RobustBench's CIFAR-10


def why(e):
    """An exception as one short line: its type, and the first sentence of its message when it has one."""
    lines = re.sub(r"^\[enforce fail at [^]]*\] \.? ?", "", str(e).strip()).splitlines()  # torch's C++ location: noise
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(e).__name__


def torch_load(path):
    """torch.load(path) on the CPU with weights_only=True (tensors and plain values: no code runs), its failure said
    in one line that names the file and the likely cause."""
    if not os.path.isfile(path):
        raise AdvexError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about a pickle's protocol before it refuses the file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        head = b""
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(4)
        plain_pickle = head[:1] == b"\x80" and head[2:] != b"\x8a\x0a"  # torch.save: a zip, or (before 1.6) its magic
        cause = ("it holds Python objects that only code can rebuild, which weights_only=True refuses (MadryLab saved "
                 "theirs with dill): if you trust the file, save its ['model'] state_dict alone with torch.save and pass "
                 "that" if "GLOBAL" in str(e) else "it is a plain Python pickle, not a file torch.save wrote (advex reads "
                 "only those, with weights_only=True, so that no file can run code): save its tensors with torch.save"
                 if plain_pickle else "truncated, empty or not a file torch.save wrote")
        raise AdvexError(f"cannot read {path}: {cause} ({why(e)})") from None


def file_sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:10]


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are Python 2 pickles of a dict of strings, one numpy uint8 array and lists
    of ints: numpy's array reconstruction is the only code they need. Anything else a file names (os.system,
    ...) is refused before it can run."""
    SAFE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5's arrays
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise AdvexError(f"refuses to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists and strings")
        return super().find_class(module, name)


def need_files(dataset, root, folder, names, download):
    """The files `names` in `folder`, after torchvision's download of `dataset` (CIFAR10, MNIST, FashionMNIST) into
    root if some are missing and download is allowed (torchvision is imported only then: it costs a second of
    start-up; a failed download is said, and removes root if the attempt created it)."""
    missing = lambda: [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing() and download:
        existed = os.path.exists(root)
        try:
            import torchvision
            getattr(torchvision.datasets, dataset)(root, download=True)
        except Exception as e:
            log(f"advex: {dataset} download failed ({why(e)})")
            if not existed:
                shutil.rmtree(root, ignore_errors=True)
    if missing():
        raise AdvexError(f"{dataset.replace('CIFAR10', 'CIFAR-10')} not found: {folder}/ lacks {', '.join(missing())} "
                         f"(see README, 'Data')")


def cifar_official(folder):
    """Whether the six CIFAR-10 batch files in `folder` are the official ones (their md5 sums)."""
    def md5(name):
        with open(os.path.join(folder, name), "rb") as f:
            return hashlib.md5(f.read()).hexdigest()
    return all(md5(n) == digest for n, digest in CIFAR_FILES.items())


def load_cifar10(root, download=True, warn=True):
    """CIFAR-10 from ROOT/cifar-10-batches-py (torchvision's layout), downloading it when missing and allowed.
    A copy whose md5 sums differ from the official ones but whose format is right (e.g. one rebuilt from
    JPEGs) is used, with a warning when `warn`. Each batch must hold CIFAR_BATCH uint8 images of 3072 values
    and as many labels in 0..9. Returns uint8 (50000,3,32,32), int64 (50000,), uint8 (10000,3,32,32),
    int64 (10000,) on the CPU."""
    folder = os.path.join(root, DATASETS["cifar"][1])
    need_files("CIFAR10", root, folder, CIFAR_FILES, download)
    if warn and not cifar_official(folder):
        log(f"advex: warning: CIFAR-10 in {folder} differs from the official md5 sums (a re-encoded copy?); using it")
    splits = []
    for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        xs, ys = [], []
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    d = _CifarUnpickler(f, encoding="latin1").load()  # the official files are Python 2 pickles
                x, y = torch.as_tensor(d["data"]), torch.as_tensor(d["labels"])
            except AdvexError as e:
                raise AdvexError(f"CIFAR-10 file {path} {e}") from None
            except Exception as e:
                raise AdvexError(f"corrupt CIFAR-10 file {path}: not a batch dict with 'data' and 'labels' ({why(e)})") from None
            problem = (f"pixels are {x.dtype}, not uint8" if x.dtype != torch.uint8 else
                       f"data is {tuple(x.shape)}, not ({CIFAR_BATCH}, 3072)" if x.shape != (CIFAR_BATCH, 3072) else
                       f"labels are {y.dtype} {tuple(y.shape)}, not {CIFAR_BATCH} integers"
                       if y.dtype != torch.int64 or y.shape != (CIFAR_BATCH,) else
                       f"labels run from {y.min().item()} to {y.max().item()}, not 0..9" if y.min() < 0 or y.max() > 9 else "")
            if problem:
                raise AdvexError(f"corrupt CIFAR-10 file {path}: {problem}")
            xs.append(x.view(-1, 3, 32, 32))
            ys.append(y)
        splits += [torch.cat(xs), torch.cat(ys)]
    return tuple(splits)


def read_idx(path, dims):
    """An IDX file (MNIST's format): magic 0x00 0x00 0x08 DIMS (uint8 data), DIMS big-endian uint32 sizes, data."""
    with open(path, "rb") as f:
        raw = f.read()
    head = 4 + 4 * dims
    if len(raw) < head or raw[:4] != bytes([0, 0, 8, dims]):
        raise AdvexError(f"{path} is not an IDX file of {dims}-d uint8 data (its first bytes are {raw[:4].hex() or 'missing'})")
    shape = struct.unpack(f">{dims}I", raw[4:head])
    if len(raw) - head != math.prod(shape) or not math.prod(shape):
        raise AdvexError(f"{path} holds {len(raw) - head} bytes of data; its header says {math.prod(shape)} (truncated?)")
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).view(*shape)


def load_mnist(root, fashion=False, download=True):
    """MNIST or Fashion-MNIST from ROOT/{MNIST,FashionMNIST}/raw (torchvision's layout: IDX files), downloading
    them when missing and allowed. Returns uint8 (60000,1,28,28), int64 (60000,), uint8 (10000,1,28,28),
    int64 (10000,)."""
    name = "FashionMNIST" if fashion else "MNIST"
    raw = os.path.join(root, name, "raw")
    need_files(name, root, raw, MNIST_FILES, download)
    out = []
    for split in ("train", "t10k"):
        x = read_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), 3)
        y = read_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), 1).long()
        if x.shape[1:] != (28, 28) or len(x) != len(y) or y.min() < 0 or y.max() > 9:
            raise AdvexError(f"corrupt {name} files in {raw}/: images {tuple(x.shape)}, {len(y)} labels in "
                             f"{y.min().item()}..{y.max().item()}")
        out += [x.unsqueeze(1).contiguous(), y]
    return tuple(out)


def first_n(n, size, flag):
    """How many of `size` images a --n-train / --n-test of n means: 0 = all; more than there are: all, said."""
    if n > size:
        log(f"advex: --{flag} {n} is more than the {size} images there; using {size}")
    return min(n, size) if n else size


def cifar_full(cfg):
    """All of CIFAR-10 on the CPU, read once per process. Whether it is the official copy goes to results.md
    (PROVENANCE): the files' md5 sums, computed once per copy and --out, and a copy that differs is warned about. A
    copy is its folder and its files' sizes, modification and change times and inodes: a copy replaced in place, even
    with its old times kept (cp -p, rsync -a), is a new copy, checked again."""
    if ("cifar", cfg.data) not in DATA:
        DATA["cifar", cfg.data] = load_cifar10(cfg.data, cfg.download, warn=False)
        folder = os.path.join(cfg.data, DATASETS["cifar"][1])
        files = [os.stat(os.path.join(folder, n)) for n in CIFAR_FILES]
        copy = settings_key([os.path.abspath(folder)] + [(f.st_size, f.st_mtime_ns, f.st_ctime_ns, f.st_ino) for f in files])
        seen = os.path.join(cfg.out, "artifacts", f".cifar-copy-{copy}")
        if os.path.isfile(seen):
            with open(seen) as f:
                official = f.read() == "official\n"
        else:
            official = cifar_official(folder)
            if not official:
                log(f"advex: warning: CIFAR-10 in {cfg.data} differs from the official md5 sums (a re-encoded copy?); using it")
            save_atomic("official\n" if official else "not official\n", seen)
        PROVENANCE["CIFAR-10"] = (f"the official files (md5 sums match), {cfg.data}" if official else
                                  f"NOT the official files: their md5 sums differ (a re-encoded copy, such as one "
                                  f"rebuilt from JPEGs), {cfg.data}")
    return DATA["cifar", cfg.data]


def cifar(cfg, dev, validation=False):
    """CIFAR-10 on the device, moved there once per process: the first --n-train training and --n-test test images,
    uint8 (N,3,32,32), int64 labels. Returns cfg with n_train / n_test set to the numbers used, and (xtr, ytr, xte, yte).
    validation: the ablations', which choose settings and so must never see the test images the claims are judged
    on: (xte, yte) are the last --n-val *training* images instead (all of them), and the training images stop before."""
    xtr, ytr, xte, yte = cifar_full(cfg)
    if validation:
        nval = min(cfg.n_val, len(xtr) // 2)
        xtr, ytr, xte, yte = xtr[:len(xtr) - nval], ytr[:len(xtr) - nval], xtr[len(xtr) - nval:], ytr[len(xtr) - nval:]
    ntr, nte = first_n(cfg.n_train, len(xtr), "n-train"), len(xte) if validation else first_n(cfg.n_test, len(xte), "n-test")
    if ("cifar", cfg.data, dev, ntr, nte, validation) not in DATA:
        DATA["cifar", cfg.data, dev, ntr, nte, validation] = (xtr[:ntr].to(dev), ytr[:ntr].to(dev), xte[:nte].to(dev),
                                                              yte[:nte].to(dev))
    return dataclasses.replace(cfg, n_train=ntr, n_test=nte), DATA["cifar", cfg.data, dev, ntr, nte, validation]


def mnist_and_fashion(cfg, dev):
    """MNIST (train and test) and the Fashion-MNIST training images (never its labels), the first --n-train and
    --n-test, on the device: cfg with the counts used, and (xm, ym, xf, xmt, ymt)."""
    xm, ym, xmt, ymt = load_mnist(cfg.data, False, cfg.download)
    xf = load_mnist(cfg.data, True, cfg.download)[0]
    n = first_n(cfg.n_train, min(len(xm), len(xf)), "n-train")
    cfg = dataclasses.replace(cfg, n_train=n, n_test=first_n(cfg.n_test, len(xmt), "n-test"))
    return cfg, (xm[:n].to(dev), ym[:n].to(dev), xf[:n].to(dev), xmt[:cfg.n_test].to(dev), ymt[:cfg.n_test].to(dev))


def _resnet50_state(d, path):
    """advex's state_dict of a ResNet-50 from a MadryLab robustness checkpoint ({'model' (older: 'state_dict'): keys
    'module.model.*', 'module.attacker.model.*' (a copy), 'module.normalizer.new_mean' / 'new_std'}) or RobustBench's
    (the network's keys alone or under 'state_dict', normalisation mu / sigma or MadryLab's constants).
    Their names: conv1, bn1, layerL.J.{conv1,bn1,conv2,bn2,conv3,bn3,shortcut.0,shortcut.1}, linear."""
    sd = d.get("model", d.get("state_dict", d)) if isinstance(d, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdvexError(f"{path} is neither an advex checkpoint nor a MadryLab / RobustBench ResNet-50 state_dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    mean = sd.get("normalizer.new_mean", sd.get("mu", torch.tensor(MADRY_MEAN)))
    std = sd.get("normalizer.new_std", sd.get("sigma", torch.tensor(MADRY_STD)))
    out = {"mean": mean.reshape(1, 3, 1, 1).float(), "std": std.reshape(1, 3, 1, 1).float()}
    first = dict(zip("1234", itertools.accumulate([1, 3, 4, 6])))  # body index of each layer's first block
    sub = {"conv1": "body.0", "bn1": "body.1", "conv2": "body.3.0", "bn2": "body.3.1", "conv3": "body.4", "bn3": "body.5",
           "shortcut": "skip"}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        if k.startswith(("attacker.", "normalizer.")) or k in ("mu", "sigma"):
            continue
        top, block = re.fullmatch(r"(conv1|bn1|linear)\.(.+)", k), re.fullmatch(r"layer([1-4])\.(\d+)\.(\w+?)\.(.+)", k)
        if top:
            out[{"conv1": "body.0.0", "bn1": "body.0.1", "linear": "head"}[top[1]] + "." + top[2]] = v
        elif block and block[3] in sub:
            out[f"body.{first[block[1]] + int(block[2])}.{sub[block[3]]}.{block[4]}"] = v
        else:
            raise AdvexError(f"{path}: unexpected key {k!r} for a CIFAR ResNet-50")
    return out


def load(path, device="cpu"):
    """A ready model from a checkpoint file, in eval mode on `device`: advex's own (OUT/artifacts/NAME-ARCH-sSEED-KEY.pt;
    results.json names each model's file), MadryLab's robustness release (cifar_nat.pt, cifar_l2_0_5.pt) or
    RobustBench's CIFAR-10 ResNet-50 (Engstrom2019Robustness). It takes images in [0,1], (B, 3, 32, 32), and returns
    logits (B, 10): the convention of RobustBench, AutoAttack and torchattacks. Read with weights_only=True."""
    if os.path.isdir(path):
        raise AdvexError(f"{path} is a folder, not a checkpoint file")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise AdvexError(f"unknown device {device!r}: cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdvexError(f"device {device} asked for, but CUDA is not available on this machine")
    d = torch_load(path)
    if isinstance(d, dict) and isinstance(d.get("state_dict"), dict) and isinstance(d.get("arch"), str):
        r = dict(arch=d["arch"], width=d.get("width", 64), classes=d.get("classes", 10), design=d.get("design") or {},
                 pixels=d.get("pixels", Net.pixels))
        state = d["state_dict"]
        design, pixels = r["design"], r["pixels"]
        problem = (f"an architecture {r['arch']!r}" if r["arch"] not in (*ARCHS, "mnist_cnn", "linear") else
                   f"width {r['width']!r}" if type(r["width"]) is not int or r["width"] < (0 if r["arch"] in ("mnist_cnn", "linear") else 2) else
                   f"{r['classes']!r} classes" if type(r["classes"]) is not int or r["classes"] < 2 else
                   f"the design {design!r}" if not isinstance(design, dict) or not set(design) <= {"act", "pool", "scale"} or
                   design.get("act", "gelu") not in ("gelu", "relu") or design.get("pool", "max") not in ("max", "avg") or
                   not (isinstance(design.get("scale", 1.0), (int, float)) and 0 < design.get("scale", 1.0) < math.inf) else
                   f"the pixel range {pixels!r}" if not (isinstance(pixels, (tuple, list)) and len(pixels) == 2 and
                                                        all(isinstance(v, (int, float)) and math.isfinite(v) for v in pixels)
                                                        and pixels[0] < pixels[1]) else "")
        if problem:
            raise AdvexError(f"{path} is not a checkpoint advex can read: it gives {problem}")
    else:
        state = _resnet50_state(d, path)
        r = dict(arch="resnet50", width=state["body.0.0.weight"].shape[0], classes=state["head.weight"].shape[0])
    bad = [k for k, v in state.items() if not torch.is_tensor(v) or v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdvexError(f"{path} holds NaN or infinite weights (in {bad[0]}): it cannot give a meaningful number")
    if "std" in state and not (state["std"] > 0).all():
        raise AdvexError(f"{path} normalises with a standard deviation <= 0")
    model = new_model(r, device)
    state = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}, **state}
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())[:300]  # the keys or shapes that do not fit
        raise AdvexError(f"{path} does not fit a {r['arch']} model ({type(e).__name__}: {detail})") from None
    model.arch = r["arch"]
    return model


def external_model(path, role, dev):
    """--standard-from / --robust-from: a loaded source model, keyed by its file's hash and named by its file."""
    model = load(path, dev)
    model.name, model.key = f"{role} (from {os.path.basename(path)})", dict(file=file_sha1(path), arch=model.arch)
    model.file = path
    if model.arch != "resnet50":
        log(f"advex: note: --{role}-from {path} is a {model.arch}; the paper's numbers beside it are its ResNet-50's")
    return model


def load_released(folder):
    """A dataset in the layout MadryLab released for Ilyas et al. (and --export writes): FOLDER/CIFAR_ims (float
    images in [0,1], (N,3,32,32)) and FOLDER/CIFAR_lab ((N,) class indices), each a tensor or a list of tensors
    saved with torch.save. Returns float32 images and int64 labels on the CPU."""
    parts = []
    for name in ("CIFAR_ims", "CIFAR_lab"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise AdvexError(f"released dataset: {path} not found (expected CIFAR_ims and CIFAR_lab in {folder})")
        t = torch_load(path)
        if isinstance(t, (list, tuple)) and t and all(isinstance(u, torch.Tensor) for u in t):
            try:
                t = torch.cat([u.reshape(-1, *u.shape[1:]) if u.dim() else u.view(1) for u in t])
            except RuntimeError:
                raise AdvexError(f"released dataset: {path} holds tensors of shapes that do not stack "
                                 f"({', '.join(str(tuple(u.shape)) for u in t[:3])}, ...)") from None
        if not isinstance(t, torch.Tensor):
            raise AdvexError(f"released dataset: {path} holds {type(t).__name__}, not a tensor or list of tensors")
        parts.append(t)
    (ims, lab), (ims_path, lab_path) = parts, (os.path.join(folder, "CIFAR_ims"), os.path.join(folder, "CIFAR_lab"))
    problem = (f"{ims_path} holds {ims.dtype} {tuple(ims.shape)}, not float images (N,3,32,32)"
               if ims.dim() != 4 or ims.shape[1:] != (3, 32, 32) or not ims.is_floating_point() or not len(ims) else
               f"{lab_path} holds {lab.dtype} {tuple(lab.shape)}, not ({len(ims)},) class indices (one per image)"
               if lab.dim() != 1 or len(lab) != len(ims) or lab.dtype in (torch.bool, torch.complex64, torch.complex128)
               or lab.is_floating_point() and (lab != lab.round()).any() else
               f"{ims_path} holds values that are not finite" if not torch.isfinite(ims).all() else
               f"{ims_path} holds pixels from {ims.min().item():g} to {ims.max().item():g}, not within [0,1]"
               if ims.min() < 0 or ims.max() > 1 else
               f"{lab_path} holds labels from {lab.min().item():g} to {lab.max().item():g}, not 0..9"
               if lab.min() < 0 or lab.max() > 9 else "")
    if problem:
        raise AdvexError(f"released dataset: {problem}")
    return ims.float(), lab.long()


def export_dataset(cfg, name, ds):
    """--export DIR: a constructed set in MadryLab's released layout, DIR/NAME-sSEED/CIFAR_ims (float32 (N,3,32,32),
    exactly the values advex trains on; uint8 would move each image by ~0.06 of L2) and CIFAR_lab (int64 (N,))."""
    if cfg.export:
        folder = os.path.join(cfg.export, f"{name}-s{cfg.seed}")
        save_atomic(ds["images"].float(), os.path.join(folder, "CIFAR_ims"))
        save_atomic(ds["labels"].long(), os.path.join(folder, "CIFAR_lab"))
        log(f"[{name}] exported to {folder}/ (train-on --dataset {folder} reads it)")


def read_image(path):
    """An image file (JPEG, PNG, ...: what Pillow, torchvision's image library, reads) as (3, H, W) float in [0,1]."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"):  # 16-bit or float pixels: Pillow's
                raise AdvexError(f"{im.mode} pixels: save it as an 8-bit image")      # RGB would clip or darken them
            return torch.tensor(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(im.height, im.width, 3) \
                .permute(2, 0, 1).float() / 255
    except Exception as e:
        raise AdvexError(f"cannot read image {path} ({str(e) if isinstance(e, AdvexError) else why(e)})") from None


# =====================================================================================================================
# CLI: python advex.py EXPERIMENT [--key value ...], flags generated from Config
# =====================================================================================================================

def exp_report(cfg, dev):
    """Print where the time went (the stages timed since --since) and the claims of one scale (--scale, default: the
    latest run's); rewrite results.md for that scale."""
    res = read_results(cfg.out, must_exist=True)
    scale = cfg.scale or latest_scale(res)
    planned = None  # run_all.sh plans first: OUT/plan.json, if this run made it
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(os.path.join(cfg.out, "plan.json")) as f:
        p = json.load(f)
        planned = p if cfg.since and p["scale"] == scale and p["time"] >= cfg.since and isinstance(p["stages"], list) else None
    log(stage_table([s for s in res["stages"] if s["time"] >= cfg.since], time.time() - cfg.since if cfg.since else None,
                    planned))
    log(f"claims, scale {scale}" + (" (quick: tiny sizes; these verdicts mean nothing)" if scale == "quick" else "") + ":")
    for e, why in res["not_run"].get(scale, {}).items():
        log(f"not run: {e}: {why}")
    records = [r for r in res["records"] if r["scale"] in (scale, "any")]
    log("\n".join(f"{verdict:8s} {claim} ({kind}: {criterion}; ours: {ours or '-'}; run {run or '-'})"
                  for claim, kind, criterion, ours, verdict, run in check_claims(records, res["not_run"].get(scale, {}))))
    write_results(cfg.out, [], {}, scale=scale)  # results.md for that scale, under the lock like every write
    return []


SEC3 = "train std eval adv inv rel con det export standard_from robust_from"
SEC3_RECORDS = ("standard", "robust", *CONSTRUCTIONS)  # the experiments ilyas records
# name: (function, the Config fields it reads besides SHARED: names, name prefixes (adv: adv_*) or 'train',
#        the datasets it needs: DATASETS)
EXPERIMENTS = {
    "standard": (exp_standard, "train std eval standard_from", "cifar"),
    "robust": (exp_robust, "train eval adv robust_from", "cifar"),
    **{name: (functools.partial(exp_constructed, name=name), SEC3, "cifar") for name in CONSTRUCTIONS},  # d_r, ...
    "ilyas": (exp_ilyas, SEC3, "cifar"),
    "ablation": (exp_ablation, "eval width n_train n_test n_val epochs batch lr momentum optimizer wd", "cifar"),
    "ablation-det": (exp_ablation_det, SEC3 + " n_val", "cifar"),
    "train-on": (exp_train_on, "train eval dataset", "cifar"),
    "mislabeled": (exp_mislabeled, "mis width fastnet n_train n_test batch lr momentum optimizer wd augment", "cifar"),
    "mnist-fashion": (exp_mnist_fashion, "n_train n_test mnist momentum wd", "mnist fashion"),
    "bugs": (exp_bugs, "train adv_epochs bugs standard_from", "cifar"),
    "squares": (exp_squares, "squares width fastnet", ""),
    "leakage": (exp_leakage, "train std leak adv_steps rel con det standard_from", "cifar"),
    "transfer": (exp_transfer, "train std transfer rel con det standard_from", "cifar"),
    "frequency": (exp_frequency, "train adv freq standard_from robust_from", "cifar"),
    "linear-features": (exp_linear_features, "lin", "cifar"),
    "style": (exp_style, "train adv style content_image standard_from robust_from", "cifar"),
    "report": (exp_report, "since", ""),
    "plan": (None, "", ""),  # main() runs the experiments named after it on probes: plan()
}
# what run_all.sh runs, and `plan` alone plans: every experiment but the parts of ilyas, train-on and the ablations
RUN_ALL = [e for e in EXPERIMENTS if e not in (*SEC3_RECORDS, "train-on", "ablation", "ablation-det", "plan")]
SHARED = ("data", "out", "download", "device", "precision", "compile", "attack_batch", "seed", "seeds", "scale")
TRAIN = ("arch", "width", "fastnet_act", "fastnet_pool", "fastnet_scale", "n_train", "n_test", "epochs", "batch", "lr",
         "momentum", "optimizer", "wd", "augment")


def fields_read(experiments):
    """The Config fields some of the experiments read, SHARED first, in Config's order within each part."""
    tokens = [t for e in experiments if e in EXPERIMENTS for t in EXPERIMENTS[e][1].split()]
    own = [f for f in CONFIG_FIELDS_ORDER if f not in SHARED and any(
        f == t or f.startswith(t + "_") or t == "train" and f in TRAIN for t in tokens)]
    return list(SHARED) + own


CONFIG_FIELDS_ORDER = [f.name for f in dataclasses.fields(Config)]


@functools.cache
def _field_help():
    """Each Config field's trailing comment, read from this file, becomes its --help text."""
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", inspect.getsource(Config), re.M))


def _bool(s):
    if str(s).lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return str(s).lower() in ("1", "true", "yes", "on")


def _number(s):
    """A float, or a fraction such as 8/255 (how Linf bounds are written)."""
    a, slash, b = str(s).partition("/")
    try:
        return float(a) / float(b) if slash else float(a)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number (or a fraction such as 8/255), got {s!r}") from None


def parse_args(argv):
    """(experiments, cfg): the flags parsed, the --scale preset applied to every field not given, every value checked."""
    experiments = list(itertools.takewhile(lambda a: a in EXPERIMENTS, argv))
    reads, helps = fields_read(experiments), _field_help()
    p = argparse.ArgumentParser(prog="advex.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog=f"experiments: {', '.join(EXPERIMENTS)}; `advex.py EXPERIMENT --help` lists "
                                       f"the flags it reads. Several experiments run one after the other in one process "
                                       f"(run_all.sh); a flag none of them reads is accepted and ignored with a note.")
    p.error = lambda msg: (_ for _ in ()).throw(AdvexError(msg))  # one line, exit 2 (see main)
    p.add_argument("experiments", nargs="+", choices=list(EXPERIMENTS), metavar="EXPERIMENT", help="what to run, in order")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in reads + [f for f in CONFIG_FIELDS_ORDER if f not in reads]:
        f, flag = fields[name], "--" + name.replace("_", "-")
        allowed = f.metadata.get("allowed", ">0" if f.type in (int, float) or f.type is tuple and f.default and
                                 isinstance(f.default[0], float) else None)
        shown = f" [{', '.join(allowed) if isinstance(allowed, tuple) else allowed}]" if isinstance(allowed, (str, tuple)) else ""
        text = f"{helps.get(name, '')}{shown} (default: {f.default!r})".replace("%", "%%") if name in reads else argparse.SUPPRESS
        typ = {bool: _bool, int: int, float: _number, str: str}[type(f.default[0]) if f.type is tuple else f.type]
        typ = (lambda s, t=typ: tuple(t(v) for v in s.split(",") if v.strip())) if f.type is tuple else typ
        p.add_argument(flag, dest=name, type=typ, default=None, help=text, **(dict(nargs="?", const=True) if f.type is bool else {}))
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    experiments = given.pop("experiments")
    if len(set(experiments)) < len(experiments):
        raise AdvexError(f"each experiment once, please: {' '.join(experiments)}")
    if "plan" in experiments[1:]:
        raise AdvexError("plan comes first: advex.py plan EXPERIMENT ... (it plans them, and runs nothing)")
    unused = [k for k in given if k not in reads]
    if unused:
        log(f"advex: note: {' '.join(experiments)} does not read {', '.join('--' + k.replace('_', '-') for k in unused)}")
    cfg = Config(**given)
    check_config(cfg)  # --scale first of all
    cfg = dataclasses.replace(cfg, **{k: v for k, v in SCALES[cfg.scale].items() if k not in given})
    if cfg.inv_method == "paper":  # the paper's 1000 steps of 0.1, unless the steps or the step are given
        cfg = dataclasses.replace(cfg, inv_steps=given.get("inv_steps", 1000), inv_step=given.get("inv_step", 0.1))
    check_config(cfg, experiments)
    if experiments == ["report"] and "scale" not in given:
        cfg = dataclasses.replace(cfg, scale="")  # report alone: the latest run's scale
    return experiments, cfg


def check_config(cfg, experiments=None):
    """Every setting checked before any data is read or any model trained: one clear error, exit 2. Each field's
    allowed values are beside it in Config (a number without knob(...) must be finite and > 0)."""
    for f in dataclasses.fields(Config):
        v, flag, allowed = getattr(cfg, f.name), "--" + f.name.replace("_", "-"), f.metadata.get("allowed")
        if f.type is tuple and not v:
            raise AdvexError(f"{flag} needs at least one value")
        for u in v if f.type is tuple else (v,):
            rule = allowed if allowed is not None else ">0" if isinstance(u, (int, float)) and not isinstance(u, bool) else None
            if rule in RULES and not (math.isfinite(u) and RULES[rule](u)):
                raise AdvexError(f"{flag} must be a finite number {rule}, got {u}")
            if isinstance(rule, tuple) and u not in rule:
                raise AdvexError(f"unknown {flag} {u!r}; choose from {', '.join(rule)}")
            if isinstance(rule, re.Pattern) and not rule.fullmatch(u):
                raise AdvexError(f"unknown {flag} {u!r}")
            if rule == "file" and u and not os.path.isfile(u):
                raise AdvexError(f"{flag} {u}: " + ("is a folder, not a file" if os.path.isdir(u) else "no such file"))
    if not cfg.out:
        raise AdvexError("--out needs a folder")
    if cfg.freq_low >= cfg.freq_high:
        raise AdvexError(f"--freq-low {cfg.freq_low} must be below --freq-high {cfg.freq_high}: the bands must not overlap")
    if experiments is None:
        return
    source = cfg.std_arch
    for path, flag in ((cfg.standard_from, "--standard-from"), (cfg.robust_from, "--robust-from")):
        m = load(path) if path else None  # a source must be a CIFAR-10 model: read before any data or training
        if m is not None and (m.arch not in ARCHS or m.head.out_features != 10):
            raise AdvexError(f"{flag} {path} is a {m.arch} with {m.head.out_features} classes; a source must be a "
                             f"CIFAR-10 model ({', '.join(ARCHS)}, 10 classes)")
        source = m.arch if m is not None and flag == "--standard-from" else source
    if len(set(cfg.transfer_archs)) < len(cfg.transfer_archs) or "transfer" in experiments and source not in cfg.transfer_archs:
        raise AdvexError(f"--transfer-archs {','.join(cfg.transfer_archs)} must list each architecture once, the standard "
                         f"source's ({source}) among them (Fig. 3's self-transfer point)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise AdvexError(f"--device {cfg.device} asked for, but CUDA is not available on this machine")
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        raise AdvexError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if "train-on" in experiments and not cfg.dataset:
        raise AdvexError("train-on needs --dataset DIR (a folder with CIFAR_ims and CIFAR_lab)")
    if "train-on" in experiments and not all(os.path.isfile(os.path.join(cfg.dataset, f)) for f in ("CIFAR_ims", "CIFAR_lab")):
        raise AdvexError(f"--dataset {cfg.dataset}: expected the files CIFAR_ims and CIFAR_lab in it")
    read_results(cfg.out, must_exist=experiments == ["report"])  # report alone: before making a folder
    for folder, what in ((cfg.out, "--out"), (cfg.export, "--export")):
        if folder:  # creatable and writable, before hours of training (or report's work) find out it is not
            writable(folder, what)
    for path in (cfg.style_image, cfg.content_image):
        if path:
            read_image(path)


def writable(folder, what):
    """An error unless `folder` is (or can be made) a folder this process can write to."""
    try:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f".write-test{os.getpid()}"), "w").close()
        os.remove(os.path.join(folder, f".write-test{os.getpid()}"))
    except OSError as e:
        raise AdvexError(f"{what} {folder} is not a writable folder ({why(e)})") from None


def idle_cores(interval=0.1):
    """How many of this machine's cores are idle now, from /proc/stat over `interval` seconds (Linux; elsewhere: all)."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]  # the 'cpu' line: user nice system idle iowait ...
        return v[3] + v[4], sum(v)
    try:
        (idle0, total0), _, (idle1, total1) = ticks(), time.sleep(interval), ticks()
    except (OSError, ValueError, IndexError):
        return os.cpu_count() or 1
    return (os.cpu_count() or 1) * (idle1 - idle0) / max(1, total1 - total0)


@functools.cache
def cpu_threads():
    """The threads torch computes with on a CPU: one per idle core, at least one; OMP_NUM_THREADS, if set, decides.
    On a machine shared with another busy process (a laptop always is), OpenMP threads that wait spin on the core the
    other process needs: measured on this project's 2-core CPU, `advex.py ilyas --scale quick` took 5.7 s idle with 2
    threads and 108 s beside one busy process, 6.9 s with 1 thread there (README, "Speed")."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), round(idle_cores())))


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def warn_if_slow(cfg, dev, experiments):
    """A full-size run on a CPU says up front what one of its models costs here, measured, and goes on."""
    if cfg.scale not in ("full", "paper") or dev.type != "cpu" or set(experiments) <= {"report", "mnist-fashion", "linear-features", "squares"}:
        return
    model, x = make_model(cfg.std_arch, cfg.width), torch.rand(32, 3, 32, 32)
    for _ in range(2):  # the second step is the one timed
        t0 = time.time()
        F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).backward()
    flops = 3 * flops_per_image(model, x)  # per image and training step: forward and backward
    rate, first = flops * 32 / (time.time() - t0), flops * 50000 * cfg.std_epochs
    log(f"advex: warning: full size on a CPU. One model of it, the standard source ({cfg.std_epochs} epochs of 50,000 images, "
        f"{cfg.std_arch}), is {first / 1e15:.2f} PFLOP of counted work: ~{fmt_time(first / rate)} at the {rate / 1e9:.0f} "
        f"GFLOP/s measured here, a yardstick for the models this run trains (README, Speed). `--scale cpu` runs every "
        f"claim on a 2-core CPU in ~38 minutes. Starting anyway.")


def data_missing(cfg, name):
    """Why the dataset `name` (of DATASETS) is not there to use (after a download where allowed), or ''."""
    dataset, folder, files = DATASETS[name]
    try:
        need_files(dataset, cfg.data, os.path.join(cfg.data, folder), files, cfg.download)
    except AdvexError as e:
        return str(e)
    return ""


def plan(cfg, dev, experiments):
    """python advex.py plan [EXPERIMENT ...]: the experiments run on probes (Plan); what each stage would cost, here
    and on one H100, printed and saved to OUT/plan.json, where `report` reads it to set the prediction beside what was
    measured. Nothing else is made or written."""
    STAGES.clear()
    FLOPS[0], PLANNED[:] = 0, [0.0, 0.0]
    t0 = time.time()
    with planning():
        for experiment in experiments:
            for seed in range(cfg.seed, cfg.seed + cfg.seeds):
                EXPERIMENTS[experiment][0](dataclasses.replace(cfg, seed=seed), dev)
    made = [s for s in STAGES if not s["loaded"]]
    unstaged = [FLOPS[0] / 1e12 - sum(s["tflop"] for s in made), PLANNED[0] - sum(s["here"] for s in made),
                PLANNED[1] - sum(s["h100"] for s in made)]
    table = plan_table(STAGES, unstaged, cfg.scale, device_name(dev))
    log(table + f"(planned in {fmt_time(time.time() - t0)}: {', '.join(experiments)})")
    save_atomic(json.dumps(dict(scale=cfg.scale, device=device_name(dev), experiments=experiments, stages=STAGES,
                                unstaged=unstaged, time=time.time()), indent=1), os.path.join(cfg.out, "plan.json"))
    STAGES.clear()


def cli(run, prog):
    """The one error path of advex.py and toy2d.py: bad input is one `PROG: error: ...` line and exit 2;
    Ctrl-C says how to resume and exits 130. Anything else is a bug and keeps its traceback."""
    try:
        return run()
    except AdvexError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except OSError as e:  # disk full, permissions, a path that is a file: the environment, not a bug
        print(f"{prog}: error: {why(e)}", file=sys.stderr)
    except torch.cuda.OutOfMemoryError:
        print(f"{prog}: error: out of GPU memory; lower --attack-batch or --batch", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    raise SystemExit(2)


def main(argv=None):
    def run():
        experiments, cfg = parse_args(sys.argv[1:] if argv is None else argv)
        dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                           "cpu" if cfg.device == "auto" else cfg.device)
        torch.set_num_threads(cpu_threads())  # before torch starts its pool of threads
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        bf16 = cfg.precision == "auto" and (dev.type == "cuda" or cpu_has_amx())
        cfg = dataclasses.replace(cfg, precision="bf16" if bf16 else "fp32")  # what ran, in every key
        remove_stale_temporaries(cfg)
        MEMO.clear()  # an artifact or dataset changed between two in-process calls is read again
        DATA.clear()
        PROVENANCE.clear()
        planned = experiments[0] == "plan"
        if planned:  # plan: the whole of run_all.sh unless experiments are named
            experiments = [e for e in experiments[1:] or RUN_ALL if e != "report"]
            if not experiments:
                raise AdvexError("plan report: report does no work to plan; name the experiments of the run")
        problem = {d: data_missing(cfg, d) for e in experiments for d in EXPERIMENTS[e][2].split()}  # once per dataset
        missing = {e: why for e in experiments if (why := "; ".join(problem[d] for d in EXPERIMENTS[e][2].split() if problem[d]))}
        if len(experiments) == 1 and missing:
            raise AdvexError(missing[experiments[0]])
        for e, why in missing.items():  # the others run; the report says what did not and why
            log(f"advex: not running {e}: {why}")
        if planned:
            with bf16_on(dev.type, bf16):
                return plan(cfg, dev, [e for e in experiments if e not in missing])
        if missing:
            write_results(cfg.out, [], {}, scale=cfg.scale, not_run=missing)
        t0 = time.time()
        with bf16_on(dev.type, bf16):
            warn_if_slow(cfg, dev, experiments)
            for experiment in (e for e in experiments if e not in missing):
                if experiment == "report":
                    exp_report(dataclasses.replace(cfg, since=cfg.since or (t0 if len(experiments) > 1 else 0)), dev)
                    continue
                t1 = time.time()
                for seed in range(cfg.seed, cfg.seed + cfg.seeds):
                    c = dataclasses.replace(cfg, seed=seed)
                    log(f"advex {experiment} seed {seed} on {device_name(dev)}, scale {cfg.scale}")
                    STAGES.clear()
                    RUNS.clear()
                    records = EXPERIMENTS[experiment][0](c, dev)
                    stages = [dict(s, device=device_name(dev), seed=seed, experiment=experiment) for s in STAGES]
                    write_results(cfg.out, records, RUNS, stages, cfg.scale, not_run={experiment: None})
                    for r in records:
                        log(f"  {r['experiment']:24s} {r['metric']:50s} {r['value']:9.2f}" +
                            ("" if r["paper"] is None else f"   (paper {r['paper']:g})"))
                log(f"advex {experiment}: {fmt_time(time.time() - t1)}; results in {cfg.out}/results.md")
        if missing:
            raise AdvexError(f"not run for want of data: {', '.join(missing)} (the rest ran; {cfg.out}/results.md says why)")

    cli(run, "advex")


if __name__ == "__main__":
    main()
