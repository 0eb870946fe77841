"""advex: "Adversarial Examples Are Not Bugs, They Are Features" (Ilyas et al. 2019,
arXiv 1905.02175) and the Distill 2019 discussion around it, in one file you can read top to bottom.

    python advex.py standard              # CIFAR-10 standard model: train, save, evaluate
    python advex.py robust                # L2 adversarially trained model (eps 0.5, 7 steps of 0.1)
    python advex.py ilyas --seeds 0,1,2   # Sec. 3: D_R, D_NR, D_rand, D_det, four fresh models, the table
    python advex.py EXPERIMENT --quick    # tiny sizes: every experiment runs on a CPU in seconds
    python advex.py --help                # every flag, with its unit

Conventions, everywhere in this file:
  * images live in [0,1] pixel space, (B, C, H, W); each model normalises inside itself, so every eps
    is in pixel units: an L2 radius over all C*H*W values, or an Linf bound (8/255 = 0.0314).
  * g(x) = model.features(x), the penultimate representation (B, D); logits = model.head(g(x)).
  * attacks keep x and delta in fp32; on CUDA only the model's forward pass runs under bf16 autocast.
  * every artifact (checkpoint, constructed dataset) is named by a hash of the settings that made it,
    written atomically and reused, so an interrupted run resumes and a changed setting never reuses
    a stale file.
Results go to OUT/results.json (one record per number) and OUT/results.md (the table, beside the
paper's numbers). Measured numbers, with hardware and wall times, are in README.md (so far CPU only:
mnist-fashion on real data, teacher 99.28%, students 94.7% / 93.2%, 3 seeds; the CIFAR-10 numbers
await a GPU run).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# =============================================================================================
# Config: one flat set of values; the CLI is generated from it (python advex.py --help)
# =============================================================================================

@dataclass
class Config:
    # where things are
    data: str = "data"            # dataset root in torchvision's layout: cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/
    out: str = "runs"             # results.json, results.md, artifacts/ (checkpoints, datasets), PNG figures
    download: bool = True         # try torchvision's download when dataset files are missing
    device: str = "auto"          # auto = cuda when available, else cpu
    seed: int = 0                 # seed of a single run
    seeds: str = ""               # comma list (e.g. 0,1,2): repeat the experiment; results.md shows mean ± std
    quick: bool = False           # tiny sizes (see QUICK) so every experiment runs on a CPU in seconds
    # models and training (the paper trains a ResNet-50 for 150 epochs; the fast net gets close in ~10)
    arch: str = "fastnet"         # CIFAR-10 model: fastnet | resnet18 | resnet50 | vgg16
    width: int = 64               # base channel width (fastnet: w, 4w, 4w; resnets: w..8w; vgg16: w..8w)
    n_train: int = 0              # use the first n training images (0 = all)
    n_test: int = 0               # evaluate on the first n test images (0 = all)
    epochs: int = 10              # epochs of standard training
    batch: int = 512              # training batch size
    lr: float = 0.2               # peak learning rate: linear warm-up over 20% of the steps, then linear to 0
    momentum: float = 0.9         # SGD with Nesterov momentum
    wd: float = 5e-4              # weight decay
    smoothing: float = 0.2        # label smoothing of the training loss (attacks always use plain cross-entropy)
    augment: bool = True          # CIFAR training augmentation: random crop with 4-px zero padding, horizontal flip
    # adversarial training (Ilyas et al. App. C / Madry et al. 2018): L2 PGD inside the training loop
    adv_epochs: int = 20          # epochs of adversarial training
    adv_eps: float = 0.5          # L2 radius, pixel units
    adv_steps: int = 7            # PGD steps per training batch
    adv_step: float = 0.1         # L2 step length; the highest-loss iterate is used
    # evaluation: robust accuracy under untargeted L2 PGD, step 2.5*eps/steps
    eval_eps: str = "0.25,0.5"    # L2 radii, comma list
    eval_steps: int = 20          # PGD steps
    eval_restarts: int = 1        # >1: extra random starts; an example is robust only if it survives all
    attack_batch: int = 4096      # images per PGD / inversion chunk (lower it when memory is short)
    # Ilyas Sec. 3.1: robust / non-robust datasets by representation inversion
    inv_steps: int = 1000         # L2-normalised gradient steps on ||g(z) - g(x)||_2
    inv_step: float = 0.1         # L2 step length, pixel units (no eps ball, only the [0,1] clamp)
    # Ilyas Sec. 3.2: relabelled adversarial datasets by targeted L2 PGD on the standard model
    rel_eps: float = 0.5          # L2 radius, pixel units
    rel_steps: int = 100          # PGD steps
    rel_step: float = 0.1         # L2 step length
    rel_lr: float = 0.02          # peak lr for training on D_rand (paper: 0.01 there vs 0.1 elsewhere, i.e. lr/10)
    dataset: str = ""             # train-on: folder with CIFAR_ims and CIFAR_lab (MadryLab's released layout)
    # Wallace's response: learning from a model's wrong labels
    mis_teacher_epochs: int = 2   # mislabeled: epochs of the weak teacher (response: ResNet-18, 2 epochs)
    mis_epochs: int = 50          # mislabeled: epochs of the student trained on the teacher's errors only
    mnist_epochs: int = 3         # mnist-fashion: epochs of the MNIST CNN teacher and of each student
    mnist_batch: int = 128        # mnist-fashion: batch size
    mnist_lr: float = 0.05        # mnist-fashion: peak learning rate (same one-cycle schedule)
    # Nakkiran's and Goh's responses
    bugs_k: int = 10              # bugs: ensemble size; costs K extra trainings and K+1 forward/backward passes per step
    squares_n: int = 10000        # squares: training images (the test set is a tenth of it)
    squares_epochs: int = 30      # squares: epochs of the network that memorises the noisy labels
    leak_eps: float = 0.5         # leakage: L2 radius of the robust linear classifier's adversarial training
    leak_epochs: int = 10         # leakage: epochs of that linear classifier
    leak_lr: float = 0.002        # leakage: its peak lr (a linear model on 3072 correlated pixels diverges at 0.2)


# --quick: sizes small enough for a CPU in seconds; the code path is the same as the full run.
QUICK = dict(n_train=200, n_test=100, width=8, epochs=2, adv_epochs=1, batch=50, adv_steps=2,
             eval_steps=3, attack_batch=64, inv_steps=5, rel_steps=5, mis_teacher_epochs=1, mis_epochs=2,
             mnist_epochs=1, mnist_batch=50, bugs_k=2, squares_n=400, squares_epochs=3, leak_epochs=2)


class AdvexError(Exception):
    """Bad input (missing data, wrong shapes, bad settings, NaN loss): the CLI prints it as one line, exit 2."""


def log(msg):
    print(msg, flush=True)


def seed_all(seed, stage=""):
    """The one seeding helper. Each stage gets its own stream, so a stage's output does not depend on
    whether the stages before it were trained now or loaded from disk."""
    torch.manual_seed(zlib.crc32(f"{stage}:{seed}".encode()))


def settings_key(settings):
    """Short hash of a settings dict: names artifacts, so changed settings never reuse a stale file."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def save_atomic(obj, path):
    """torch.save (or text for str) to a temporary name, then rename: an interrupt never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(obj, str):
        with open(tmp, "w") as f:
            f.write(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-object files all end here
        raise AdvexError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         f"delete it to rebuild") from None


def fmt_time(s):
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}m"


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


# =============================================================================================
# Data: each split loaded once into uint8 tensors; floats in [0,1] are made on the device per batch
# =============================================================================================

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def to_float(x):
    """uint8 [0,255] -> float32 [0,1]; fp16 / fp32 images (constructed datasets) -> float32 as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def load_cifar10(root, download=True):
    """CIFAR-10 from ROOT/cifar-10-batches-py (torchvision's layout), downloading it when missing and allowed.
    A copy whose md5 sums differ from the official ones but whose format is right (e.g. rebuilt from
    JPEGs by ../shared/data) is used with a warning. Returns uint8 (50000,3,32,32), int64 (50000,),
    uint8 (10000,3,32,32), int64 (10000,) on the CPU."""
    folder = os.path.join(root, "cifar-10-batches-py")
    files = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list  # [name, md5]
    missing = lambda: [n for n, _ in files if not os.path.isfile(os.path.join(folder, n))]
    if missing() and download:
        try:
            torchvision.datasets.CIFAR10(root, download=True)
        except Exception as e:
            log(f"advex: CIFAR-10 download failed ({type(e).__name__}); looking in {folder}")
    if missing():
        raise AdvexError(f"CIFAR-10 not found: {folder}/ lacks {', '.join(missing())} "
                         f"(needs data_batch_1..5 and test_batch; see README, 'Data')")
    if any(_md5(os.path.join(folder, n)) != md5 for n, md5 in files):
        log(f"advex: warning: CIFAR-10 in {folder} differs from the official md5 sums (a re-encoded copy?); using it")
    splits = []
    for names in (torchvision.datasets.CIFAR10.train_list, torchvision.datasets.CIFAR10.test_list):
        xs, ys = [], []
        for name, _ in names:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    d = pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles
                x = torch.as_tensor(d["data"], dtype=torch.uint8)
                y = torch.as_tensor(d["labels"], dtype=torch.int64)
            except Exception as e:
                raise AdvexError(f"corrupt CIFAR-10 file {path}: {type(e).__name__}: {e}") from None
            if x.dim() != 2 or x.shape[1] != 3072 or len(y) != len(x) or y.min() < 0 or y.max() > 9:
                raise AdvexError(f"corrupt CIFAR-10 file {path}: data {tuple(x.shape)}, {len(y)} labels")
            xs.append(x.view(-1, 3, 32, 32))
            ys.append(y)
        splits += [torch.cat(xs), torch.cat(ys)]
    return tuple(splits)


def load_mnist(root, fashion=False, download=True):
    """MNIST or Fashion-MNIST from ROOT/{MNIST,FashionMNIST}/raw (IDX files) through torchvision.
    Returns uint8 (60000,1,28,28), int64 (60000,), uint8 (10000,1,28,28), int64 (10000,)."""
    cls = torchvision.datasets.FashionMNIST if fashion else torchvision.datasets.MNIST
    raw = os.path.join(root, cls.__name__, "raw")
    out = []
    for train in (True, False):
        try:
            try:
                ds = cls(root, train=train, download=False)
            except RuntimeError:  # torchvision: "Dataset not found"
                if not download:
                    raise
                ds = cls(root, train=train, download=True)
            x, y = ds.data, ds.targets
        except Exception as e:
            raise AdvexError(f"{cls.__name__} not readable in {raw}/ (expected train-images-idx3-ubyte, "
                             f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte): "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:100]}") from None
        if x.dim() != 3 or x.shape[1:] != (28, 28) or len(x) != len(y) or y.min() < 0 or y.max() > 9:
            raise AdvexError(f"corrupt {cls.__name__} files in {raw}/: images {tuple(x.shape)}, {len(y)} labels")
        out += [x.unsqueeze(1).contiguous(), y.long()]
    return tuple(out)


def augment_batch(x, pad=4):
    """Random crop with `pad`-pixel zero padding and a random horizontal flip, per image, on x's device.
    x: (B, C, H, W) float -> (B, C, H, W). One gather instead of a Python loop over images."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device) + torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    cols = torch.where(torch.rand(B, 1, 1, device=x.device) < 0.5, W - 1 - cols, cols)  # flip
    cols = cols + torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device)
    return xp[torch.arange(B, device=x.device).view(B, 1, 1), :, rows, cols].permute(0, 3, 1, 2)  # (B,H,W,C) -> NCHW


# =============================================================================================
# Models: pixels in [0,1] -> normalise -> body -> g(x) (B, D) -> head -> logits (B, classes)
# =============================================================================================

class Net(nn.Module):
    """Base of every advex model: normalisation is part of the model, so attacks work in pixel space."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        if mean is not None:  # buffers travel with the state_dict, so a checkpoint knows its normalisation
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def normalize(self, x):
        return (x - self.mean) / self.std

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, act=nn.GELU, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act())


class FastNet(Net):
    """~2M-parameter CIFAR net in the spirit of airbench (Jordan 2024): a conv stem, then three blocks of
    conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (widths w, 4w, 4w), global max-pool."""

    def __init__(self, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(mean, std)
        w = (width, 4 * width, 4 * width)
        layers, cin = [conv_bn(3, width // 2)], width // 2
        for c in w:
            layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c), nn.GELU(),
                       conv_bn(c, c)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes, bias=False)

    def features(self, x):  # (B,3,32,32) -> (B,4w)
        # The 1/8 scale keeps early logits small, which fast schedules with large learning rates need
        # (airbench and Page's ResNet-9 scale their logits the same way); it does not change g's geometry.
        return self.body(self.normalize(x)).amax(dim=(2, 3)) / 8


class Block(nn.Module):
    """ResNet block (He et al. 2016): basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 with 4x expansion)."""

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

    def features(self, x):  # (B,3,32,32) -> (B,8w) or (B,32w)
        return self.body(self.normalize(x)).mean(dim=(2, 3))


class VGG(Net):
    """VGG-16 with BatchNorm (Simonyan & Zisserman 2015), CIFAR variant: 13 convs, one linear head."""

    def __init__(self, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__(mean, std)
        plan = [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"]  # widths in units of w
        layers, cin = [], 3
        for p in plan:
            if p == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, p * width, nn.ReLU))
                cin = p * width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def features(self, x):  # (B,3,32,32) -> (B,8w)
        return self.body(self.normalize(x)).flatten(1)


class MnistCNN(Net):
    """Small MNIST CNN (LeNet-like): conv5-pool-conv5-pool-fc128. Wallace's response: ~99.1% on MNIST."""

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


class BatchedLinear(nn.Module):
    """S independent linear layers applied at once: x (S*N, din) -> (S*N, dout), the s-th block of N rows
    through the s-th weight. Lets toy2d train one MLP per seed, 100 seeds in one batched matmul."""

    def __init__(self, S, din, dout):
        super().__init__()
        bound = 1 / math.sqrt(din)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(S, din, dout).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(S, 1, dout).uniform_(-bound, bound))

    def forward(self, x):
        S, din, dout = self.weight.shape
        return torch.baddbmm(self.bias, x.view(S, -1, din), self.weight).view(-1, dout)


class ToyMLP(Net):
    """2D MLP of the Wallace toy: 2 -> h -> h -> 2 with ReLU, one independent copy per seed (S copies).
    Inputs are points in the plane; no normalisation (they are already in [0,1])."""

    def __init__(self, S=1, hidden=64, classes=2):
        super().__init__()
        self.body = nn.Sequential(BatchedLinear(S, 2, hidden), nn.ReLU(), BatchedLinear(S, hidden, hidden), nn.ReLU())
        self.head = BatchedLinear(S, hidden, classes)

    def features(self, x):  # (S*N, 2) -> (S*N, h)
        return self.body(x)


ARCHS = ("fastnet", "resnet18", "resnet50", "vgg16")


def make_model(arch, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
    """A CIFAR-sized model by name (32x32x3 inputs in [0,1] unless mean/std say otherwise)."""
    if arch == "fastnet":
        return FastNet(width, classes, mean, std)
    if arch in ("resnet18", "resnet50"):
        return ResNet([2, 2, 2, 2] if arch == "resnet18" else [3, 4, 6, 3], arch == "resnet50", width, classes, mean, std)
    if arch == "vgg16":
        return VGG(width, classes, mean, std)
    if arch == "mnist_cnn":
        return MnistCNN(classes)
    if arch == "linear":
        return LinearNet(classes, mean=mean, std=std)
    raise AdvexError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def save_model(model, path, arch, settings):
    """Checkpoint = state_dict + arch + the settings that trained it (plain values: loads with weights_only)."""
    save_atomic({"state_dict": model.state_dict(), "arch": arch, "settings": json.dumps(settings)}, path)


def load_model(model, path, arch):
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise AdvexError(f"{path} is not an advex checkpoint; delete it to retrain")
    if ckpt.get("arch") != arch:
        raise AdvexError(f"{path} holds a {ckpt.get('arch')!r} model, not {arch!r}")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise AdvexError(f"{path} does not fit this {arch} model: {str(e).splitlines()[0][:120]}") from None
    return model


# =============================================================================================
# Attacks: projected gradient descent (Madry et al. 2018) in pixel space
# =============================================================================================

def autocast(device):
    """bf16 autocast for the model's forward pass on CUDA; a no-op on the CPU (fp32 there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def over_set(model, fn, x, batch=4096):
    """fn(x_batch) over a whole set in chunks, in eval mode (the model's mode is restored), under bf16
    autocast on CUDA. x: (N, ...) uint8 or float images -> torch.cat of fn's outputs."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = to_float(x[i:i + batch])
        with autocast(xb.device):
            out.append(fn(xb))
    model.train(was)
    return torch.cat(out)


def project(delta, eps, norm):
    """Per-example projection of delta (B, ...) onto the eps-ball of the given norm."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return delta * (eps / n).clamp(max=1.0)


def pgd(model, x, y, eps, steps, norm="l2", step=None, targeted=False, random_start=False, best=False,
        lo=0.0, hi=1.0, batch=4096, loss_fn=None, name=""):
    """Projected gradient ascent on a per-example loss, batch by batch (`batch` images at a time).

    x: (N, ...) images in [lo, hi] (uint8 or float); y: (N, ...) labels, targets, or whatever loss_fn takes.
    Default loss: cross-entropy of model(x_adv) against y, ascended (untargeted: y = true labels) or
    descended (targeted=True: y = targets). loss_fn(x_adv, y) -> (B,) replaces it (targeted is then ignored).
    Steps: L2 along the per-example normalised gradient, Linf along its sign; length `step`
    (default 2.5 * eps / steps). After each step: project onto the eps-ball around x, then clamp to
    [lo, hi]. best=True returns each example's highest-loss iterate instead of the last one.
    BatchNorm and dropout are in eval mode while attacking; the model's mode is restored afterwards.
    Returns x_adv: (N, ...) fp32 with ||x_adv - x|| <= eps per example and lo <= x_adv <= hi."""
    if not eps >= 0:
        raise AdvexError(f"pgd: eps must be >= 0, got {eps}")
    if steps < 1:
        raise AdvexError(f"pgd: steps must be >= 1, got {steps}")
    if norm not in ("l2", "linf"):
        raise AdvexError(f"pgd: norm must be 'l2' or 'linf', got {norm!r}")
    step = 2.5 * eps / steps if step is None else step
    if loss_fn is None:
        sign = -1.0 if targeted else 1.0
        loss_fn = lambda xa, t: sign * F.cross_entropy(model(xa).float(), t, reduction="none")
    was_training = model.training
    model.eval()
    progress = Progress(name, len(x)) if name else None
    try:
        out = []
        for i in range(0, len(x), batch):
            out.append(_pgd_batch(loss_fn, to_float(x[i:i + batch]), y[i:i + batch], eps, steps, step, norm,
                                  random_start, best, lo, hi))
            if progress:
                progress(i + len(out[-1]))
        return torch.cat(out) if out else to_float(x)
    finally:
        model.train(was_training)


def _pgd_batch(loss_fn, x, y, eps, steps, step, norm, random_start, best, lo, hi):
    view = (-1,) + (1,) * (x.dim() - 1)  # broadcast a per-example scalar over an image
    xa = x.clone()
    if random_start:  # uniform in the Linf box; for L2 a random direction at a uniform radius in [0, eps]
        r = torch.empty_like(x).uniform_(-1, 1) if norm == "linf" else torch.randn_like(x)
        if norm == "l2":
            r = r / r.flatten(1).norm(dim=1).view(view) * torch.rand(len(x), device=x.device).view(view)
        xa = (x + project(r * eps, eps, norm)).clamp(lo, hi)
    best_x, best_loss = xa.clone(), torch.full((len(x),), -math.inf, device=x.device)
    for i in range(steps + 1):
        xa.requires_grad_(True)
        with torch.enable_grad(), autocast(x.device):  # enable_grad: works when called under no_grad too
            loss = loss_fn(xa, y)  # (B,), fp32
            total = loss.sum()
        if best:
            better = loss.detach() > best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best_x[better] = xa.detach()[better]
        if i == steps:  # the last round only scores the final iterate
            break
        grad, = torch.autograd.grad(total, xa)
        with torch.no_grad():
            if norm == "l2":
                grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            else:
                grad = grad.sign()
            xa = (x + project(xa + step * grad - x, eps, norm)).clamp(lo, hi)
    return best_x if best else xa.detach()


def nontransferable_loss(target, members):
    """Nakkiran (Distill 2019): a PGD loss for adversarial examples that fool `target` towards t but not the
    independently trained `members`: -CE(target(x'), t) - mean_k CE(member_k(x'), y). Use with pgd(...,
    y=torch.stack([t, y], 1), loss_fn=...). The members are put in eval mode (pgd only sets target's)."""
    for m in members:
        m.eval()

    def loss(xa, ty):  # ty: (B, 2) = (target class, true class)
        fool = F.cross_entropy(target(xa).float(), ty[:, 0], reduction="none")
        keep = sum(F.cross_entropy(m(xa).float(), ty[:, 1], reduction="none") for m in members) / len(members)
        return -fool - keep

    return loss


# =============================================================================================
# Inversion: robust-feature datasets (Ilyas et al. Sec. 3.1)
# =============================================================================================

def features(model, x, batch=4096):
    """g(x) for a whole set, fp32: (N, ...) -> (N, D)."""
    return over_set(model, lambda xb: model.features(xb).float(), x, batch)


def invert(model, x, x0, steps, step, batch=4096, name=""):
    """Ilyas et al. Sec. 3.1: for each target x, find z in [0,1]^d whose representation matches x's,
    z = argmin ||g(z) - g(x)||_2, by L2-normalised gradient steps starting from x0 (no eps-ball, only the
    [0,1] clamp). This is PGD with an infinite radius on the loss -||g(z) - g(x)||^2 (the square has the
    same descent direction and a zero gradient at z = x, so x0 = x stays put), keeping each example's
    best iterate: fixed-length steps can overshoot once z is close, and the best is never worse than x0.
    x, x0: (N, C, H, W) in [0,1]. Returns z (N, C, H, W) fp32 and the relative distance
    ||g(z) - g(x)|| / ||g(x)|| (N,), the construction's quality."""
    gx = features(model, x, batch)  # (N, D)
    loss = lambda z, target: -(model.features(z).float() - target).pow(2).sum(dim=1)
    z = pgd(model, x0, gx, math.inf, steps, norm="l2", step=step, best=True, batch=batch, loss_fn=loss, name=name)
    rel = (features(model, z, batch) - gx).norm(dim=1) / gx.norm(dim=1).clamp_min(1e-12)
    return z, rel


def random_other(n, generator=None, device="cpu"):
    """For each i in 0..n-1 an index j != i drawn uniformly from the other n-1 (the start image x0 of
    inversion must be a *different* training image, Ilyas Sec. 3.1)."""
    return (torch.arange(n, device=device) + torch.randint(1, n, (n,), generator=generator, device=device)) % n


# =============================================================================================
# Relabelling (Ilyas et al. Sec. 3.2; Wallace's response)
# =============================================================================================

def relabel_targets(y, rule, classes=10):
    """Targets of the relabelled adversarial datasets, Ilyas Sec. 3.2.
    'det':  t = (y + 1) mod C, a deterministic shift: every robust feature now points to the wrong class.
    'rand': t ~ Uniform{0..C-1}, as the paper writes it, so t may equal y (about 1 in C). We keep the
            paper's choice: those examples carry their true label, which is part of what Goh's
            robust-feature-leakage response measures on D_rand."""
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


def save_dataset(path, images, labels, settings, **extra):
    """A constructed dataset: fp16 images (uint8 would round by 1/255, ~13% of an L2 eps of 0.5 spread
    over 3072 pixels' worth of small changes), int64 labels, the settings that made it, extra tensors."""
    if images.dim() != 4 or len(images) != len(labels):
        raise AdvexError(f"dataset {path}: images {tuple(images.shape)} and {len(labels)} labels do not match")
    save_atomic({"images": images.half().cpu(), "labels": labels.long().cpu(), "settings": json.dumps(settings),
                 **{k: v.cpu() for k, v in extra.items()}}, path)


def load_dataset(path):
    d = load_file(path)
    if not isinstance(d, dict) or not {"images", "labels", "settings"} <= set(d):
        raise AdvexError(f"{path} is not an advex dataset file; delete it to rebuild")
    d["settings"] = json.loads(d["settings"])
    return d


def load_released(folder):
    """A dataset in the layout MadryLab released for Ilyas et al.: FOLDER/CIFAR_ims (float images in
    [0,1], (N,3,32,32)) and FOLDER/CIFAR_lab ((N,) class indices), each a tensor or a list of tensors
    saved with torch.save. Returns float32 images and int64 labels on the CPU."""
    parts = []
    for name in ("CIFAR_ims", "CIFAR_lab"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise AdvexError(f"released dataset: {path} not found (expected CIFAR_ims and CIFAR_lab in {folder})")
        t = load_file(path)
        if isinstance(t, (list, tuple)) and t and all(isinstance(u, torch.Tensor) for u in t):
            t = torch.cat([u.reshape(-1, *u.shape[1:]) if u.dim() else u.view(1) for u in t])
        if not isinstance(t, torch.Tensor):
            raise AdvexError(f"released dataset: {path} holds {type(t).__name__}, not a tensor or list of tensors")
        parts.append(t)
    ims, lab = parts
    if ims.dim() != 4 or ims.shape[1:] != (3, 32, 32) or not ims.is_floating_point():
        raise AdvexError(f"released dataset: CIFAR_ims is {ims.dtype} {tuple(ims.shape)}, expected float (N,3,32,32)")
    if lab.dim() != 1 or len(lab) != len(ims) or lab.is_floating_point() and (lab != lab.round()).any():
        raise AdvexError(f"released dataset: CIFAR_lab is {lab.dtype} {tuple(lab.shape)}, expected ({len(ims)},) class indices")
    lab = lab.long()
    if not torch.isfinite(ims).all() or ims.min() < 0 or ims.max() > 1 or lab.min() < 0 or lab.max() > 9:
        raise AdvexError("released dataset: images must be finite in [0,1] and labels in 0..9")
    return ims.float(), lab


# =============================================================================================
# Training: SGD with Nesterov momentum and a one-cycle schedule; optional L2 PGD adversarial training
# =============================================================================================

def train(model, x, y, epochs, batch, lr, momentum=0.9, wd=5e-4, smoothing=0.0, augment=False,
          adv_eps=0.0, adv_steps=7, adv_step=0.1, name="train"):
    """Train in place. x: (N, C, H, W) uint8 or float in [0,1] on the training device; y: (N,) int64.
    adv_eps > 0: adversarial training (Madry et al. 2018; Ilyas et al. App. C): each batch is replaced by
    its highest-loss L2 PGD iterate (adv_steps steps of adv_step). The learning rate rises linearly to
    `lr` over the first 20% of the steps and falls linearly to 0, which reaches good accuracy in few
    epochs. The final weights are returned; no checkpoint is ever chosen on test data."""
    dev, N = x.device, len(x)
    steps_per_epoch = max(1, N // batch)  # the ragged last batch is dropped (a batch of 1 breaks BatchNorm)
    batch, total = min(batch, N), epochs * steps_per_epoch
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
                xb = augment_batch(xb)
            if adv_eps > 0:
                xb = pgd(model, xb, yb, adv_eps, adv_steps, step=adv_step, best=True, batch=len(xb))
            with autocast(dev):
                loss = F.cross_entropy(model(xb).float(), yb, label_smoothing=smoothing)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), s + 1, first_bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            s += 1
            if s == total or i == steps_per_epoch - 1 or time.time() - progress.last > progress.every:
                if first_bad.item() > 0:
                    raise AdvexError(f"{name}: the training loss became NaN/inf at step {first_bad.item()} "
                                     f"of {total} (lr {lr}); lower --lr or check the data")
                if i == steps_per_epoch - 1:
                    progress.last = 0  # always print at an epoch's end
                progress(s * batch, f" | step {s}/{total} epoch {epoch + 1}/{epochs} loss {loss_sum.item() / (i + 1):.3f}")
        loss_sum.zero_()
    model.eval()
    return model


# =============================================================================================
# Evaluation
# =============================================================================================

def predict(model, x, batch=4096):
    """Argmax predictions (N,)."""
    return over_set(model, lambda xb: model(xb).argmax(dim=1), x, batch)


def accuracy(model, x, y, batch=4096):
    return (predict(model, x, batch) == y).float().mean().item()


def robust_accuracy(model, x, y, eps, steps, restarts=1, norm="l2", batch=4096):
    """Share of examples classified correctly under untargeted PGD (step 2.5*eps/steps). Restart 0 starts at
    x; each further restart starts at a random point of the ball; an example counts only if it survives all."""
    ok = torch.ones(len(x), dtype=torch.bool, device=y.device)
    for r in range(restarts):
        xa = pgd(model, x, y, eps, steps, norm=norm, random_start=r > 0, batch=batch)
        ok &= predict(model, xa, batch) == y
    return ok.float().mean().item()


@torch.no_grad()
def linear_certified_accuracy(model, x, y, r):
    """Goh: the share of examples a LinearNet classifies correctly with a margin that no L2 perturbation of
    radius r (pixel units) can undo. Logits f(x) = W (x - m) / s + b, so a perturbation d changes
    f_y - f_j by (w_y - w_j) . (d / s), at most r * ||(w_y - w_j) / s||_2 (Cauchy-Schwarz, attained)."""
    W = model.head.weight / model.std.expand(1, *x.shape[1:]).flatten(1)  # (C, D): the weights in pixel units
    f = model(to_float(x)).float()  # (N, C)
    margin = f.gather(1, y[:, None]) - f  # (N, C), 0 at j = y
    reach = r * (W[y][:, None, :] - W[None, :, :]).norm(dim=2)  # (N, C), 0 at j = y
    safe = (margin > reach) | (torch.arange(f.shape[1], device=y.device) == y[:, None])
    return safe.all(dim=1).float().mean().item()


def attack_settings(eps, steps, restarts, norm="l2"):
    return dict(norm=norm, eps=eps, steps=steps, step=round(2.5 * eps / steps, 6), restarts=restarts)


def evaluate(cfg, model, x, y):
    """Standard accuracy and robust accuracy at each eps of cfg.eval_eps, with the attack settings:
    [(metric, value %, settings)]."""
    out = [("standard acc", 100 * accuracy(model, x, y, cfg.attack_batch), {})]
    for eps in parse_floats(cfg.eval_eps):
        acc = robust_accuracy(model, x, y, eps, cfg.eval_steps, cfg.eval_restarts, batch=cfg.attack_batch)
        out.append((f"robust acc L2 {eps:g}", 100 * acc, attack_settings(eps, cfg.eval_steps, cfg.eval_restarts)))
    return out


# =============================================================================================
# Results: OUT/results.json (every record) and OUT/results.md (the table beside the paper)
# =============================================================================================

def record(cfg, experiment, metric, value, paper=None, arch=None, **settings):
    return dict(experiment=experiment, metric=metric, value=round(float(value), 4), paper=paper,
                seed=cfg.seed, arch=(arch or cfg.arch) + (" quick" if cfg.quick else ""), settings=settings)


def write_results(out, records):
    """Merge records into OUT/results.json (a rerun replaces its own earlier records) and rewrite
    OUT/results.md: one row per experiment, metric and arch, mean ± std over seeds."""
    path = os.path.join(out, "results.json")
    old = json.load(open(path)) if os.path.isfile(path) else []
    key = lambda r: (r["experiment"], r["metric"], r["arch"], r["seed"])
    new_keys = {key(r) for r in records}
    allr = [r for r in old if key(r) not in new_keys] + records
    save_atomic(json.dumps(allr, indent=1), path)
    groups = {}
    for r in allr:
        groups.setdefault(key(r)[:3], []).append(r)
    lines = ["| experiment | metric | arch | ours | n | paper | settings |", "|---|---|---|---|---|---|---|"]
    for (exp, metric, arch), rs in groups.items():
        v = torch.tensor([r["value"] for r in rs], dtype=torch.float64)
        ours = f"{v.mean():.2f}" + (f" ± {v.std():.2f}" if len(v) > 1 else "")
        paper = "" if rs[-1]["paper"] is None else f"{rs[-1]['paper']:g}"
        sets = ", ".join(f"{k} {v}" for k, v in rs[-1]["settings"].items())
        lines.append(f"| {exp} | {metric} | {arch} | {ours} | {len(v)} | {paper} | {sets} |")
    table = "\n".join(lines) + "\n"
    save_atomic(table, os.path.join(out, "results.md"))
    return table


def parse_floats(s):
    return [float(v) for v in str(s).split(",") if v.strip()]


# =============================================================================================
# Experiments. Each takes (cfg, device) and returns records; main() writes them.
# =============================================================================================

def cifar(cfg, dev):
    """CIFAR-10 on the device: uint8 images (N,3,32,32), int64 labels; cfg.n_train / n_test subsets."""
    xtr, ytr, xte, yte = load_cifar10(cfg.data, cfg.download)
    ntr, nte = cfg.n_train or len(xtr), cfg.n_test or len(xte)
    return xtr[:ntr].to(dev), ytr[:ntr].to(dev), xte[:nte].to(dev), yte[:nte].to(dev)


def train_settings(cfg, adversarial=False, **over):
    """Everything that determines a trained CIFAR model; its hash names the checkpoint."""
    s = dict(arch=cfg.arch, width=cfg.width, seed=cfg.seed, n_train=cfg.n_train, batch=cfg.batch, lr=cfg.lr,
             momentum=cfg.momentum, wd=cfg.wd, smoothing=cfg.smoothing, augment=cfg.augment,
             epochs=cfg.adv_epochs if adversarial else cfg.epochs)
    if adversarial:
        s.update(adv_eps=cfg.adv_eps, adv_steps=cfg.adv_steps, adv_step=cfg.adv_step)
    s.update(over)
    return s


def trained(cfg, dev, name, x, y, settings):
    """Train a fresh cfg.arch model on (x, y) with `settings` (see train_settings), or load the checkpoint
    those settings already produced. Returns the model in eval mode on dev."""
    path = os.path.join(cfg.out, "artifacts", f"{name}-{settings['arch']}-s{cfg.seed}-{settings_key(settings)}.pt")
    model = make_model(settings["arch"], settings["width"], settings.get("classes", 10),
                       *settings.get("norm", (CIFAR_MEAN, CIFAR_STD))).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if os.path.isfile(path):
        log(f"[{name}] loading {path}")
        return load_model(model, path, settings["arch"]).eval()
    seed_all(cfg.seed, name)
    t0 = time.time()
    train(model, x, y, settings["epochs"], settings["batch"], settings["lr"], settings["momentum"], settings["wd"],
          settings["smoothing"], settings["augment"], settings.get("adv_eps", 0.0), settings.get("adv_steps", 0),
          settings.get("adv_step", 0.0), name=name)
    log(f"[{name}] trained in {fmt_time(time.time() - t0)}; saved {path}")
    save_model(model, path, settings["arch"], settings)
    return model


# Ilyas et al. (Table/Fig. 2, Sec. 3): the standard and the L2 adversarially trained (robust) model.
PAPER = {("standard", "standard acc"): 95.3, ("standard", "robust acc L2 0.25"): 4.5,
         ("robust", "standard acc"): 90.8, ("robust", "robust acc L2 0.25"): 82.3,
         ("d_r", "standard acc"): 84.10, ("d_r", "robust acc L2 0.25"): 48.27,
         ("d_nr", "standard acc"): 87.68, ("d_nr", "robust acc L2 0.25"): 0.82,
         ("d_rand", "standard acc"): 63.3, ("d_det", "standard acc"): 43.7}


def eval_records(cfg, experiment, model, xte, yte, **extra):
    return [record(cfg, experiment, m, v, PAPER.get((experiment, m)), **s, **extra)
            for m, v, s in evaluate(cfg, model, xte, yte)]


def standard_model(cfg, dev, data):
    return trained(cfg, dev, "standard", data[0], data[1], train_settings(cfg))


def robust_model(cfg, dev, data):
    return trained(cfg, dev, "robust", data[0], data[1], train_settings(cfg, adversarial=True))


def exp_standard(cfg, dev):
    """Ilyas et al.: a standard CIFAR-10 model on D (paper, ResNet-50: 95.3% standard, 4.5% robust)."""
    data = cifar(cfg, dev)
    t0 = time.time()
    model = standard_model(cfg, dev, data)
    return eval_records(cfg, "standard", model, data[2], data[3], wall_s=round(time.time() - t0, 1))


def exp_robust(cfg, dev):
    """Ilyas et al.: L2 adversarial training, eps 0.5, 7 steps of 0.1 (paper: 90.8% standard, 82.3% at 0.25)."""
    data = cifar(cfg, dev)
    t0 = time.time()
    model = robust_model(cfg, dev, data)
    return eval_records(cfg, "robust", model, data[2], data[3], wall_s=round(time.time() - t0, 1))


def save_grid(path, rows, row_names, col_names, scale=3):
    """PNG of image rows (each (n, C, H, W) in [0,1]) with row names on the left and column names on top."""
    from PIL import Image, ImageDraw
    n = len(rows[0])
    grid = torchvision.utils.make_grid(torch.cat([r.float().cpu() for r in rows]).clamp(0, 1), nrow=n, padding=2,
                                       pad_value=1.0)
    im = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    left, top = 90, 16
    canvas = Image.new("RGB", (im.width + left, im.height + top), "white")
    canvas.paste(im, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell = im.width / n
    for j, c in enumerate(col_names):
        draw.text((left + j * cell + 4, 2), str(c)[:10], fill="black")
    for i, r in enumerate(row_names):
        draw.text((4, top + (i + 0.45) * im.height / len(rows)), r, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def construct(cfg, name, settings, build):
    """A constructed dataset named by its settings: load it if it exists, else build() -> (images, labels,
    info dict of tensors), save (fp16 images, int64 labels, settings) and return the dict."""
    path = os.path.join(cfg.out, "artifacts", f"{name}-{settings['arch']}-s{cfg.seed}-{settings_key(settings)}.pt")
    if os.path.isfile(path):
        log(f"[{name}] loading {path}")
        return load_dataset(path)
    t0 = time.time()
    images, labels, info = build()
    info["wall_s"] = torch.tensor(time.time() - t0)
    save_dataset(path, images, labels, settings, **info)
    log(f"[{name}] built in {fmt_time(time.time() - t0)}; saved {path}")
    return load_dataset(path)


def build_inverted(cfg, dev, data, name):
    """D_R (name 'd_r', g of the robust model) or D_NR ('d_nr', g of the standard model), Ilyas Sec. 3.1."""
    robust = name == "d_r"
    src_settings = train_settings(cfg, adversarial=robust)
    settings = dict(source=src_settings, arch=cfg.arch, inv_steps=cfg.inv_steps, inv_step=cfg.inv_step)

    def build():
        src = (robust_model if robust else standard_model)(cfg, dev, data)
        x, y = data[0], data[1]
        seed_all(cfg.seed, name)  # after the source model, which may have consumed random numbers training
        j = random_other(len(x), device=x.device)  # start image: a different training image, drawn at random
        z, rel = invert(src, x, x[j], cfg.inv_steps, cfg.inv_step, cfg.attack_batch, name=f"invert {name}")
        return z, y, dict(start=j, rel_dist=rel)

    return construct(cfg, name, settings, build)


def build_relabelled(cfg, dev, data, name):
    """D_rand ('d_rand') or D_det ('d_det'), Ilyas Sec. 3.2: targeted L2 PGD on the standard model towards
    t, relabelled t. Records the fooling rate: the share of images the source model classifies as t."""
    settings = dict(source=train_settings(cfg), arch=cfg.arch, rel_eps=cfg.rel_eps, rel_steps=cfg.rel_steps,
                    rel_step=cfg.rel_step)

    def build():
        src = standard_model(cfg, dev, data)
        x, y = data[0], data[1]
        seed_all(cfg.seed, name)  # after the source model, which may have consumed random numbers training
        t = relabel_targets(y, name.removeprefix("d_"))
        xa = pgd(src, x, t, cfg.rel_eps, cfg.rel_steps, step=cfg.rel_step, targeted=True, batch=cfg.attack_batch,
                 name=f"pgd {name}")
        fooled = predict(src, xa, cfg.attack_batch) == t
        return xa, t, dict(true=y, fooled=fooled)

    return construct(cfg, name, settings, build)


def dataset_grid(cfg, name, data, ds, n=10):
    """PNG: original x, start x0 (inversions only), constructed image; columns named by label."""
    x, y = data[0], data[1]
    idx = torch.arange(min(n, len(x)))
    rows, names = [to_float(x[idx])], ["original x"]
    if "start" in ds:
        rows.append(to_float(x[ds["start"][idx].to(x.device)]))
        names.append("start x0")
    rows.append(ds["images"][idx].float())
    names.append(f"{name} image")
    cols = [f"{CIFAR_CLASSES[a]}>{CIFAR_CLASSES[b]}" if a != b else CIFAR_CLASSES[a]
            for a, b in zip(y[idx].tolist(), ds["labels"][idx].tolist())]
    save_grid(os.path.join(cfg.out, f"{name}.png"), rows, names, cols)


def exp_constructed(cfg, dev, name):
    """Build one of D_R, D_NR, D_rand, D_det, train a fresh cfg.arch model on it with standard training, and
    evaluate it on the real CIFAR-10 test set (Ilyas et al. Sec. 3.1 / 3.2, Table 1 / Fig. 2)."""
    data = cifar(cfg, dev)
    ds = (build_inverted if name in ("d_r", "d_nr") else build_relabelled)(cfg, dev, data, name)
    dataset_grid(cfg, name, data, ds)
    recs = [record(cfg, name, "construction wall s", ds["wall_s"].item())]
    if "rel_dist" in ds:
        rel = ds["rel_dist"].float()
        recs += [record(cfg, name, "inversion rel. dist mean", rel.mean().item(), steps=cfg.inv_steps, step=cfg.inv_step),
                 record(cfg, name, "inversion rel. dist p95", rel.quantile(0.95).item())]
    else:
        recs.append(record(cfg, name, "fooling rate", 100 * ds["fooled"].float().mean().item(),
                           eps=cfg.rel_eps, steps=cfg.rel_steps, step=cfg.rel_step))
    # Training recipe on the constructed sets (paper Sec. 3.2 / App. C): D_rand at lr/10, D_det without
    # augmentation (its labels depend on the exact perturbation); D_R / D_NR as standard training.
    over = dict(data=name, data_key=settings_key(ds["settings"]))
    if name == "d_rand":
        over["lr"] = cfg.rel_lr
    if name == "d_det":
        over["augment"] = False
    t0 = time.time()
    model = trained(cfg, dev, f"{name}-model", ds["images"].to(dev), ds["labels"].to(dev), train_settings(cfg, **over))
    recipe = dict(lr=over.get("lr", cfg.lr), augment=over.get("augment", cfg.augment), epochs=cfg.epochs)
    return recs + eval_records(cfg, name, model, data[2], data[3], train_wall_s=round(time.time() - t0, 1), **recipe)


def exp_train_on(cfg, dev):
    """Train a fresh model on a released dataset folder (CIFAR_ims / CIFAR_lab, e.g. MadryLab's d_robust_CIFAR)
    and evaluate it on the real CIFAR-10 test set, so our constructions can be compared with theirs."""
    if not cfg.dataset:
        raise AdvexError("train-on needs --dataset DIR (a folder with CIFAR_ims and CIFAR_lab)")
    ims, lab = load_released(cfg.dataset)
    data = cifar(cfg, dev)
    ims, lab = ims[:cfg.n_train or len(ims)], lab[:cfg.n_train or len(lab)]
    files = [os.path.join(cfg.dataset, n) for n in ("CIFAR_ims", "CIFAR_lab")]
    key = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]  # the checkpoint's data
    model = trained(cfg, dev, "train-on", ims.to(dev), lab.to(dev), train_settings(cfg, data=key, n_data=len(ims)))
    return eval_records(cfg, f"train-on {os.path.basename(os.path.normpath(cfg.dataset))}", model, data[2], data[3])


def exp_ilyas(cfg, dev):
    """Ilyas et al. Sec. 3 end to end: both source models, D_R, D_NR, D_rand, D_det, four fresh models."""
    recs = []
    for exp in (exp_standard, exp_robust):
        t0 = time.time()
        recs += exp(cfg, dev)
        log(f"[ilyas] {exp.__name__[4:]}: {fmt_time(time.time() - t0)}")
    for name in ("d_r", "d_nr", "d_rand", "d_det"):
        t0 = time.time()
        recs += exp_constructed(cfg, dev, name)
        log(f"[ilyas] {name}: {fmt_time(time.time() - t0)}")
    return recs


def exp_mislabeled(cfg, dev):
    """Wallace (Distill 2019): a weak teacher (2 epochs) relabels the CIFAR-10 training set with its own
    predictions; only the images it gets *wrong* are kept; a fresh model trained on them alone is tested
    on the real test set. Response (ResNet-18): teacher 62.5% train / 63.1% test, 18,768 kept, 49.7%."""
    x, y, xte, yte = cifar(cfg, dev)
    tset = train_settings(cfg, epochs=cfg.mis_teacher_epochs)
    teacher = trained(cfg, dev, "mislabeled-teacher", x, y, tset)
    xk, yk, keep = keep_wrong(teacher, x, y, cfg.attack_batch)
    log(f"[mislabeled] kept {len(xk)} of {len(x)} training images, all labelled with the teacher's wrong class")
    student = trained(cfg, dev, "mislabeled-student", xk, yk,
                      train_settings(cfg, epochs=cfg.mis_epochs, data="teacher-wrong", teacher=settings_key(tset)))
    e = "mislabeled"
    return [record(cfg, e, "teacher train acc", 100 * (1 - keep.float().mean().item()), 62.5, epochs=cfg.mis_teacher_epochs),
            record(cfg, e, "teacher test acc", 100 * accuracy(teacher, xte, yte, cfg.attack_batch), 63.1),
            record(cfg, e, "kept (wrong) images", len(xk), 18768 if len(x) == 50000 else None, of=len(x)),
            record(cfg, e, "student test acc", 100 * accuracy(student, xte, yte, cfg.attack_batch), 49.7,
                   epochs=cfg.mis_epochs)]


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
    """Wallace (Distill 2019): an MNIST CNN labels the Fashion-MNIST training images (their own labels are
    never read); a fresh CNN trained on those pairs is tested on MNIST. Response: teacher 99.1%, student
    91.04% (Fashion normalised with its own statistics), 94.5% (with MNIST's)."""
    xm, ym, xmt, ymt = (t.to(dev) for t in load_mnist(cfg.data, False, cfg.download))
    xf = load_mnist(cfg.data, True, cfg.download)[0].to(dev)  # images only: Fashion's labels are not used
    n = cfg.n_train or len(xm)
    xm, ym, xf, xmt, ymt = xm[:n], ym[:n], xf[:n], xmt[:cfg.n_test or len(xmt)], ymt[:cfg.n_test or len(ymt)]
    mnist = dict(arch="mnist_cnn", width=0, seed=cfg.seed, n_train=n, batch=cfg.mnist_batch, lr=cfg.mnist_lr,
                 momentum=cfg.momentum, wd=cfg.wd, smoothing=0.0, augment=False, epochs=cfg.mnist_epochs)
    teacher = trained(cfg, dev, "mnist-teacher", xm, ym, mnist)
    e = "mnist-fashion"
    recs = [record(cfg, e, "teacher MNIST test acc", 100 * accuracy(teacher, xmt, ymt), 99.1, "mnist_cnn",
                   epochs=cfg.mnist_epochs)]
    for variant, paper in (("own", 91.04), ("mnist", 94.5)):
        xv = fashion_as_mnist(xf, variant)
        labels = predict(teacher, xv)  # the teacher's argmax labels on Fashion images
        hist = torch.bincount(labels, minlength=10).tolist()
        log(f"[{e}] Fashion-MNIST relabelled by the MNIST teacher ({variant} statistics): label histogram {hist}")
        student = trained(cfg, dev, f"mnist-student-{variant}", xv, labels,
                          dict(mnist, data=f"fashion-{variant}", teacher=settings_key(mnist)))
        recs.append(record(cfg, e, f"student MNIST test acc ({variant} stats)", 100 * accuracy(student, xmt, ymt),
                           paper, "mnist_cnn", label_hist=hist, epochs=cfg.mnist_epochs))
    return recs


def exp_bugs(cfg, dev):
    """Nakkiran, "Adversarial Examples are Just Bugs, Too" (Distill 2019): adversarial examples made *not* to
    transfer. Targeted PGD towards t = (y + 1) mod 10 on the target (the standard model) while an ensemble of
    K independently trained models is kept on y: ascend -CE(target(x'), t) - mean_k CE(ens_k(x'), y).
    Beside plain targeted PGD with the same budget, report the attack success on the target, the transfer to
    a fresh model, and a fresh model trained on the D_det-style set (x', t): test accuracy on the true and on
    the shifted labels. These "bugs" carry no features that generalise; plain PGD examples do."""
    data = cifar(cfg, dev)
    x, y, xte, yte = data
    target = standard_model(cfg, dev, data)
    members = [trained(cfg, dev, f"bugs-member{k}", x, y, train_settings(cfg, member=k)) for k in range(cfg.bugs_k)]
    fresh = trained(cfg, dev, "bugs-fresh", x, y, train_settings(cfg, member="fresh"))
    t = (y + 1) % 10
    paper = {("l2", "pgd"): (82.5, 33.2, 27.3), ("l2", "bugs"): (1.7, 2.8, 70.8),
             ("linf", "pgd"): (52.1, 23.7, 40.4), ("linf", "bugs"): (0.8, 2.5, 75.9)}

    recs = []
    for norm, eps, step in (("l2", 2.5, 0.5), ("linf", 8 / 255, 2 / 255)):
        for method in ("pgd", "bugs"):
            name = f"bugs-{norm}-{method}"
            settings = dict(source=train_settings(cfg), arch=cfg.arch, norm=norm, eps=eps, step=step, steps=10,
                            method=method, k=cfg.bugs_k if method == "bugs" else 0)

            def build():
                seed_all(cfg.seed, name)
                if method == "pgd":
                    xa = pgd(target, x, t, eps, 10, norm, step, targeted=True, batch=cfg.attack_batch, name=name)
                else:
                    xa = pgd(target, x, torch.stack([t, y], 1), eps, 10, norm, step, batch=cfg.attack_batch,
                             loss_fn=nontransferable_loss(target, members), name=name)
                return xa, t, {}

            ds = construct(cfg, name, settings, build)
            xa = ds["images"].to(dev)
            success = 100 * (predict(target, xa, cfg.attack_batch) == t).float().mean().item()
            transfer = 100 * (predict(fresh, xa, cfg.attack_batch) == t).float().mean().item()
            model = trained(cfg, dev, f"{name}-model", xa, t, train_settings(cfg, augment=False, data=name,
                                                                             data_key=settings_key(settings)))
            true = 100 * accuracy(model, xte, yte, cfg.attack_batch)
            shifted = 100 * accuracy(model, xte, (yte + 1) % 10, cfg.attack_batch)
            p = paper[(norm, method)]
            e = f"bugs {norm} {method}"
            recs += [record(cfg, e, "attack success on target", success, None, norm=norm, eps=round(eps, 5),
                            steps=10, step=round(step, 5), k=settings["k"]),
                     record(cfg, e, "transfer to fresh model", transfer, p[0]),
                     record(cfg, e, "trained-on: test acc, true labels", true, p[1]),
                     record(cfg, e, "trained-on: test acc, shifted labels", shifted, p[2])]
    return recs


def squares_data(n, flip=0.1, noise=0.1, size=32, generator=None):
    """Nakkiran's adversarial squares: a sign s = +-1 per image; the image is s everywhere plus uniform noise
    in [-noise, noise] per pixel, so it lives in [-1-noise, 1+noise], not [0,1]; the label is (s > 0),
    flipped with probability `flip`. Every useful feature is robust. Returns (n,3,size,size) float32, (n,)."""
    s = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    x = s.view(n, 1, 1, 1) + (torch.rand(n, 3, size, size, generator=generator) * 2 - 1) * noise
    y = ((s > 0) ^ (torch.rand(n, generator=generator) < flip)).long()
    return x, y


def exp_squares(cfg, dev):
    """Nakkiran: on adversarial squares a linear classifier (the sign of the mean pixel) is robust up to
    Linf 0.9, yet a network that memorises the noisy labels (~99.9% train accuracy) is flipped by Linf 0.01
    on most test points, while the same network stopped after one epoch is robust. The attack clamps to
    [-1.1, 1.1], the images' range."""
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = (t.to(dev) for t in squares_data(cfg.squares_n, generator=g))
    xte, yte = (t.to(dev) for t in squares_data(max(cfg.squares_n // 10, 100), generator=g))
    lo, hi = -1.1, 1.1

    def flips(m, eps):  # share of test points whose prediction Linf PGD changes (attacking the model's own label)
        clean = predict(m, xte)
        adv = pgd(m, xte, clean, eps, 10, "linf", lo=lo, hi=hi, batch=cfg.attack_batch)
        return 100 * (predict(m, adv) != clean).float().mean().item()

    linear = LinearNet(2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).to(dev)
    with torch.no_grad():  # logit_1 - logit_0 = 2 * mean pixel: each pixel keeps its sign under Linf < 0.9
        linear.head.weight.copy_(torch.stack([-torch.ones(x[0].numel()), torch.ones(x[0].numel())]).to(dev) / x[0].numel())
        linear.head.bias.zero_()
    e = "squares"
    recs = [record(cfg, e, "linear: test acc", 100 * accuracy(linear, xte, yte), None, "linear"),
            record(cfg, e, "linear: flipped by Linf 0.89", flips(linear, 0.89), 0, "linear", norm="linf", eps=0.89, steps=10)]
    for epochs, what in ((cfg.squares_epochs, "memorising"), (1, "1 epoch")):
        s = train_settings(cfg, epochs=epochs, augment=False, smoothing=0.0, wd=0.0, n_train=cfg.squares_n, classes=2,
                           norm=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), data="squares")
        m = trained(cfg, dev, f"squares-{epochs}ep", x, y, s)
        recs += [record(cfg, e, f"net {what}: train acc", 100 * accuracy(m, x, y), 99.9 if epochs > 1 else None, epochs=epochs),
                 record(cfg, e, f"net {what}: test acc", 100 * accuracy(m, xte, yte)),
                 record(cfg, e, f"net {what}: flipped by Linf 0.01", flips(m, 0.01), None, norm="linf", eps=0.01, steps=10)]
    return recs


def fit_linear(f, y, steps=500, lr=0.05):
    """Multinomial logistic regression on standardised features, full batch (Adam). f: (N, D) -> a function
    mapping features to logits."""
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    lin = nn.Linear(f.shape[1], 10).to(f.device)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    z = (f - mu) / sd
    for _ in range(steps):
        loss = F.cross_entropy(lin(z), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda h: lin((h - mu) / sd)


def exp_leakage(cfg, dev):
    """Goh, "Robust Feature Leakage" (Distill 2019): the 10 linear features of a robust linear classifier
    (L2 adversarial training), certified useful within L2 0.25, carry information into D_rand but not D_det:
    a linear model on those features trained on D_rand reaches 23.5% on the real test set, on D_det 6.81%."""
    data = cifar(cfg, dev)
    x, y, xte, yte = data
    lin = trained(cfg, dev, "leakage-linear", x, y, train_settings(
        cfg, arch="linear", width=0, epochs=cfg.leak_epochs, lr=cfg.leak_lr, augment=False, smoothing=0.0, adv_eps=cfg.leak_eps,
        adv_steps=cfg.adv_steps, adv_step=2.5 * cfg.leak_eps / cfg.adv_steps))
    e = "leakage"
    feats = lambda imgs: over_set(lin, lambda xb: lin(xb).float(), imgs, cfg.attack_batch)  # (N, 10): its features
    recs = [record(cfg, e, "robust linear: test acc", 100 * accuracy(lin, xte, yte), None, "linear", adv_eps=cfg.leak_eps),
            record(cfg, e, "robust linear: certified acc L2 0.25", 100 * linear_certified_accuracy(lin, xte, yte, 0.25),
                   None, "linear")]
    with torch.enable_grad():
        head = fit_linear(feats(x), y)
    recs.append(record(cfg, e, "linear on features, trained on D", 100 * (head(feats(xte)).argmax(1) == yte).float().mean().item(),
                       None, "linear"))
    for name, paper in (("d_rand", 23.5), ("d_det", 6.81)):
        ds = build_relabelled(cfg, dev, data, name)
        with torch.enable_grad():
            head = fit_linear(feats(ds["images"].to(dev)), ds["labels"].to(dev))
        acc = 100 * (head(feats(xte)).argmax(1) == yte).float().mean().item()
        recs.append(record(cfg, e, f"linear on features, trained on {name}", acc, paper, "linear"))
    return recs


def scatter(path, points, xlabel, ylabel, size=360):
    """PNG scatter plot of labelled (x, y) points, both axes 0-100, with PIL."""
    from PIL import Image, ImageDraw
    pad = 40
    im = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    d = ImageDraw.Draw(im)
    to = lambda u, v: (pad + u / 100 * size, pad + (1 - v / 100) * size)
    d.rectangle([to(0, 100), to(100, 0)], outline="black")
    for k in range(0, 101, 20):
        d.text((to(k, 0)[0] - 6, pad + size + 4), str(k), fill="black")
        d.text((pad - 22, to(0, k)[1] - 5), str(k), fill="black")
    d.text((pad + size / 2 - 60, pad + size + 20), xlabel, fill="black")
    d.text((4, 8), ylabel, fill="black")
    for label, u, v in points:
        (a, b) = to(u, v)
        d.ellipse([a - 4, b - 4, a + 4, b + 4], fill=(33, 113, 181))
        d.text((a + 6, b - 6), label, fill="black")
    im.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def exp_transfer(cfg, dev):
    """Ilyas Fig. 3: architectures that learn more from the source's D_det are those its adversarial
    examples transfer to. For each architecture: test accuracy after training on D_det (built on the
    standard cfg.arch model), and the share of D_det's targeted examples that an independently trained
    standard model of that architecture classifies as the target."""
    data = cifar(cfg, dev)
    x, y, xte, yte = data
    ds = build_relabelled(cfg, dev, data, "d_det")
    xa, t = ds["images"].to(dev), ds["labels"].to(dev)
    paper = {"resnet18": (41, 92), "resnet50": (45, 100), "vgg16": (28, 66)}
    recs, points = [], []
    for arch in ARCHS:
        std = trained(cfg, dev, "transfer-standard" if arch == cfg.arch else "standard", x, y, train_settings(
            cfg, arch=arch, **({"member": "transfer"} if arch == cfg.arch else {})))
        transfer = 100 * (predict(std, xa, cfg.attack_batch) == t).float().mean().item()
        model = trained(cfg, dev, "d_det-model", xa, t, train_settings(cfg, arch=arch, augment=False, data="d_det",
                                                                       data_key=settings_key(ds["settings"])))
        acc = 100 * accuracy(model, xte, yte, cfg.attack_batch)
        p = paper.get(arch, (None, None))
        recs += [record(cfg, "transfer", "D_det-trained test acc", acc, p[0], arch, source=cfg.arch),
                 record(cfg, "transfer", "transfer rate of source's examples", transfer, p[1], arch, source=cfg.arch)]
        points.append((arch, transfer, acc))
    scatter(os.path.join(cfg.out, "transfer.png"), points, "transfer rate (%)", "test acc after training on D_det (%)")
    return recs


EXPERIMENTS = {
    "standard": exp_standard,
    "robust": exp_robust,
    "d_r": lambda cfg, dev: exp_constructed(cfg, dev, "d_r"),
    "d_nr": lambda cfg, dev: exp_constructed(cfg, dev, "d_nr"),
    "d_rand": lambda cfg, dev: exp_constructed(cfg, dev, "d_rand"),
    "d_det": lambda cfg, dev: exp_constructed(cfg, dev, "d_det"),
    "ilyas": exp_ilyas,
    "train-on": exp_train_on,
    "mislabeled": exp_mislabeled,
    "mnist-fashion": exp_mnist_fashion,
    "bugs": exp_bugs,
    "squares": exp_squares,
    "leakage": exp_leakage,
    "transfer": exp_transfer,
}


# =============================================================================================
# CLI: python advex.py EXPERIMENT [--key value ...], flags generated from Config
# =============================================================================================

def _field_help():
    """Each Config field's trailing comment, read from this file, becomes its --help text."""
    import inspect
    src = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?#\s*(.*)$", src, re.M))


def _bool(s):
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="advex.py", description=__doc__.split("\n\n")[0])
    p.error = lambda msg: (_ for _ in ()).throw(AdvexError(msg))  # one line, exit 2 (see main)
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    helps = _field_help()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default!r})".replace("%", "%%")  # argparse %-formats help
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=None, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=text)
    a = vars(p.parse_args(argv))
    experiment = a.pop("experiment")
    given = {k: v for k, v in a.items() if v is not None}
    cfg = Config(**given)
    if cfg.quick:  # quick sizes, unless a flag sets them explicitly
        cfg = dataclasses.replace(cfg, **{k: v for k, v in QUICK.items() if k not in given})
    if cfg.arch not in ARCHS:
        raise AdvexError(f"unknown arch {cfg.arch!r}; choose from {', '.join(ARCHS)}")
    try:
        eval_eps = parse_floats(cfg.eval_eps)
        seeds = [int(v) for v in cfg.seeds.split(",") if v.strip()] or [cfg.seed]
    except ValueError as e:
        raise AdvexError(f"bad number in --eval-eps or --seeds: {e}") from None
    for k, v in [("adv-eps", cfg.adv_eps), ("rel-eps", cfg.rel_eps)] + [("eval-eps", e) for e in eval_eps]:
        if not 0 <= v < math.inf:
            raise AdvexError(f"--{k} must be finite and >= 0, got {v}")
    steps = dict(adv_steps=cfg.adv_steps, eval_steps=cfg.eval_steps, inv_steps=cfg.inv_steps, rel_steps=cfg.rel_steps,
                 epochs=cfg.epochs, adv_epochs=cfg.adv_epochs, batch=cfg.batch, eval_restarts=cfg.eval_restarts)
    for k, v in steps.items():
        if v < 1:
            raise AdvexError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    return experiment, cfg, seeds


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AdvexError(f"--device {name} asked for, but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AdvexError(f"unknown --device {name!r}") from None


def main(argv=None):
    try:
        experiment, cfg, seeds = parse_args(sys.argv[1:] if argv is None else argv)
        dev = get_device(cfg.device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        t0 = time.time()
        for seed in seeds:
            c = dataclasses.replace(cfg, seed=seed)
            log(f"advex {experiment} seed {seed} on {dev}" + (" (quick)" if cfg.quick else ""))
            records = EXPERIMENTS[experiment](c, dev)
            table = write_results(cfg.out, records)
        log(f"advex {experiment}: {fmt_time(time.time() - t0)}; results in {cfg.out}/results.md\n{table}")
    except AdvexError as e:
        print(f"advex: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
