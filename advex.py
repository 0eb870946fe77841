"""advex: "Adversarial Examples Are Not Bugs, They Are Features" (Ilyas et al. 2019,
arXiv 1905.02175) and the Distill 2019 discussion around it, in one file you can read top to bottom.

    python advex.py standard                   # CIFAR-10 standard model: train, save, evaluate
    python advex.py robust                     # L2 adversarially trained model (eps 0.5, 7 steps of 0.1)
    python advex.py ilyas --seeds 0,1,2        # Sec. 3: D_R, D_NR, D_rand, D_det, four fresh models
    python advex.py EXPERIMENT --scale cpu     # laptop scale: all of run_all.sh in < 45 min on 2 CPU cores
    python advex.py EXPERIMENT --scale quick   # tiny sizes: every experiment runs on a CPU in seconds
    python advex.py --help                     # every flag, with its unit

Conventions, everywhere in this file:
  * images live in [0,1] pixel space, (B, C, H, W); each model normalises inside itself, so every eps
    is in pixel units: an L2 radius over all C*H*W values, or an Linf bound (8/255 = 0.0314).
  * g(x) = model.features(x), the penultimate representation (B, D); logits = model.head(g(x)).
  * attacks keep x and delta in fp32; on CUDA the model's forward pass runs under bf16 autocast, except
    in representation inversion, which runs without autocast (fp32; TF32 convolutions on CUDA).
  * every artifact (checkpoint, constructed dataset, evaluation) is named by a hash of everything that
    made it: its settings, a fingerprint of the exact tensors it was trained or built on, the settings
    of the models it came from and the seed. It is written atomically and reused, so an interrupted run
    resumes, and a change anywhere upstream never reuses a stale file.
  * one seed, one result: the same command with the same seed on a CPU writes the same numbers.
Results go to OUT/results.json (every number with the settings that made it, every stage's time) and
OUT/results.md (the table beside the paper's numbers, and a verdict for each of the papers' claims).
Measured numbers, with hardware and wall times, are in README.md.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Config: one flat set of values; the CLI is generated from it (python advex.py --help)
# =============================================================================================

@dataclass
class Config:
    # where things are, how big, how fast
    data: str = "data"            # dataset root in torchvision's layout: cifar-10-batches-py/, MNIST/raw/, FashionMNIST/raw/
    out: str = "runs"             # results.json, results.md, artifacts/ (checkpoints, datasets, evaluations), PNG figures
    download: bool = True         # try torchvision's download when dataset files are missing
    device: str = "auto"          # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    compile: bool = False         # CUDA only: torch.compile each model's body (falls back to eager if that fails)
    seed: int = 0                 # seed of a single run
    seeds: str = ""               # comma list (e.g. 0,1,2): repeat the experiment; results.md shows mean ± std
    scale: str = "full"           # full: advex's defaults, one GPU (README: Deviations) | cpu: laptop scale (SCALES) | quick: seconds, for tests
    since: float = 0.0            # report: time only the stages run after this Unix time (run_all.sh passes its start)
    # models and training (the paper trains a ResNet-50 for 150 epochs; the fast net gets close in ~10)
    arch: str = "fastnet"         # CIFAR-10 model: fastnet | resnet18 | resnet50 | vgg16
    width: int = 64               # base channel width (fastnet: w, 4w, 4w; resnets and vgg16: w..8w)
    n_train: int = 0              # use the first n training images (0 = all)
    n_test: int = 0               # evaluate on the first n test images (0 = all)
    epochs: int = 10              # epochs of standard training
    batch: int = 512              # training batch size
    lr: float = 0.2               # peak learning rate: linear warm-up over 20% of the steps, then linear to 0
    momentum: float = 0.9         # SGD with Nesterov momentum
    wd: float = 5e-4              # weight decay
    augment: bool = True          # CIFAR training augmentation: random crop with 4-px zero padding, horizontal flip
    # adversarial training (Ilyas et al. App. C / Madry et al. 2018): L2 PGD inside the training loop
    adv_epochs: int = 20          # epochs of adversarial training
    adv_eps: float = 0.5          # L2 radius, pixel units
    adv_steps: int = 7            # PGD steps per training batch
    adv_step: float = 0.1         # L2 step length; the highest-loss iterate is used
    # evaluation: untargeted L2 PGD, step 2.5*eps/steps; the paper's own attack (7 steps of eps/5) is reported too
    eval_eps: str = "0.25"        # L2 radii, comma list
    eval_steps: int = 20          # PGD steps
    eval_restarts: int = 1        # >1: extra random starts; an example is robust only if no iterate of any start fools it
    attack_batch: int = 4096      # images per PGD / inversion chunk (lower it when memory is short)
    # Ilyas Sec. 3.1: robust / non-robust datasets by representation inversion
    inv_method: str = "fast"      # fast: Polyak step lengths, momentum 0.8 (see invert) | paper: plain steps of --inv-step
    inv_steps: int = 150          # gradient steps on ||g(z) - g(x)||_2 (the paper: 1000)
    inv_step: float = 1.0         # L2 step length, pixel units: fast: the longest step | paper: every step (0.1)
    # Ilyas Sec. 3.2: relabelled adversarial datasets by targeted L2 PGD on the standard model
    rel_eps: float = 0.5          # L2 radius, pixel units
    rel_steps: int = 100          # PGD steps
    rel_step: float = 0.1         # L2 step length
    con_epochs: int = 15          # epochs of each fresh model trained on D_R, D_NR, D_rand or D_det
    rel_lr: float = 0.1           # peak lr on D_rand (the paper: 0.01 there vs 0.1 elsewhere; see README, Deviations)
    dataset: str = ""             # train-on: folder with CIFAR_ims and CIFAR_lab (MadryLab's released layout)
    # Wallace's response: learning from a model's wrong labels
    mis_teacher_epochs: int = 2   # mislabeled: the weak teacher's schedule, in epochs (response: ResNet-18, 2 epochs)
    mis_teacher_acc: float = 62.5  # mislabeled: ...and it stops once its accuracy on training images reaches this (%)
    mis_epochs: int = 50          # mislabeled: epochs of the student trained on the teacher's errors only
    mnist_epochs: int = 3         # mnist-fashion: epochs of the MNIST CNN teacher and of each student
    mnist_batch: int = 128        # mnist-fashion: batch size
    mnist_lr: float = 0.05        # mnist-fashion: peak learning rate (same one-cycle schedule)
    # Nakkiran's and Goh's responses; Ilyas Fig. 3
    bugs_k: int = 5               # bugs: ensemble size (Nakkiran: 10); costs K trainings and K+1 passes per attack step
    squares_n: int = 10000        # squares: training images (the test set is a tenth of it)
    squares_epochs: int = 20      # squares: epochs of the network that memorises the noisy labels (Adam, batch 128)
    squares_lr: float = 1e-5      # squares: Adam's constant learning rate (Nakkiran: 1e-5)
    leak_eps: float = 1.0         # leakage: L2 radius of its adversarial training (0.5 left Spec 2 unmet: README)
    leak_epochs: int = 10         # leakage: epochs of that linear classifier
    leak_lr: float = 0.002        # leakage: its peak lr (a linear model on 3072 correlated pixels diverges at 0.2)
    transfer_source: str = "fastnet"  # transfer: architecture whose D_det and adversarial examples are used (paper: resnet50)
    transfer_archs: str = "fastnet,resnet18,vgg16"  # transfer: architectures that learn from D_det / are attacked (+resnet50: README)
    transfer_width: int = 0       # transfer: base width of the architectures other than the source (0 = --width)


# Sizes by --scale, applied to every field a flag does not set. "full" is the defaults above (the paper's
# sizes, with the deviations the README lists).
# cpu: chosen by measurement on a 2-core CPU (README, "Laptop scale"): all of run_all.sh in < 45 minutes.
# quick: tiny, so every experiment runs on a CPU in seconds; the code path is the same as the full run.
SCALES = {
    "full": {},
    "cpu": dict(n_train=10000, n_test=2000, width=16, epochs=15, batch=256, adv_epochs=10, adv_steps=4, adv_step=0.2,
                eval_steps=10, attack_batch=256, inv_steps=30, rel_eps=1.0, rel_steps=20, rel_step=0.125,
                con_epochs=25, mis_teacher_epochs=8, mis_epochs=20, mnist_epochs=10, bugs_k=3, squares_n=2000,
                squares_lr=3e-4, transfer_width=8),
    "quick": dict(n_train=200, n_test=100, width=8, epochs=2, adv_epochs=1, batch=50, adv_steps=2, eval_steps=3,
                  attack_batch=64, inv_steps=5, rel_steps=5, con_epochs=2, mis_teacher_epochs=1, mis_epochs=2,
                  mnist_epochs=1, mnist_batch=50, bugs_k=2, squares_n=400, squares_epochs=3, leak_epochs=2),
}


class AdvexError(Exception):
    """Bad input (missing data, wrong shapes, bad settings, NaN loss): the CLI prints it as one line, exit 2."""


def log(msg):
    print(msg, flush=True)


def why(e):
    """An exception as one whole line: its type, and the first line of its message when it has one."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def seed_all(seed, stage):
    """The one seeding helper, called before anything random is drawn. Each stage gets its own stream, so a
    stage's output does not depend on whether the stages before it were computed now or loaded from disk."""
    torch.manual_seed(zlib.crc32(f"{stage}:{seed}".encode()))


def fingerprint(*tensors):
    """The identity of the exact data a stage used: sha1 of the tensors' dtypes, shapes and bytes (10 hex digits)."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:10]


def settings_key(settings):
    """Short hash of a settings dict (plain values, nested dicts): names artifacts and runs."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def artifact(cfg, name, settings, ext="pt"):
    """Where a stage's output lives: OUT/artifacts/NAME-sSEED-KEY.EXT, KEY a hash of everything that made it.
    The one way advex keys an artifact."""
    return os.path.join(cfg.out, "artifacts", f"{name}-s{cfg.seed}-{settings_key(settings)}.{ext}")


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


def load_file(path, expect):
    """torch.load with weights_only=True (plain tensors and values; no code is run), checked to be a dict with
    the keys in `expect` ({key: type}). Anything else is one clear error naming the file."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-object files all end here
        raise AdvexError(f"cannot read {path} ({why(e)})") from None
    bad = [k for k, t in expect.items() if not isinstance(d, dict) or not isinstance(d.get(k), t)]
    if bad:
        raise AdvexError(f"{path} is not what advex wrote here (missing or wrong: {', '.join(bad)})")
    return d


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


# Where the time goes (the stage table at the end of run_all.sh). WORK counts forward-pass equivalents of
# one image: a forward pass 1, an attack step 2 (forward + input gradient), a training step 3.
WORK = {"fwd": 0}
STAGES = []  # this process's timed stages; main() adds them to results.json


def note_stage(name, t0, work0, model=None, loaded=False):
    """Record a stage that began at time t0 with WORK at work0: seconds, forward equivalents, TFLOP."""
    work = WORK["fwd"] - work0
    STAGES.append(dict(stage=name, seconds=round(time.time() - t0, 3), work=work, loaded=loaded,
                       tflop=round(work * getattr(model, "gflop", 0.0) / 1e3, 4), time=time.time()))


def gflop(model, x):
    """GFLOP of one forward pass of one input shaped like x[0]: 2 x the multiply-adds of every conv and linear
    layer, what torch's FlopCounterMode counts (without importing torch._dynamo, a second of start-up)."""
    flops = []

    def count(m, inputs, out):
        per_output = m.in_channels // m.groups * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        flops.append(2 * out.numel() * per_output)

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(to_float(x[:1]))
    model.train(was)
    for h in hooks:
        h.remove()
    return sum(flops) / 1e9


# =============================================================================================
# Data: each split loaded once into uint8 tensors; floats in [0,1] are made on the device per batch
# =============================================================================================

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_BATCH = 10000  # images in each of the six official batch files (the tests write smaller ones)
CIFAR_FILES = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
               "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
               "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}  # md5
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def to_float(x):
    """uint8 [0,255] -> float32 [0,1]; fp16 / fp32 images (constructed datasets) -> float32 as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class _CifarUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are Python 2 pickles of a dict of strings, one numpy uint8 array and lists
    of ints: numpy's array reconstruction is the only code they need. Anything else a file names (os.system,
    ...) is refused before it can run."""
    SAFE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.SAFE:
            raise AdvexError(f"refuses to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists and strings")
        return super().find_class(module, name)


def _download(dataset, root):
    """torchvision's download of CIFAR10 / MNIST / FashionMNIST into root (torchvision is imported only here and
    for figures: it costs a second of start-up). On failure say so, and remove root if the attempt created it."""
    existed = os.path.exists(root)
    try:
        import torchvision
        getattr(torchvision.datasets, dataset)(root, download=True)
    except Exception as e:
        log(f"advex: {dataset} download failed ({why(e)})")
        if not existed:
            shutil.rmtree(root, ignore_errors=True)


def load_cifar10(root, download=True, warn=True):
    """CIFAR-10 from ROOT/cifar-10-batches-py (torchvision's layout), downloading it when missing and allowed.
    A copy whose md5 sums differ from the official ones but whose format is right (e.g. one rebuilt from
    JPEGs) is used, with a warning when `warn`. Each batch must hold CIFAR_BATCH uint8 images of 3072 values
    and as many labels in 0..9. Returns uint8 (50000,3,32,32), int64 (50000,), uint8 (10000,3,32,32),
    int64 (10000,) on the CPU."""
    folder = os.path.join(root, "cifar-10-batches-py")
    missing = lambda: [n for n in CIFAR_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing() and download:
        _download("CIFAR10", root)
    if missing():
        raise AdvexError(f"CIFAR-10 not found: {folder}/ lacks {', '.join(missing())} "
                         f"(needs data_batch_1..5 and test_batch; see README, 'Data')")
    if warn and any(_md5(os.path.join(folder, n)) != md5 for n, md5 in CIFAR_FILES.items()):
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
    if len(raw) - head != math.prod(shape):
        raise AdvexError(f"{path} holds {len(raw) - head} bytes of data; its header says {math.prod(shape)} (truncated?)")
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).view(*shape)


def load_mnist(root, fashion=False, download=True):
    """MNIST or Fashion-MNIST from ROOT/{MNIST,FashionMNIST}/raw (torchvision's layout: IDX files), downloading
    them when missing and allowed. Returns uint8 (60000,1,28,28), int64 (60000,), uint8 (10000,1,28,28),
    int64 (10000,)."""
    name = "FashionMNIST" if fashion else "MNIST"
    raw = os.path.join(root, name, "raw")
    missing = lambda: [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing() and download:
        _download(name, root)
    if missing():
        raise AdvexError(f"{name} not found: {raw}/ lacks {', '.join(missing())}")
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
    Inputs are points in the plane; no normalisation (they are already in [0,1]). Rows are seed-major, so
    anything that feeds it must keep all S*N rows together (BatchedLinear splits them by seed)."""

    def __init__(self, S=1, hidden=64, classes=2):
        super().__init__()
        self.body = nn.Sequential(BatchedLinear(S, 2, hidden), nn.ReLU(), BatchedLinear(S, hidden, hidden), nn.ReLU())
        self.head = BatchedLinear(S, hidden, classes)

    def features(self, x):  # (S*N, 2) -> (S*N, h)
        return self.body(x)


ARCHS = ("fastnet", "resnet18", "resnet50", "vgg16")


def make_model(arch, width=64, classes=10, mean=CIFAR_MEAN, std=CIFAR_STD):
    """A model by name (CIFAR-sized: 32x32x3 inputs in [0,1], unless mean/std say otherwise)."""
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


def maybe_compile(model, x, enabled):
    """--compile: torch.compile the model's body when x is on CUDA (the state_dict keys stay as they are: only
    the bound forward is replaced). A forward/backward probe on two of x's images, in eval mode so BatchNorm's
    statistics are not touched, catches a compiler that fails; the model then stays eager."""
    if not (enabled and x.device.type == "cuda" and hasattr(model, "body")):
        return model
    was = model.training
    try:
        model.body.forward = torch.compile(model.body.forward)
        model.eval()
        probe = to_float(x[:2]).requires_grad_(True)
        torch.autograd.grad(model(probe).float().sum(), probe)
    except Exception as e:
        log(f"advex: torch.compile failed ({why(e)}); running eagerly")
        vars(model.body).pop("forward", None)
    model.train(was)
    return model


def save_model(model, path, arch, settings, epochs_done):
    """Checkpoint = state_dict + arch + the settings that trained it + the epochs it trained (it may have
    stopped early): plain values and tensors, so it loads with weights_only."""
    save_atomic({"state_dict": model.state_dict(), "arch": arch, "settings": json.dumps(settings),
                 "epochs_done": float(epochs_done)}, path)


def load_model(model, path, arch):
    """Load a checkpoint written by save_model into `model` (sets model.epochs_done)."""
    ckpt = load_file(path, {"state_dict": dict, "arch": str, "epochs_done": float})
    if ckpt["arch"] != arch:
        raise AdvexError(f"{path} holds a {ckpt['arch']!r} model, not {arch!r}")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise AdvexError(f"{path} does not fit this {arch} model ({why(e)})") from None
    model.epochs_done = ckpt["epochs_done"]
    return model


# =============================================================================================
# Attacks: projected gradient descent (Madry et al. 2018) in pixel space
# =============================================================================================

def autocast(device, enabled=True):
    """bf16 autocast for a model's forward pass on CUDA; a no-op on the CPU (fp32 there) or when not enabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def over_set(model, fn, x, batch=4096, amp=True):
    """fn(x_batch) over a whole set in chunks, in eval mode (the model's mode is restored), under bf16
    autocast on CUDA when amp. x: (N, ...) uint8 or float images -> torch.cat of fn's outputs."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = to_float(x[i:i + batch])
        with autocast(xb.device, amp):
            out.append(fn(xb))
        WORK["fwd"] += len(xb)
    model.train(was)
    return torch.cat(out)


def ce_objective(model, targeted=False):
    """pgd's default objective. Untargeted: ascend CE(model(x'), y); success = the prediction is not y.
    Targeted (y = targets): ascend -CE(model(x'), y); success = the prediction is y.
    An objective maps (x' (B,...) fp32, y, need_grad) to (loss (B,), d loss / d x' or None, success (B,) bool);
    only the model's forward pass runs under autocast."""
    sign = -1.0 if targeted else 1.0

    def objective(xa, y, need_grad=True):
        xa = xa.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad), autocast(xa.device):
            logits = model(xa).float()
            loss = sign * F.cross_entropy(logits, y, reduction="none")
        grad = torch.autograd.grad(loss.sum(), xa)[0] if need_grad else None
        WORK["fwd"] += len(xa) * (2 if need_grad else 1)
        pred = logits.argmax(1)
        return loss.detach(), grad, (pred == y) if targeted else (pred != y)

    return objective


def project(delta, eps, norm):
    """Per-example projection of delta (B, ...) onto the eps-ball of the given norm (eps may be inf)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.dim() - 1))
    return delta * (eps / n).clamp(max=1.0)


def pgd(model, x, y, eps, steps, norm="l2", step=None, targeted=False, random_start=False, lo=0.0, hi=1.0,
        batch=4096, objective=None, momentum=0.0, polyak=0.0, name=""):
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
    `use_best`; the start counts), with ||x_adv - x|| <= eps and lo <= x_adv <= hi; success (N,) bool is
    True where *any* iterate reached the objective's goal (so a robust accuracy built on it is an honest
    upper bound). BatchNorm and dropout are in eval mode while attacking; the model's mode is restored."""
    if not eps >= 0:
        raise AdvexError(f"pgd: eps must be >= 0, got {eps}")
    if steps < 1:
        raise AdvexError(f"pgd: steps must be >= 1, got {steps}")
    if norm not in ("l2", "linf"):
        raise AdvexError(f"pgd: norm must be 'l2' or 'linf', got {norm!r}")
    step = 2.5 * eps / steps if step is None else step
    objective = objective or ce_objective(model, targeted)
    was_training = model.training
    model.eval()
    progress = Progress(name, len(x)) if name else None
    try:
        xs, ss = [], []
        for i in range(0, len(x), batch):
            xa, s = _pgd_batch(objective, to_float(x[i:i + batch]), y[i:i + batch], eps, steps, step, norm,
                               random_start, lo, hi, momentum, polyak)
            xs.append(xa)
            ss.append(s)
            if progress:
                progress(i + len(xa))
        return torch.cat(xs), torch.cat(ss)
    finally:
        model.train(was_training)


def _pgd_batch(objective, x, y, eps, steps, step, norm, random_start, lo, hi, momentum, polyak):
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
    return best_x, success


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


# =============================================================================================
# Inversion: robust-feature datasets (Ilyas et al. Sec. 3.1)
# =============================================================================================

def features(model, x, batch=4096):
    """g(x) for a whole set, fp32 throughout (no autocast): (N, ...) -> (N, D)."""
    return over_set(model, lambda xb: model.features(xb).float(), x, batch, amp=False)


def invert(model, x, x0, steps, step, method="fast", batch=4096, name=""):
    """Ilyas et al. Sec. 3.1: for each target x, find z in [0,1]^d whose representation matches x's,
    z = argmin ||g(z) - g(x)||_2, starting from x0, with no eps-ball, only the [0,1] clamp. This is PGD with an
    infinite radius on the loss -||g(z) - g(x)||^2 (the square has the same descent direction and a zero
    gradient at z = x, so x0 = x stays put), keeping each example's best iterate, so the result is never
    worse than x0. No bf16 autocast: its ~0.4% error would blur the small distances this drives to (on
    CUDA, convolutions and matmuls take TF32 inputs, as everywhere in advex: ~5e-4 relative rounding).
      method 'paper': `steps` L2-normalised gradient steps of length `step` (the paper: 1000 of 0.1).
      method 'fast': Polyak step lengths, min(step, 0.5 * f / ||grad f||) with f = ||g(z) - g(x)||^2, along a
        heavy-ball momentum (0.8) of normalised gradients. On real CIFAR-10 with trained sources, 150 steps
        reach a lower median and p95 distance than the paper's 1000 steps of 0.1 and end within ~20% of its
        distance from x0 (README, "Inversion in 150 steps"). The distance from x0 matters as much as the feature
        match: long fixed steps also match g(x) closely but wander ~20 L2 from x0 (the paper's: ~3 for a
        standard source), and a model trained on such a D_NR learns nothing that transfers to real images.
    x, x0: (N, C, H, W) in [0,1]. Returns z (N, C, H, W) fp32 and the relative distance
    ||g(z) - g(x)|| / ||g(x)|| (N,), the construction's quality."""
    if method not in ("fast", "paper"):
        raise AdvexError(f"unknown inversion method {method!r}; choose fast or paper")
    gx = features(model, x, batch)  # (N, D)

    def objective(z, target, need_grad=True):
        z = z.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            loss = -(model.features(z).float() - target).pow(2).sum(dim=1)
        grad = torch.autograd.grad(loss.sum(), z)[0] if need_grad else None
        WORK["fwd"] += len(z) * (2 if need_grad else 1)
        return loss.detach(), grad, torch.zeros(len(z), dtype=torch.bool, device=z.device)

    fast = method == "fast"
    z, _ = pgd(model, x0, gx, math.inf, steps, "l2", step, batch=batch, objective=objective,
               momentum=0.8 if fast else 0.0, polyak=0.5 if fast else 0.0, name=name)
    rel = (features(model, z, batch) - gx).norm(dim=1) / gx.norm(dim=1).clamp_min(1e-12)
    return z, rel


def random_other(n, device="cpu"):
    """For each i in 0..n-1 an index j != i drawn uniformly from the other n-1 (the start image x0 of
    inversion must be a *different* training image, Ilyas Sec. 3.1)."""
    return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n


# =============================================================================================
# Relabelling (Ilyas et al. Sec. 3.2; Wallace's response)
# =============================================================================================

def relabel_targets(y, rule, classes=10):
    """Targets of the relabelled adversarial datasets, Ilyas Sec. 3.2.
    'det':  t = (y + 1) mod C, a deterministic shift: every robust feature now points to the wrong class.
    'rand': t ~ Uniform{0..C-1}, independent of y, as the paper writes it. About 1 in C draws t = y; such
            an example's label is no evidence of anything (it was drawn without looking at y), so it
            carries no more label information than the rest; it is only a weaker attack (no class to
            leave). We keep the paper's rule and report the fooling rate over t != y."""
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
    d = load_file(path, {"images": torch.Tensor, "labels": torch.Tensor, "settings": str})
    if d["images"].dim() != 4 or len(d["images"]) != len(d["labels"]):
        raise AdvexError(f"{path} is not what advex wrote here (images and labels do not match)")
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
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdvexError(f"released dataset: cannot read {path} ({why(e)})") from None
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
# Training: SGD with Nesterov momentum and a one-cycle schedule (or Adam); optional L2 PGD adversarial training
# =============================================================================================

def train(model, x, y, epochs, batch, lr, momentum=0.9, wd=5e-4, augment=False, adv_eps=0.0, adv_steps=7,
          adv_step=0.1, optimizer="sgd", stop=None, name="train"):
    """Train in place with plain cross-entropy (as the paper and MadryLab do: no label smoothing).
    x: (N, C, H, W) uint8 or float in [0,1] on the training device; y: (N,) int64.
    optimizer 'sgd': Nesterov momentum, lr rising linearly to `lr` over the first 20% of the steps, then
      linearly to 0, which reaches good accuracy in few epochs. 'adam': Adam at a constant `lr`, no weight
      decay (Nakkiran's squares).
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
                xb = augment_batch(xb)
            if adv_eps > 0:
                xb, _ = pgd(model, xb, yb, adv_eps, adv_steps, step=adv_step, batch=len(xb))
            with autocast(dev):
                loss = F.cross_entropy(model(xb).float(), yb)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), s + 1, first_bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            WORK["fwd"] += 3 * len(xb)
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


# =============================================================================================
# Evaluation
# =============================================================================================

def predict(model, x, batch=4096):
    """Argmax predictions (N,)."""
    return over_set(model, lambda xb: model(xb).argmax(dim=1), x, batch)


def accuracy(model, x, y, batch=4096):
    return (predict(model, x, batch) == y).float().mean().item()


def robust_accuracy(model, x, y, eps, steps, step=None, restarts=1, norm="l2", batch=4096, name=""):
    """Share of examples that no untargeted PGD iterate of any restart misclassifies (the clean image is the
    first iterate of restart 0, so this never exceeds the standard accuracy). Restart 0 starts at x; each
    further restart at a random point of the ball. An upper bound on the true robust accuracy, as every
    attack-based number is; more steps and restarts can only lower it."""
    fooled = torch.zeros(len(x), dtype=torch.bool, device=y.device)
    for r in range(restarts):
        fooled |= pgd(model, x, y, eps, steps, norm, step, random_start=r > 0, batch=batch, name=name)[1]
    return 1 - fooled.float().mean().item()


@torch.no_grad()
def linear_certified(model, x, labels, r):
    """Exact L2 certificates for a LinearNet: per example, True where no perturbation of L2 radius r (pixel
    units) can make any class j beat `labels`. Logits f(x) = W (x - m) / s + b, so a perturbation d changes
    f_l - f_j by (w_l - w_j) . (d / s), at most r * ||(w_l - w_j) / s||_2 (Cauchy-Schwarz, attained).
    labels = y: certified robust accuracy (Goh's Spec 1); labels = the predictions: stability (Spec 2).
    The [0,1] box is ignored, so both are lower bounds."""
    W = model.head.weight / model.std.expand(1, *x.shape[1:]).flatten(1)  # (C, D): the weights in pixel units
    f = model(to_float(x)).float()  # (N, C)
    margin = f.gather(1, labels[:, None]) - f  # (N, C), 0 at j = label
    reach = r * (W[labels][:, None, :] - W[None, :, :]).norm(dim=2)  # (N, C), 0 at j = label
    return ((margin > reach) | (torch.arange(f.shape[1], device=x.device) == labels[:, None])).all(dim=1)


def eval_attacks(cfg):
    """The attacks every robust accuracy is measured with: untargeted L2 PGD at each --eval-eps with
    --eval-steps steps of 2.5*eps/steps, and the paper's own (Ilyas et al.: 7 steps of eps/5, eps 0.25)."""
    attacks = {f"robust acc L2 {e:g}": dict(norm="l2", eps=e, steps=cfg.eval_steps, step=round(2.5 * e / cfg.eval_steps, 6),
                                            restarts=cfg.eval_restarts) for e in parse_floats(cfg.eval_eps)}
    attacks["robust acc L2 0.25, 7 steps of eps/5"] = dict(norm="l2", eps=0.25, steps=7, step=0.05, restarts=1)
    return attacks


def evaluate(cfg, model, x, y):
    """Standard accuracy and robust accuracy under each attack of eval_attacks, computed once per model, test
    set and attack and then read from OUT/artifacts: [(metric, value %, attack settings)]."""
    attacks = eval_attacks(cfg)
    settings = dict(model=model.settings, test=fingerprint(x, y), attacks=attacks)
    path = artifact(cfg, "eval", settings, "json")
    t0, w0 = time.time(), WORK["fwd"]
    if os.path.isfile(path):
        try:
            values = json.load(open(path))
            assert isinstance(values, dict) and all(isinstance(values[m], float) for m in ["standard acc", *attacks])
        except Exception:
            raise AdvexError(f"{path} is not what advex wrote here; delete it to evaluate again") from None
        note_stage(f"eval {model.name}", t0, w0, model, loaded=True)
    else:
        seed_all(cfg.seed, "eval")  # random restarts
        values = {"standard acc": 100 * accuracy(model, x, y, cfg.attack_batch)}
        for metric, a in attacks.items():
            values[metric] = 100 * robust_accuracy(model, x, y, a["eps"], a["steps"], a["step"], a["restarts"],
                                                   batch=cfg.attack_batch, name=f"eval {model.name}: {metric}")
        save_atomic(json.dumps(values), path)
        note_stage(f"eval {model.name}", t0, w0, model)
    return [("standard acc", values["standard acc"], {})] + [(m, values[m], a) for m, a in attacks.items()]


# =============================================================================================
# Results: OUT/results.json (every number, the run settings behind it, stage times) and OUT/results.md
# (the table beside the paper's numbers, the run settings, and a verdict for each claim)
# =============================================================================================

def run_settings(cfg):
    """The settings of a run that can change its numbers: every Config field but where things are, the device,
    the seed (recorded on its own) and the report's --since."""
    where = {"data", "out", "download", "device", "compile", "seed", "seeds", "since"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in where}


RUNS = {}  # run key -> run settings of this process's records; main() adds them to results.json


def make_record(run, seed, arch, experiment, metric, value, paper=None, **settings):
    """One number. Its identity is (experiment, metric, arch, seed, run), run being the key of the settings
    of the run that made it: a rerun with the same settings replaces it, a run with other settings adds a row."""
    RUNS[settings_key(run)] = run
    return dict(experiment=experiment, metric=metric, value=round(float(value), 4), paper=paper, seed=seed,
                arch=arch, scale=run.get("scale", ""), run=settings_key(run), settings=settings)


def record(cfg, experiment, metric, value, paper=None, arch=None, **settings):
    """A number of an advex experiment; cfg holds the n_train / n_test actually used."""
    return make_record(run_settings(cfg), cfg.seed, arch or cfg.arch, experiment, metric, value, paper, **settings)


def read_results(out):
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        return dict(records=[], runs={}, stages=[])
    try:
        with open(path) as f:
            res = json.load(f)
        assert isinstance(res["records"], list) and isinstance(res["runs"], dict) and isinstance(res["stages"], list)
        assert all({"experiment", "metric", "value", "seed", "arch", "run"} <= set(r) for r in res["records"])
    except Exception:
        raise AdvexError(f"{path} is not an advex results file (unreadable, or written by another version); "
                         f"move it away or choose another --out") from None
    return res


def write_results(out, records, runs, stages=()):
    """Merge records (and the settings of their runs, and stage times) into OUT/results.json; rewrite results.md."""
    res = read_results(out)
    ident = lambda r: (r["experiment"], r["metric"], r["arch"], r["seed"], r["run"])
    new = {ident(r) for r in records}
    res["records"] = [r for r in res["records"] if ident(r) not in new] + list(records)
    res["runs"].update(runs)
    res["stages"] += list(stages)
    save_atomic(json.dumps(res, indent=1), os.path.join(out, "results.json"))
    table = results_table(res)
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


def mean_std(rs):
    v = torch.tensor([r["value"] for r in rs], dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def results_table(res):
    lines = ["# advex results", "",
             "Mean ± std over seeds (n). One row per experiment, metric, architecture and run settings (the `run` "
             "column; what each run changed from the full-size defaults is listed below the table).", "",
             "| experiment | metric | arch | run | ours | n | paper | settings |", "|---|---|---|---|---|---|---|---|"]
    g = groups(res["records"])
    for (exp, metric, arch, run), rs in g.items():
        m, s = mean_std(rs)
        ours = f"{m:.2f}" + (f" ± {s:.2f}" if len(rs) > 1 else "")
        paper = "" if rs[-1]["paper"] is None else f"{rs[-1]['paper']:g}"
        sets = ", ".join(f"{k} {v}" for k, v in rs[-1]["settings"].items())
        lines.append(f"| {exp} | {metric} | {arch} | {run} | {ours} | {len(rs)} | {paper} | {sets} |")
    lines += ["", "| run | scale | settings that differ from the full-size defaults |", "|---|---|---|"]
    defaults = dataclasses.asdict(Config())
    for run in dict.fromkeys(k[3] for k in g):
        s = res["runs"].get(run, {})
        diff = ", ".join(f"{k} {v}" for k, v in s.items() if k != "scale" and defaults.get(k, None) != v)
        lines.append(f"| {run} | {s.get('scale', '')} | {diff or 'none'} |")
    lines += ["", "## Claims", "",
              "Each claim of the paper and the responses, its criterion, our values (the latest run of each "
              "experiment, mean over its seeds) and the verdict.", "",
              "| claim | criterion | ours | verdict |", "|---|---|---|---|"]
    for claim, criterion, ours, verdict in check_claims(res["records"]):
        lines.append(f"| {claim} | {criterion} | {ours} | {verdict} |")
    return "\n".join(lines) + "\n"


RA = "robust acc L2 0.25"


def spearman(a, b):
    """Spearman rank correlation of two equal-length lists (no ties expected)."""
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum().item() / max(1e-12, (ra.norm() * rb.norm()).item())


def _fig3(v):
    acc, tr = v("transfer", "D_det-trained test acc", all_archs=True), v("transfer", "transfer rate", all_archs=True)
    archs = sorted(acc)
    if len(archs) < 3:
        raise KeyError("fewer than 3 architectures")
    return [spearman([tr[a] for a in archs], [acc[a] for a in archs])]


# (claim, criterion, values(v) -> list of numbers, test(*values) -> bool). v(experiment, metric) is our number
# (the latest run's mean over seeds); a KeyError means the experiment has not run: NOT RUN.
CLAIMS = [
    ("Ilyas: a standard model is accurate but not robust", "standard acc > 70; robust acc < 10 (paper's attack, 7 steps of eps/5)",
     lambda v: [v("standard", "standard acc"), v("standard", "robust acc L2 0.25, 7 steps of eps/5")],
     lambda a, r: a > 70 and r < 10),
    ("Ilyas: adversarial training makes a robust model", "robust model: robust acc > 60",
     lambda v: [v("robust", RA)], lambda r: r > 60),
    ("Ilyas 3.1: robust features alone give robustness; non-robust ones none", "D_NR robust acc < 5 and D_R robust acc > 30",
     lambda v: [v("d_nr", RA), v("d_r", RA)], lambda nr, r: nr < 5 and r > 30),
    ("Ilyas 3.1: D_R and D_NR both generalise to the real test set", "standard acc > 70 for both",
     lambda v: [v("d_r", "standard acc"), v("d_nr", "standard acc")], lambda r, nr: r > 70 and nr > 70),
    ("Ilyas 3.2: non-robust features alone generalise", "D_rand > 20 and D_det > 15 (chance: 10)",
     lambda v: [v("d_rand", "standard acc"), v("d_det", "standard acc")], lambda r, d: r > 20 and d > 15),
    ("Ilyas 3.2: D_rand is learnt better than D_det", "D_rand acc > D_det acc",
     lambda v: [v("d_rand", "standard acc"), v("d_det", "standard acc")], lambda r, d: r > d),
    ("Ilyas Fig. 3: models learn more from D_det where its examples transfer", "Spearman(transfer rate, D_det acc) >= 0.8 over architectures",
     _fig3, lambda rho: rho >= 0.8),
    ("Wallace: a model learns from a teacher's errors alone", "student test acc > 30 (chance: 10)",
     lambda v: [v("mislabeled", "student test acc")], lambda a: a > 30),
    ("Wallace: an MNIST teacher's labels on Fashion images teach MNIST", "student MNIST acc > 80 with both normalisations",
     lambda v: [v("mnist-fashion", "student MNIST test acc (own stats)"), v("mnist-fashion", "student MNIST test acc (mnist stats)")],
     lambda a, b: a > 80 and b > 80),
    ("Wallace: the 2D toy learns from flipped points alone", "median over seeds > 16 of 32 original points right",
     lambda v: [v("toy2d", "model 2: original points right, median")], lambda m: m > 16),
    ("Nakkiran: his examples do not transfer; plain PGD's do", "transfer < 5 for his, > 20 for plain PGD (L2 and Linf)",
     lambda v: [v(f"bugs {n} {m}", "transfer to fresh model") for n in ("l2", "linf") for m in ("bugs", "pgd")],
     lambda b2, p2, bi, pi: b2 < 5 and bi < 5 and p2 > 20 and pi > 20),
    ("Nakkiran: a model trained on his examples learns nothing of the true labels; plain PGD's does",
     "true-label test acc <= 15 for his, >= 20 for plain PGD (L2 and Linf)",
     lambda v: [v(f"bugs {n} {m}", "trained-on: test acc, true labels") for n in ("l2", "linf") for m in ("bugs", "pgd")],
     lambda b2, p2, bi, pi: b2 <= 15 and bi <= 15 and p2 >= 20 and pi >= 20),
    ("Nakkiran: on adversarial squares a linear model is robust, a memorising net is not", "linear flipped at Linf 0.89 = 0; net flipped at Linf 0.01 > 50",
     lambda v: [v("squares", "linear: flipped by Linf 0.89"), v("squares", "net memorising: flipped by Linf 0.01")],
     lambda lin, net: lin == 0 and net > 50),
    ("Goh: his features are robustly useful and stable (Specs 1 and 2)", "certified acc at L2 0.25 > 10; >= 80 of predictions certified stable",
     lambda v: [v("leakage", "robust linear: certified acc L2 0.25"), v("leakage", "robust linear: stable predictions L2 0.25")],
     lambda c, s: c > 10 and s >= 80),
    ("Goh: robust features leak into D_rand, not into D_det", "linear on robust features: D_rand acc > D_det acc",
     lambda v: [v("leakage", "linear on features, trained on d_rand"), v("leakage", "linear on features, trained on d_det")],
     lambda r, d: r > d),
]


def check_claims(records):
    """[(claim, criterion, our values, HOLDS | FAILS | NOT RUN)] over the latest run of each experiment."""
    g = groups(records)

    def v(experiment, metric, all_archs=False):
        keys = [k for k in g if k[:2] == (experiment, metric)]
        if not keys:
            raise KeyError(experiment)
        if not all_archs:
            return mean_std(g[keys[-1]])[0]
        run = keys[-1][3]
        return {k[2]: mean_std(g[k])[0] for k in keys if k[3] == run}

    out = []
    for claim, criterion, values, test in CLAIMS:
        try:
            vals = values(v)
        except KeyError:
            out.append((claim, criterion, "", "NOT RUN"))
            continue
        out.append((claim, criterion, ", ".join(f"{x:.3g}" for x in vals), "HOLDS" if test(*vals) else "FAILS"))
    return out


def stage_table(stages, wall=None):
    """Where the time went: one row per stage (those read from disk summed into one row each), its share of
    the total, its work in forward-pass equivalents of one image, TFLOP and throughput. wall: the whole run's
    wall time; what the stages do not cover (process start-up, data loading, small steps) gets a row."""
    rows = {}
    for s in stages:
        r = rows.setdefault((s["stage"], s["loaded"]), dict(s, seconds=0.0, work=0, tflop=0.0, n=0))
        r["seconds"] += s["seconds"]
        r["work"] += s["work"]
        r["tflop"] += s["tflop"]
        r["n"] += 1
    covered = sum(r["seconds"] for r in rows.values())
    total = max(wall or 0.0, covered) or 1e-9
    lines = ["| stage | device | seconds | share | M img-fwd | TFLOP | TFLOP/s | img-fwd/s |", "|---|---|---|---|---|---|---|---|"]
    for (name, loaded), r in rows.items():
        t = max(r["seconds"], 1e-9)
        name = f"{name}: read from disk" + (f" x{r['n']}" if r["n"] > 1 else "") if loaded else name
        lines.append(f"| {name} | {r.get('device', '')} | {r['seconds']:.1f} | {100 * r['seconds'] / total:.1f}% | "
                     f"{r['work'] / 1e6:.3f} | {r['tflop']:.2f} | {r['tflop'] / t:.2f} | {r['work'] / t:,.0f} |")
    if wall:
        lines.append(f"| other: start-up, data loading, small steps | | {total - covered:.1f} | "
                     f"{100 * (total - covered) / total:.1f}% | | | | |")
    lines.append(f"| total | | {total:.1f} | 100% | {sum(r['work'] for r in rows.values()) / 1e6:.3f} | "
                 f"{sum(r['tflop'] for r in rows.values()):.2f} | | |")
    return "\n".join(lines) + "\n"


def parse_floats(s):
    return [float(v) for v in str(s).split(",") if v.strip()]


# =============================================================================================
# Experiments. Each takes (cfg, device) and returns records; main() writes them.
# =============================================================================================

def cifar(cfg, dev):
    """CIFAR-10 on the device: the first --n-train training and --n-test test images, uint8 (N,3,32,32),
    int64 labels. Returns cfg with n_train / n_test set to the numbers used, and (xtr, ytr, xte, yte)."""
    seen = os.path.join(cfg.out, "artifacts", f".cifar-checked-{settings_key(os.path.abspath(cfg.data))}")
    xtr, ytr, xte, yte = load_cifar10(cfg.data, cfg.download, warn=not os.path.isfile(seen))
    save_atomic("md5 sums checked; a warning, if any, was printed once\n", seen)
    ntr, nte = first_n(cfg.n_train, len(xtr), "n-train"), first_n(cfg.n_test, len(xte), "n-test")
    return (dataclasses.replace(cfg, n_train=ntr, n_test=nte),
            (xtr[:ntr].to(dev), ytr[:ntr].to(dev), xte[:nte].to(dev), yte[:nte].to(dev)))


def train_settings(cfg, adversarial=False, **over):
    """Everything but the data that determines a trained model; trained() adds the data's fingerprint."""
    s = dict(arch=cfg.arch, width=cfg.width, seed=cfg.seed, batch=cfg.batch, lr=cfg.lr, momentum=cfg.momentum,
             wd=cfg.wd, augment=cfg.augment, epochs=cfg.adv_epochs if adversarial else cfg.epochs)
    if adversarial:
        s.update(adv_eps=cfg.adv_eps, adv_steps=cfg.adv_steps, adv_step=cfg.adv_step)
    s.update(over)
    return s


MODELS = {}  # checkpoint path -> model, for this process: each model is trained or loaded once


def trained(cfg, dev, name, x, y, settings):
    """Train a fresh model on (x, y) with `settings` (see train_settings), or load the checkpoint that these
    settings and this exact data already produced: the key holds the data's fingerprint, so a model trained on
    a constructed dataset inherits, through the dataset's bytes, everything that made it. Optional settings:
    optimizer ('adam'), stop_acc (stop once 2000 training images are classified this well, %), stop_epochs
    (stop after that many epochs of the full schedule), classes, norm ((mean, std)).
    Returns the model in eval mode on dev, with .settings (its key's contents), .name, .gflop, .epochs_done."""
    settings = dict(settings, data=fingerprint(x, y))
    path = artifact(cfg, name, settings)
    if path in MODELS:  # already in this process (e.g. the standard model, source of three datasets)
        return MODELS[path]
    seed_all(cfg.seed, name)  # before the model is built: its initial weights come from this stream
    model = make_model(settings["arch"], settings["width"], settings.get("classes", 10),
                       *settings.get("norm", (CIFAR_MEAN, CIFAR_STD))).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.settings, model.name, model.gflop = settings, f"{name} ({settings['arch']})", gflop(model, x)
    t0, w0 = time.time(), WORK["fwd"]
    if os.path.isfile(path):
        log(f"[{name}] loading {path}")
        load_model(model, path, settings["arch"])
        note_stage(model.name, t0, w0, model, loaded=True)
        MODELS[path] = maybe_compile(model.eval(), x, cfg.compile)
        return model
    maybe_compile(model, x, cfg.compile)
    stop = None
    if "stop_acc" in settings:  # Wallace's weak teacher; checked on training images only, never on test data
        stop = lambda e: 100 * accuracy(model, x[:2000], y[:2000], cfg.attack_batch) >= settings["stop_acc"]
    if "stop_epochs" in settings:
        stop = lambda e: e >= settings["stop_epochs"]
    model.epochs_done = train(model, x, y, settings["epochs"], settings["batch"], settings["lr"], settings["momentum"],
                              settings["wd"], settings["augment"], settings.get("adv_eps", 0.0),
                              settings.get("adv_steps", 0), settings.get("adv_step", 0.0),
                              settings.get("optimizer", "sgd"), stop, name)
    save_model(model, path, settings["arch"], settings, model.epochs_done)
    note_stage(model.name, t0, w0, model)
    log(f"[{name}] trained in {fmt_time(time.time() - t0)} ({model.epochs_done:g} epochs); saved {path}")
    MODELS[path] = model
    return model


def standard_model(cfg, dev, data):
    return trained(cfg, dev, "standard", data[0], data[1], train_settings(cfg))


def robust_model(cfg, dev, data):
    return trained(cfg, dev, "robust", data[0], data[1], train_settings(cfg, adversarial=True))


# Ilyas et al. (Table 1 / Fig. 2, Sec. 3): the numbers beside which ours are printed. The standard model's 4.5%
# is under the paper's own 7 steps of eps/5; MadryLab's stronger PGD gives that model 7-9%.
PAPER = {("standard", "standard acc"): 95.3, ("standard", "robust acc L2 0.25, 7 steps of eps/5"): 4.5,
         ("robust", "standard acc"): 90.8, ("robust", RA): 82.3,
         ("d_r", "standard acc"): 84.10, ("d_r", RA): 48.27, ("d_nr", "standard acc"): 87.68, ("d_nr", RA): 0.82,
         ("d_rand", "standard acc"): 63.3, ("d_det", "standard acc"): 43.7}


def eval_records(cfg, experiment, model, data, **extra):
    return [record(cfg, experiment, m, v, PAPER.get((experiment, m)), **s, **extra)
            for m, v, s in evaluate(cfg, model, data[2], data[3])]


def exp_standard(cfg, dev):
    """Ilyas et al.: a standard CIFAR-10 model on D (paper, ResNet-50: 95.3% standard, 4.5% robust)."""
    cfg, data = cifar(cfg, dev)
    return eval_records(cfg, "standard", standard_model(cfg, dev, data), data)


def exp_robust(cfg, dev):
    """Ilyas et al.: L2 adversarial training, eps 0.5, 7 steps of 0.1 (paper: 90.8% standard, 82.3% at 0.25)."""
    cfg, data = cifar(cfg, dev)
    return eval_records(cfg, "robust", robust_model(cfg, dev, data), data)


def save_grid(path, rows, row_names, col_names, scale=3):
    """PNG of image rows (each (n, C, H, W) in [0,1]) with row names on the left and column names on top."""
    from PIL import Image, ImageDraw
    n, (_, H, W), pad = len(rows[0]), rows[0].shape[1:], 2
    grid = torch.ones(3, len(rows) * (H + pad) + pad, n * (W + pad) + pad)  # white between the images
    for i, r in enumerate(rows):
        for j, img in enumerate(r.float().cpu().clamp(0, 1)):
            grid[:, pad + i * (H + pad):(i + 1) * (H + pad), pad + j * (W + pad):(j + 1) * (W + pad)] = img.expand(3, H, W)
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
    save_png(canvas, path)


def save_png(image, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def construct(cfg, name, settings, build, source):
    """A constructed dataset named by its settings (which hold its source model's settings and its input data's
    fingerprint): load it if it exists, else build() -> (images, labels, info dict of tensors), save it (fp16
    images, int64 labels, settings) and return the loaded dict."""
    path = artifact(cfg, name, settings)
    t0, w0 = time.time(), WORK["fwd"]
    if os.path.isfile(path):
        log(f"[{name}] loading {path}")
        ds = load_dataset(path)
        note_stage(f"{name} ({settings['source']['arch']})", t0, w0, source, loaded=True)
        return ds
    seed_all(cfg.seed, name)
    images, labels, info = build()
    info["wall_s"] = torch.tensor(time.time() - t0)
    save_dataset(path, images, labels, settings, **info)
    note_stage(f"{name} ({settings['source']['arch']})", t0, w0, source)
    log(f"[{name}] built in {fmt_time(time.time() - t0)}; saved {path}")
    return load_dataset(path)


def build_inverted(cfg, dev, data, name):
    """D_R (name 'd_r', g of the robust model) or D_NR ('d_nr', g of the standard model), Ilyas Sec. 3.1.
    Keeps, per image, the start image's index and the source model's prediction on the result."""
    x, y = data[0], data[1]
    src = (robust_model if name == "d_r" else standard_model)(cfg, dev, data)
    settings = dict(source=src.settings, data=fingerprint(x, y), inv_method=cfg.inv_method, inv_steps=cfg.inv_steps,
                    inv_step=cfg.inv_step)

    def build():
        j = random_other(len(x), device=x.device)  # start image: a different training image, drawn at random
        z, rel = invert(src, x, x[j], cfg.inv_steps, cfg.inv_step, cfg.inv_method, cfg.attack_batch, name=f"invert {name}")
        return z, y, dict(start=j, rel_dist=rel, src_pred=predict(src, z, cfg.attack_batch))

    return construct(cfg, name, settings, build, src)


def build_relabelled(cfg, dev, data, name):
    """D_rand ('d_rand') or D_det ('d_det'), Ilyas Sec. 3.2: targeted L2 PGD on the standard model towards t,
    relabelled t. Keeps the true labels and the source model's predictions on the result (its fooling rate)."""
    x, y = data[0], data[1]
    src = standard_model(cfg, dev, data)
    rule = name.removeprefix("d_")
    settings = dict(source=src.settings, data=fingerprint(x, y), rule=rule, rel_eps=cfg.rel_eps,
                    rel_steps=cfg.rel_steps, rel_step=cfg.rel_step)

    def build():
        t = relabel_targets(y, rule)
        xa, _ = pgd(src, x, t, cfg.rel_eps, cfg.rel_steps, step=cfg.rel_step, targeted=True, batch=cfg.attack_batch,
                    name=f"pgd {name}")  # the highest-loss (here: closest to t) iterate, as MadryLab's use_best
        return xa, t, dict(true=y, src_pred=predict(src, xa, cfg.attack_batch))

    return construct(cfg, name, settings, build, src)


def constructed_model(cfg, dev, name, ds):
    """A fresh cfg.arch model trained on a constructed dataset with the recipe of the paper's Sec. 3 and App. C:
    standard training for --con-epochs (non-robust features take longer to fit than robust ones); D_rand at
    --rel-lr; D_det without augmentation, since its labels depend on the exact perturbation. Nakkiran's sets
    ('bugs-...') as he trained them: like a standard model (--epochs), without augmentation."""
    over = dict(epochs=cfg.epochs if name.startswith("bugs") else cfg.con_epochs, source=ds["settings"])
    if name == "d_rand":
        over["lr"] = cfg.rel_lr
    if name.startswith(("d_det", "bugs")):
        over["augment"] = False
    return trained(cfg, dev, f"{name}-model", ds["images"].to(dev), ds["labels"].to(dev), train_settings(cfg, **over))


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


def construction_records(cfg, name, ds):
    """How well a constructed dataset was made. Inversions: the relative feature distance, and the source
    model's accuracy on the images against their label y and against the start image's label (the paper's
    construction should give ~100% / ~10%: the start image's content must not survive). Relabelled sets: the
    fooling rate, the share of images the source classifies as their target t, over t != y."""
    y, pred = ds["labels"], ds["src_pred"]
    recs = [record(cfg, name, "construction wall s", ds["wall_s"].item())]
    if "rel_dist" in ds:
        rel = ds["rel_dist"].float()
        start_label = ds["true_start"] if "true_start" in ds else y[ds["start"]]
        return recs + [
            record(cfg, name, "inversion rel. dist median", rel.median().item(), method=cfg.inv_method,
                   steps=cfg.inv_steps, step=cfg.inv_step),
            record(cfg, name, "inversion rel. dist p95", rel.quantile(0.95).item()),
            record(cfg, name, "source acc on images vs y", 100 * (pred == y).float().mean().item(), 100),
            record(cfg, name, "source acc on images vs start's label", 100 * (pred == start_label).float().mean().item(), 10)]
    other = y != ds["true"]
    return recs + [
        record(cfg, name, "fooling rate (t != y)", 100 * (pred == y)[other].float().mean().item(), None,
               eps=cfg.rel_eps, steps=cfg.rel_steps, step=cfg.rel_step),
        record(cfg, name, "share with t = y", 100 * (1 - other.float().mean().item()))]


def exp_constructed(cfg, dev, name):
    """Build one of D_R, D_NR, D_rand, D_det, train a fresh cfg.arch model on it, evaluate it on the real
    CIFAR-10 test set (Ilyas et al. Sec. 3.1 / 3.2, Table 1 / Fig. 2)."""
    cfg, data = cifar(cfg, dev)
    ds = (build_inverted if name in ("d_r", "d_nr") else build_relabelled)(cfg, dev, data, name)
    dataset_grid(cfg, name, data, ds)
    model = constructed_model(cfg, dev, name, ds)
    s = model.settings
    recs = construction_records(cfg, name, ds) + eval_records(cfg, name, model, data, lr=s["lr"], augment=s["augment"],
                                                              epochs=s["epochs"])
    if name == "d_det":  # high here means the model learnt D_det's robust features (y -> y+1), not its non-robust ones
        recs.append(record(cfg, name, "test acc on shifted labels y+1", 100 * accuracy(model, data[2], (data[3] + 1) % 10, cfg.attack_batch)))
    return recs


def exp_train_on(cfg, dev):
    """Train a fresh model on a released dataset folder (CIFAR_ims / CIFAR_lab, e.g. MadryLab's d_robust_CIFAR)
    and evaluate it on the real CIFAR-10 test set, so our constructions can be compared with theirs."""
    ims, lab = load_released(cfg.dataset)
    cfg, data = cifar(cfg, dev)
    n = min(cfg.n_train, len(ims))
    model = trained(cfg, dev, "train-on", ims[:n].to(dev), lab[:n].to(dev), train_settings(cfg))
    return eval_records(cfg, f"train-on {os.path.basename(os.path.normpath(cfg.dataset))}", model, data)


def exp_ilyas(cfg, dev):
    """Ilyas et al. Sec. 3 end to end: both source models, D_R, D_NR, D_rand, D_det, four fresh models."""
    recs = exp_standard(cfg, dev) + exp_robust(cfg, dev)
    for name in ("d_r", "d_nr", "d_rand", "d_det"):
        recs += exp_constructed(cfg, dev, name)
    return recs


def exp_mislabeled(cfg, dev):
    """Wallace (Distill 2019): a deliberately weak teacher relabels the CIFAR-10 training set with its own
    predictions; only the images it gets *wrong* are kept; a fresh model trained on them alone is tested on
    the real test set. Response (ResNet-18, 2 epochs): teacher 62.5% train / 63.1% test, 18,768 kept, 49.7%.
    Our teacher stops as soon as its accuracy on (2000) training images reaches --mis-teacher-acc (62.5), so
    it is as weak as his whatever the architecture and scale (at most --mis-teacher-epochs)."""
    cfg, (x, y, xte, yte) = cifar(cfg, dev)
    teacher = trained(cfg, dev, "mislabeled-teacher", x, y,
                      train_settings(cfg, epochs=cfg.mis_teacher_epochs, stop_acc=cfg.mis_teacher_acc))
    xk, yk, keep = keep_wrong(teacher, x, y, cfg.attack_batch)
    log(f"[mislabeled] kept {len(xk)} of {len(x)} training images, all labelled with the teacher's wrong class")
    student = trained(cfg, dev, "mislabeled-student", xk, yk,
                      train_settings(cfg, epochs=cfg.mis_epochs, teacher=teacher.settings))
    e = "mislabeled"
    return [record(cfg, e, "teacher epochs trained", teacher.epochs_done, 2, stop_acc=cfg.mis_teacher_acc),
            record(cfg, e, "teacher train acc", 100 * (1 - keep.float().mean().item()), 62.5),
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
    xm, ym, xmt, ymt = load_mnist(cfg.data, False, cfg.download)
    xf = load_mnist(cfg.data, True, cfg.download)[0]  # images only: Fashion's labels are not used
    n = first_n(cfg.n_train, min(len(xm), len(xf)), "n-train")
    cfg = dataclasses.replace(cfg, n_train=n, n_test=first_n(cfg.n_test, len(xmt), "n-test"))
    xm, ym, xf = xm[:n].to(dev), ym[:n].to(dev), xf[:n].to(dev)
    xmt, ymt = xmt[:cfg.n_test].to(dev), ymt[:cfg.n_test].to(dev)
    mnist = dict(arch="mnist_cnn", width=0, seed=cfg.seed, batch=cfg.mnist_batch, lr=cfg.mnist_lr,
                 momentum=cfg.momentum, wd=cfg.wd, augment=False, epochs=cfg.mnist_epochs)
    teacher = trained(cfg, dev, "mnist-teacher", xm, ym, mnist)
    e = "mnist-fashion"
    recs = [record(cfg, e, "teacher MNIST test acc", 100 * accuracy(teacher, xmt, ymt, cfg.attack_batch), 99.1, "mnist_cnn",
                   epochs=cfg.mnist_epochs)]
    for variant, paper in (("own", 91.04), ("mnist", 94.5)):
        xv = fashion_as_mnist(xf, variant)
        labels = predict(teacher, xv, cfg.attack_batch)  # the teacher's argmax labels on Fashion images
        hist = torch.bincount(labels, minlength=10).tolist()
        log(f"[{e}] Fashion-MNIST relabelled by the MNIST teacher ({variant} statistics): label histogram {hist}")
        student = trained(cfg, dev, f"mnist-student-{variant}", xv, labels, dict(mnist, teacher=teacher.settings))
        recs.append(record(cfg, e, f"student MNIST test acc ({variant} stats)", 100 * accuracy(student, xmt, ymt, cfg.attack_batch),
                           paper, "mnist_cnn", label_hist=hist, epochs=cfg.mnist_epochs))
    return recs


def exp_bugs(cfg, dev):
    """Nakkiran, "Adversarial Examples are Just Bugs, Too" (Distill 2019): adversarial examples made *not* to
    transfer. Targeted PGD towards t = (y + 1) mod 10 on the target (the standard model) while an ensemble of
    K independently trained models is kept on y (nontransferable_objective). Beside plain targeted PGD with
    the same budget, report the attack success on the target, the transfer to a fresh model, and a fresh model
    trained on the D_det-style set (x', t): test accuracy on the true and on the shifted labels. These "bugs"
    carry no features that generalise; plain PGD examples do."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    target = standard_model(cfg, dev, data)
    members = [trained(cfg, dev, f"bugs-member{k}", x, y, train_settings(cfg, member=k)) for k in range(cfg.bugs_k)]
    fresh = trained(cfg, dev, "bugs-fresh", x, y, train_settings(cfg, member="fresh"))
    t = (y + 1) % 10
    paper = {("l2", "pgd"): (99.9, 82.5, 33.2, 27.3), ("l2", "bugs"): (99.3, 1.7, 2.8, 70.8),
             ("linf", "pgd"): (99.6, 52.1, 23.7, 40.4), ("linf", "bugs"): (98.6, 0.8, 2.5, 75.9)}
    recs = []
    for norm, eps, step in (("l2", 2.5, 0.5), ("linf", 8 / 255, 2 / 255)):
        for method in ("pgd", "bugs"):
            name = f"bugs-{norm}-{method}"
            settings = dict(source=target.settings, data=fingerprint(x, y), norm=norm, eps=eps, step=step, steps=10,
                            members=[m.settings for m in members] if method == "bugs" else [])

            def build():
                if method == "pgd":
                    xa, _ = pgd(target, x, t, eps, 10, norm, step, targeted=True, batch=cfg.attack_batch, name=name)
                else:
                    xa, _ = pgd(target, x, torch.stack([t, y], 1), eps, 10, norm, step, batch=cfg.attack_batch,
                                objective=nontransferable_objective(target, members), name=name)
                return xa, t, {}

            ds = construct(cfg, name, settings, build, target)
            xa = ds["images"].to(dev)
            success = 100 * (predict(target, xa, cfg.attack_batch) == t).float().mean().item()
            transfer = 100 * (predict(fresh, xa, cfg.attack_batch) == t).float().mean().item()
            model = constructed_model(cfg, dev, name, ds)
            p, e = paper[(norm, method)], f"bugs {norm} {method}"
            recs += [record(cfg, e, "attack success on target", success, p[0], norm=norm, eps=round(eps, 5), steps=10,
                            step=round(step, 5), k=len(settings["members"])),
                     record(cfg, e, "transfer to fresh model", transfer, p[1]),
                     record(cfg, e, "trained-on: test acc, true labels", 100 * accuracy(model, xte, yte, cfg.attack_batch), p[2]),
                     record(cfg, e, "trained-on: test acc, shifted labels",
                            100 * accuracy(model, xte, (yte + 1) % 10, cfg.attack_batch), p[3])]
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
    Linf 0.9, yet a network that memorises the noisy labels (his: ResNet-18, Adam lr 1e-5, batch 128,
    20 epochs, 99.9% train accuracy) is flipped by Linf 0.01 on almost every test point, while the same run
    stopped after its first epoch is not. The attack clamps to [-1.1, 1.1], the images' range."""
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = (t.to(dev) for t in squares_data(cfg.squares_n, generator=g))
    xte, yte = (t.to(dev) for t in squares_data(max(cfg.squares_n // 10, 100), generator=g))

    def flipped(m, eps):  # share of test points some Linf PGD iterate moves off the model's own prediction
        _, moved = pgd(m, xte, predict(m, xte, cfg.attack_batch), eps, 10, "linf", lo=-1.1, hi=1.1, batch=cfg.attack_batch)
        return 100 * moved.float().mean().item()

    linear = LinearNet(2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).to(dev)
    with torch.no_grad():  # logit_1 - logit_0 = 2 * mean pixel: each pixel keeps its sign under Linf < 0.9
        linear.head.weight.copy_(torch.stack([-torch.ones(x[0].numel()), torch.ones(x[0].numel())]).to(dev) / x[0].numel())
        linear.head.bias.zero_()
    e = "squares"
    recs = [record(cfg, e, "linear: test acc", 100 * accuracy(linear, xte, yte, cfg.attack_batch), None, "linear"),
            record(cfg, e, "linear: flipped by Linf 0.89", flipped(linear, 0.89), 0, "linear", norm="linf", eps=0.89, steps=10)]
    s = train_settings(cfg, epochs=cfg.squares_epochs, batch=128, lr=cfg.squares_lr, optimizer="adam", augment=False,
                       classes=2, norm=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    for what, settings in (("memorising", s), ("1 epoch", dict(s, stop_epochs=1))):  # the same run, stopped early
        m = trained(cfg, dev, "squares-net", x, y, settings)
        recs += [record(cfg, e, f"net {what}: train acc", 100 * accuracy(m, x, y, cfg.attack_batch), 99.9 if what == "memorising" else None,
                        epochs=m.epochs_done),
                 record(cfg, e, f"net {what}: test acc", 100 * accuracy(m, xte, yte, cfg.attack_batch)),
                 record(cfg, e, f"net {what}: flipped by Linf 0.01", flipped(m, 0.01), None, norm="linf", eps=0.01, steps=10)]
    return recs


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
    """Goh, "Robust Feature Leakage" (Distill 2019): the 10 linear features of a robust linear classifier
    (L2 adversarial training) carry information into D_rand but not into D_det: a linear model on those
    features trained on D_rand reaches 23.5% on the real test set (his deep model on the same D_rand: 88%),
    on D_det 6.81%. His features meet two conditions, both exact for a linear model: Spec 1, robustly useful
    (certified accuracy at L2 0.25), and Spec 2, stable (>= 80% of test predictions certified unchanged
    within L2 0.25)."""
    cfg, data = cifar(cfg, dev)
    x, y, xte, yte = data
    lin = trained(cfg, dev, "leakage-linear", x, y, train_settings(
        cfg, arch="linear", width=0, epochs=cfg.leak_epochs, lr=cfg.leak_lr, augment=False, adv_eps=cfg.leak_eps,
        adv_steps=cfg.adv_steps, adv_step=2.5 * cfg.leak_eps / cfg.adv_steps))
    e = "leakage"
    feats = lambda imgs: over_set(lin, lambda xb: lin(xb).float(), imgs, cfg.attack_batch)  # (N, 10): its features
    certified = linear_certified(lin, xte, yte, 0.25).float().mean().item()
    stable = linear_certified(lin, xte, predict(lin, xte, cfg.attack_batch), 0.25).float().mean().item()
    recs = [record(cfg, e, "robust linear: test acc", 100 * accuracy(lin, xte, yte, cfg.attack_batch), None, "linear", adv_eps=cfg.leak_eps),
            record(cfg, e, "robust linear: certified acc L2 0.25", 100 * certified, None, "linear"),
            record(cfg, e, "robust linear: stable predictions L2 0.25", 100 * stable, 80, "linear")]
    seed_all(cfg.seed, "leakage-head")
    head = fit_linear(feats(x), y)
    recs.append(record(cfg, e, "linear on features, trained on D", 100 * (head(feats(xte)).argmax(1) == yte).float().mean().item(),
                       None, "linear"))
    for name, paper, deep in (("d_rand", 23.5, 88), ("d_det", 6.81, None)):
        ds = build_relabelled(cfg, dev, data, name)
        seed_all(cfg.seed, f"leakage-head-{name}")
        head = fit_linear(feats(ds["images"].to(dev)), ds["labels"].to(dev))
        acc = 100 * (head(feats(xte)).argmax(1) == yte).float().mean().item()
        recs += [record(cfg, e, f"linear on features, trained on {name}", acc, paper, "linear"),
                 record(cfg, e, f"deep model trained on {name}: test acc", 100 * accuracy(
                     constructed_model(cfg, dev, name, ds), xte, yte, cfg.attack_batch), deep)]
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
    save_png(im, path)


def exp_transfer(cfg, dev):
    """Ilyas Fig. 3: architectures that learn more from the source's D_det are those its adversarial examples
    transfer to. D_det is built on the standard model of --transfer-source (the paper's: ResNet-50). For each
    architecture: test accuracy after training on that D_det, and the share of D_det's targeted examples that
    a standard model of it classifies as the target. As in the paper, the source's own row is self-transfer:
    the source model itself is attacked (the paper's 100%); every other architecture's is an independently
    trained standard model. The paper's numbers are attached only when the source is resnet50, as there."""
    cfg, data = cifar(cfg, dev)
    src_cfg = dataclasses.replace(cfg, arch=cfg.transfer_source)
    source = standard_model(src_cfg, dev, data)
    ds = build_relabelled(src_cfg, dev, data, "d_det")
    xa, t = ds["images"].to(dev), ds["labels"].to(dev)
    paper = {"resnet18": (41, 92), "resnet50": (45, 100), "vgg16": (28, 66)} if cfg.transfer_source == "resnet50" else {}
    recs, points = [], []
    for arch in cfg.transfer_archs.split(","):
        acfg = dataclasses.replace(cfg, arch=arch, width=cfg.width if arch == cfg.transfer_source else
                                   cfg.transfer_width or cfg.width)
        attacked = source if arch == cfg.transfer_source else standard_model(acfg, dev, data)
        transfer = 100 * (predict(attacked, xa, cfg.attack_batch) == t).float().mean().item()
        acc = 100 * accuracy(constructed_model(acfg, dev, "d_det", ds), data[2], data[3], cfg.attack_batch)
        p = paper.get(arch, (None, None))
        recs += [record(cfg, "transfer", "D_det-trained test acc", acc, p[0], arch, source=cfg.transfer_source),
                 record(cfg, "transfer", "transfer rate", transfer, p[1], arch, source=cfg.transfer_source,
                        self_transfer=arch == cfg.transfer_source)]
        points.append((arch + (" (source)" if arch == cfg.transfer_source else ""), transfer, acc))
    scatter(os.path.join(cfg.out, "transfer.png"), points, "transfer rate (%)", "test acc after training on D_det (%)")
    return recs


def exp_report(cfg, dev):
    """Print where the time went (the stages timed since --since) and the claims; rewrite results.md."""
    res = read_results(cfg.out)
    log(stage_table([s for s in res["stages"] if s["time"] >= cfg.since], time.time() - cfg.since if cfg.since else None))
    log("\n".join(f"{verdict:8s} {claim} ({criterion}; ours: {ours or '-'})"
                  for claim, criterion, ours, verdict in check_claims(res["records"])))
    return []


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
    "report": exp_report,
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


# Numbers that may be 0 (all images; no perturbation; no decay or momentum); every other number must be > 0.
ZERO_OK = {"n_train", "n_test", "seed", "since", "adv_eps", "rel_eps", "leak_eps", "wd", "momentum", "transfer_width"}


def check_config(cfg, given):
    """Every setting checked before any data is read or any model trained: one clear error, exit 2."""
    for f in dataclasses.fields(Config):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not (math.isfinite(v) and (v >= 0 if f.name in ZERO_OK else v > 0)):
                raise AdvexError(f"{flag} must be a finite number {'>= 0' if f.name in ZERO_OK else '> 0'}, got {v}")
    if cfg.momentum >= 1:
        raise AdvexError(f"--momentum must be below 1, got {cfg.momentum}")
    archs = cfg.transfer_archs.split(",")
    for name, values in (("arch", [cfg.arch]), ("transfer-source", [cfg.transfer_source]), ("transfer-archs", archs)):
        for a in values:
            if a not in ARCHS:
                raise AdvexError(f"unknown --{name} {a!r}; choose from {', '.join(ARCHS)}")
    if cfg.transfer_source not in archs or len(set(archs)) < len(archs):
        raise AdvexError(f"--transfer-archs {cfg.transfer_archs!r} must list each architecture once, the source "
                         f"--transfer-source {cfg.transfer_source} among them (Fig. 3's self-transfer point)")
    if cfg.width < 2 or cfg.transfer_width == 1:  # fastnet's stem has width // 2 channels
        raise AdvexError(f"--width and --transfer-width must be >= 2 (or --transfer-width 0), got {cfg.width}, "
                         f"{cfg.transfer_width}")
    for name, value, choices in (("scale", cfg.scale, SCALES), ("inv-method", cfg.inv_method, ("fast", "paper"))):
        if value not in choices:
            raise AdvexError(f"unknown --{name} {value!r}; choose from {', '.join(choices)}")
    try:
        eps = parse_floats(cfg.eval_eps)
        seeds = [int(v) for v in cfg.seeds.split(",") if v.strip()] or [cfg.seed]
    except ValueError as e:
        raise AdvexError(f"bad number in --eval-eps or --seeds: {e}") from None
    if not eps or not all(0 <= e < math.inf for e in eps):
        raise AdvexError(f"--eval-eps must be a comma list of finite radii >= 0, got {cfg.eval_eps!r}")
    if any(s < 0 for s in seeds):
        raise AdvexError(f"--seeds must be >= 0, got {cfg.seeds!r}")
    if not 0 < cfg.mis_teacher_acc <= 100:
        raise AdvexError(f"--mis-teacher-acc is a percentage in (0, 100], got {cfg.mis_teacher_acc}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise AdvexError(f"unknown --device {cfg.device!r}; choose auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise AdvexError(f"--device {cfg.device} asked for, but CUDA is not available on this machine")
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        raise AdvexError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:  # --out: creatable and writable, before hours of training find out it is not
        os.makedirs(cfg.out, exist_ok=True)
        probe = os.path.join(cfg.out, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise AdvexError(f"--out {cfg.out} is not a writable folder ({why(e)})") from None
    read_results(cfg.out)
    return seeds


def parse_args(argv):
    p = argparse.ArgumentParser(prog="advex.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    if cfg.scale not in SCALES:
        raise AdvexError(f"unknown --scale {cfg.scale!r}; choose from {', '.join(SCALES)}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in SCALES[cfg.scale].items() if k not in given})
    if experiment == "train-on" and not cfg.dataset:
        raise AdvexError("train-on needs --dataset DIR (a folder with CIFAR_ims and CIFAR_lab)")
    return experiment, cfg, check_config(cfg, given)


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


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
        experiment, cfg, seeds = parse_args(sys.argv[1:] if argv is None else argv)
        dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                           "cpu" if cfg.device == "auto" else cfg.device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        t0 = time.time()
        for seed in seeds[:1] if experiment == "report" else seeds:  # one report covers every seed
            c = dataclasses.replace(cfg, seed=seed)
            log(f"advex {experiment} seed {seed} on {device_name(dev)}, scale {cfg.scale}")
            STAGES.clear()
            RUNS.clear()
            MODELS.clear()  # a checkpoint changed between two in-process calls is read again
            records = EXPERIMENTS[experiment](c, dev)
            stages = [dict(s, device=device_name(dev), seed=seed, experiment=experiment) for s in STAGES]
            write_results(cfg.out, records, RUNS, stages)
            for r in records:
                log(f"  {r['experiment']:24s} {r['metric']:42s} {r['value']:9.2f}" +
                    ("" if r["paper"] is None else f"   (paper {r['paper']:g})"))
        log(f"advex {experiment}: {fmt_time(time.time() - t0)}; results in {cfg.out}/results.md")

    cli(run, "advex")


if __name__ == "__main__":
    main()
