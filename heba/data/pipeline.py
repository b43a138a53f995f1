"""Training and test images as uint8 batches: decode once, crop per sample, normalise on the device.

The published pipeline (Dassl ``build_transform``, the one heba's backbones
build: :func:`heba.train.backbones.openclip.dassl_transforms`) decodes every
training image with PIL on every epoch, then RandomResizedCrop (scale
(0.08, 1), ratio (3/4, 4/3), bicubic), RandomHorizontalFlip, ToTensor and
Normalize (OpenAI CLIP mean / std). Two pipelines give the same samples:

* ``"published"``: PIL decode + PIL crop / resize / flip per sample, exactly
  today's image (bit for bit before normalisation);
* ``"fast"`` (default): the training set decoded once into one uint8 buffer
  (:class:`DecodedImages`, shorter side at most :func:`keep_short` pixels,
  915 at 224: larger images are reduced once, no crop of them enlarged; under
  a memory cap), then per sample only the crop + bicubic resize (torchvision's
  antialiased bicubic on uint8, PIL's kernel) and the flip. Over the cap it
  falls back to ``"published"`` per sample (the reason is in ``.note``).

Both take their crop boxes and flips from :class:`EpochSampler`: drawn in the
main process, in the epoch's sample order, from one generator seeded by
``(seed, epoch, rank)``, with the same calls torchvision's
``RandomResizedCrop.get_params`` and ``RandomHorizontalFlip`` make on the
global generator (:func:`draw_box`, tested equal): the boxes do not depend on
the number of loader workers. A box is drawn on the image's original size and
scaled to the stored one. Batches are uint8 ``[B, 3, S, S]``; the device
converts and normalises them (:func:`normalize_on_device`, the same float ops
as ToTensor + Normalize).

Example::

    >>> from torchvision import transforms as T
    >>> tf = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0),
    ...                 interpolation=T.InterpolationMode.BICUBIC),
    ...                 T.RandomHorizontalFlip(), T.ToTensor(),
    ...                 T.Normalize((0.5,) * 3, (0.25,) * 3)])
    >>> TrainSpec.from_transform(tf).size
    224
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from heba.data.coop import DataError

PIPELINES = ("fast", "published")


@dataclass(frozen=True)
class TrainSpec:
    """A RandomResizedCrop (+ optional flip) + ToTensor + Normalize transform, as numbers."""

    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: Optional[float] = 0.5                  # None: no flip drawn
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"

    @classmethod
    def from_transform(cls, tf) -> Optional["TrainSpec"]:
        """The spec of a torchvision ``Compose`` like the published one; None for any other."""
        from torchvision import transforms as T
        parts = [t for t in getattr(tf, "transforms", ()) if not _is_rgb_convert(t)]
        if len(parts) not in (3, 4) or not isinstance(parts[0], T.RandomResizedCrop):
            return None
        rrc, flip = parts[0], parts[1] if len(parts) == 4 else None
        if flip is not None and not isinstance(flip, T.RandomHorizontalFlip):
            return None
        mean_std = _to_tensor_normalize(parts[-2:])
        interp = _interp_name(rrc.interpolation)
        if mean_std is None or interp is None or len(rrc.size) != 2 or rrc.size[0] != rrc.size[1]:
            return None
        return cls(rrc.size[0], tuple(rrc.scale), tuple(rrc.ratio),
                   None if flip is None else float(flip.p), *mean_std, interp)


@dataclass(frozen=True)
class EvalSpec:
    """A deterministic PIL transform (``pil``: Resize, CenterCrop, ...) + ToTensor + Normalize."""

    pil: object
    mean: tuple
    std: tuple

    @classmethod
    def from_transform(cls, tf) -> Optional["EvalSpec"]:
        """The spec of a deterministic ``Compose`` ending in ToTensor + Normalize; else None."""
        from torchvision import transforms as T
        parts = list(getattr(tf, "transforms", ()))
        mean_std = _to_tensor_normalize(parts[-2:])
        head = [t for t in parts[:-2] if not _is_rgb_convert(t)]   # images are RGB once read
        ok = all(isinstance(t, (T.Resize, T.CenterCrop)) for t in head)
        if mean_std is None or not ok:
            return None
        return cls(T.Compose(head), *mean_std)

    def key(self) -> str:
        """What the prepared crops depend on (the ``pil`` part's repr; mean / std do not)."""
        return " ".join(repr(self.pil).split())


def _is_rgb_convert(t) -> bool:
    """A step that only converts to RGB (images are RGB once read): open_clip's."""
    if type(t).__name__ == "MaybeConvertMode":
        return getattr(t, "mode", None) == "RGB"
    return callable(t) and getattr(t, "__name__", "") in ("_convert_to_rgb", "convert_to_rgb")


def _to_tensor_normalize(parts):
    from torchvision import transforms as T
    if len(parts) != 2 or not isinstance(parts[0], T.ToTensor) \
            or not isinstance(parts[1], T.Normalize):
        return None
    return tuple(float(m) for m in parts[1].mean), tuple(float(s) for s in parts[1].std)


def _interp_name(mode) -> Optional[str]:
    name = getattr(mode, "value", None)
    return name if name in ("bicubic", "bilinear") else None


# --- the draws -------------------------------------------------------------------------------

def draw_box(height: int, width: int, scale, ratio, g: torch.Generator):
    """``(top, left, h, w)`` of a RandomResizedCrop on a ``height x width`` image, drawn from ``g``.

    The same draws, in the same order and dtype, as torchvision's
    ``RandomResizedCrop.get_params`` makes from the global generator (ten
    tries, then the central crop of the clamped ratio).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=g)).item()
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_flip(p: Optional[float], g: torch.Generator) -> bool:
    """RandomHorizontalFlip's draw (``torch.rand(1) < p``) from ``g``; none when ``p`` is None."""
    return p is not None and bool(torch.rand(1, generator=g) < p)


def epoch_order(n: int, shuffle_seed: int, epoch: int, world: int = 1, rank: int = 0,
                drop_last: bool = False, dist_seed: int = 0) -> list:
    """The sample order of an epoch, as heba's loader has drawn it.

    One process: ``RandomSampler`` on ``Generator().manual_seed(shuffle_seed)``
    after the one int64 the DataLoader iterator draws from that generator.
    ``world > 1``: ``DistributedSampler(shuffle=True, seed=dist_seed)`` at ``epoch``.
    """
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                               seed=dist_seed, drop_last=drop_last)
        s.set_epoch(epoch)
        return list(s)
    from torch.utils.data import RandomSampler
    g = torch.Generator().manual_seed(shuffle_seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)    # the iterator's base seed
    return list(RandomSampler(range(n), generator=g))


class EpochSampler(Sampler):
    """Tickets ``(index, top, left, h, w, flip)`` of one epoch (module docstring).

    ``sizes[i] = (height, width)`` of image ``i`` as decoded (``None``: plain
    indices, no draws, for data sets of ready tensors). :meth:`set_epoch` picks
    the epoch: ``shuffle_seed`` and ``aug_seed`` of it, computed by the caller.
    """

    def __init__(self, n: int, spec: Optional[TrainSpec], sizes=None, world: int = 1,
                 rank: int = 0, drop_last: bool = False, dist_seed: int = 0):
        self.n, self.spec, self.sizes = n, spec, sizes
        self.world, self.rank, self.drop_last, self.dist_seed = world, rank, drop_last, dist_seed
        self.set_epoch(0, 0, 0)

    def set_epoch(self, epoch: int, shuffle_seed: int, aug_seed: int) -> None:
        self.epoch, self.shuffle_seed, self.aug_seed = epoch, shuffle_seed, aug_seed

    def __len__(self):
        if self.world == 1:
            return self.n
        if self.drop_last and self.n % self.world:
            return self.n // self.world
        return math.ceil(self.n / self.world)

    def __iter__(self):
        order = epoch_order(self.n, self.shuffle_seed, self.epoch, self.world, self.rank,
                            self.drop_last, self.dist_seed)
        if self.sizes is None:
            yield from order
            return
        g = torch.Generator().manual_seed(self.aug_seed)
        if self.world > 1:       # the DistributedSampler loader drew its base seed globally
            torch.empty((), dtype=torch.int64).random_(generator=g)
        spec = self.spec
        for i in order:
            h, w = self.sizes[i]
            box = draw_box(int(h), int(w), spec.scale, spec.ratio, g)
            yield (i, *box, draw_flip(spec.flip_p, g))


# --- decoding --------------------------------------------------------------------------------

#: Modes whose samples are wider than 8 bits: scaled by :func:`to_rgb`, not clipped.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageModeError(ValueError):
    """An image whose samples do not fit the 8-bit rule of :func:`to_rgb`."""


def to_rgb(img):
    """``img`` as an 8-bit RGB PIL image, its samples scaled by its mode's range.

    16-bit grey (``I;16``, ``I;16B``): ``round(v / 257)``; 32-bit integer
    (``I``): the same when every value is in 0..65535; 32-bit float (``F``):
    ``round(v * 255)`` when every value is in [0, 1]. Other modes (palette,
    alpha, grey, CMYK, ...) by ``img.convert("RGB")``; 16-bit colour PNGs
    arrive from PIL already 8-bit (the high byte). Raises :class:`ImageModeError`
    (its message names the mode) for ``I`` or ``F`` values out of range.

    Example::

        >>> import numpy as np; from PIL import Image
        >>> to_rgb(Image.fromarray(np.full((1, 1), 65535, np.uint16))).getpixel((0, 0))
        (255, 255, 255)
    """
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    import numpy as np
    from PIL import Image
    v = np.asarray(img).astype(np.float64)                   # [H, W]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if img.mode == "F":
        if not (np.isfinite(v).all() and lo >= 0.0 and hi <= 1.0):
            raise ImageModeError(f"mode F (32-bit float) holds values from {lo:g} to {hi:g}, "
                                 f"expected [0, 1]: save it as 8-bit RGB or floats in [0, 1]")
        levels = np.rint(v * 255.0)
    else:
        if lo < 0 or hi > 65535:
            raise ImageModeError(f"mode {img.mode} (32-bit integer) holds values from {lo:g} "
                                 f"to {hi:g}, expected 0..65535: save it as 8- or 16-bit")
        levels = np.rint(v / 257.0)
    return Image.fromarray(levels.astype(np.uint8), "L").convert("RGB")


def read_rgb(path: str):
    """The 8-bit RGB PIL image of ``path`` (:func:`to_rgb`): the one way train, test crops,
    predict and the image check open an image; :class:`DataError` naming the file when it
    cannot be read or its samples do not fit 8 bits."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except ImageModeError as err:
        raise DataError(f"image {path} cannot be read as 8-bit RGB: {err}") from None
    except Exception as err:    # checked before training; this is a file changed since
        raise DataError(f"image {path} cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())})") from None


def header_size(path: str) -> tuple:
    """``(height, width)`` from the file's header (no decode)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception as err:
        raise DataError(f"image {path} cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())})") from None
    return h, w


def stored_size(h: int, w: int, max_short: Optional[int]) -> tuple:
    """The size an ``h x w`` image is kept at: shorter side at most ``max_short``."""
    short = min(h, w)
    if not max_short or short <= max_short:
        return h, w
    f = max_short / short
    return max(1, round(h * f)), max(1, round(w * f))


def keep_short(spec: TrainSpec) -> int:
    """The shorter side kept when decoding once: the least at which the smallest crop
    (``scale[0]`` of the area at the extreme ratio) is still ``spec.size`` pixels, so a crop
    of the kept image is never enlarged where the file's would not be (915 at 224)."""
    return math.ceil(spec.size / math.sqrt(spec.scale[0] * min(spec.ratio[0], 1 / spec.ratio[1])))


def default_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


class DecodedImages:
    """Images decoded once: one flat uint8 buffer ``[sum h*w*3]`` (HWC per image).

    ``orig[i] = (H, W)`` as in the file, ``stored[i] = (h, w)`` as kept
    (:func:`stored_size`); :meth:`image` is a ``[3, h, w]`` view. One storage,
    so forked loader workers share it without copying.
    """

    def __init__(self, flat, offsets, orig, stored):
        self.flat, self.offsets, self.orig, self.stored = flat, offsets, orig, stored

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def __len__(self):
        return len(self.orig)

    def image(self, i: int) -> torch.Tensor:
        h, w = self.stored[i]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.flat[a:b].view(int(h), int(w), 3).permute(2, 0, 1)     # [3, h, w]

    @staticmethod
    def plan(paths: Sequence[str], max_short: Optional[int], threads: Optional[int] = None):
        """``(orig sizes, stored sizes, bytes)`` from the headers alone."""
        with ThreadPoolExecutor(threads or default_threads()) as pool:
            orig = list(pool.map(header_size, paths))
        stored = [stored_size(h, w, max_short) for h, w in orig]
        return orig, stored, sum(h * w * 3 for h, w in stored)

    @classmethod
    def decode(cls, paths: Sequence[str], max_short: Optional[int] = None,
               threads: Optional[int] = None, plan=None) -> "DecodedImages":
        """Decode ``paths`` (on ``threads`` threads: PIL decodes without the GIL)."""
        import numpy as np
        orig, stored, total = plan or cls.plan(paths, max_short, threads)
        offsets = [0]
        for h, w in stored:
            offsets.append(offsets[-1] + h * w * 3)
        flat = torch.empty(total, dtype=torch.uint8)
        buf = flat.numpy()

        def one(i):
            img = read_rgb(paths[i])
            h, w = stored[i]
            if (img.height, img.width) != tuple(orig[i]):
                raise DataError(f"image {paths[i]} changed while it was read")
            if (h, w) != tuple(orig[i]):
                from PIL import Image
                img = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
            buf[offsets[i]:offsets[i + 1]] = np.asarray(img).reshape(-1)

        with ThreadPoolExecutor(threads or default_threads()) as pool:
            list(pool.map(one, range(len(paths))))
        return cls(flat, torch.tensor(offsets), torch.tensor(orig).view(-1, 2),
                   torch.tensor(stored).view(-1, 2))


def default_cache_bytes() -> int:
    """The memory cap of a decoded training set: a quarter of RAM, at most 8 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(min(8 << 30, ram // 4))


# --- the training data set -------------------------------------------------------------------

def pil_to_uint8(img) -> torch.Tensor:
    """``[3, H, W]`` uint8 of an RGB PIL image (the bytes ToTensor divides by 255)."""
    import numpy as np
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def crop_resize_pil(img, box, size: int, interpolation: str = "bicubic", flip: bool = False):
    """The published sample: PIL crop + resize + flip, as torchvision's transforms on PIL do."""
    from PIL import Image
    top, left, h, w = box
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    out = img.crop((left, top, left + w, top + h)).resize((size, size), mode)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def crop_resize_uint8(img: torch.Tensor, box, size: int, interpolation: str = "bicubic",
                      flip: bool = False) -> torch.Tensor:
    """``[3, size, size]`` uint8: the ``box`` of ``img [3, h, w]`` resized (antialiased, PIL's
    bicubic kernel) and flipped."""
    from torchvision.transforms.v2 import functional as F2
    from torchvision.transforms import InterpolationMode
    top, left, h, w = box
    out = F2.resize(img[:, top:top + h, left:left + w], [size, size],
                    interpolation=InterpolationMode(interpolation), antialias=True)
    return (out.flip(-1) if flip else out).contiguous()


def scale_box(box, orig, stored):
    """A box drawn on the original ``(H, W)``, in the coordinates of the stored ``(h, w)``."""
    (H, W), (h, w) = orig, stored
    if (H, W) == (h, w):
        return box
    top, left, bh, bw = box
    fy, fx = h / H, w / W
    t, l_ = min(h - 1, round(top * fy)), min(w - 1, round(left * fx))
    return t, l_, max(1, min(h - t, round(bh * fy))), max(1, min(w - l_, round(bw * fx)))


class TrainImages(Dataset):
    """``(uint8 [3, S, S], label)`` of a ticket ``(index, top, left, h, w, flip)``.

    ``items``: :class:`heba.data.sampling.Item` (``.path``, ``.label``);
    ``decoded``: a :class:`DecodedImages` of them for the ``"fast"`` pipeline,
    None for PIL per sample (``"published"``, or the fallback over the cap).
    """

    def __init__(self, items: list, spec: TrainSpec, decoded: Optional[DecodedImages] = None,
                 sizes=None, note: str = ""):
        self.items, self.spec, self.decoded, self.note = items, spec, decoded, note
        self.sizes = decoded.orig.tolist() if decoded is not None else sizes

    @property
    def pipeline(self) -> str:
        return "fast" if self.decoded is not None else "published"

    def __len__(self):
        return len(self.items)

    def __getitem__(self, ticket):
        i, top, left, h, w, flip = ticket
        spec, label = self.spec, self.items[i].label
        if self.decoded is None:
            img = crop_resize_pil(read_rgb(self.items[i].path), (top, left, h, w), spec.size,
                                  spec.interpolation, flip)
            return pil_to_uint8(img), label
        d = self.decoded
        box = scale_box((top, left, h, w), tuple(self.sizes[i]), tuple(d.stored[i].tolist()))
        return crop_resize_uint8(d.image(i), box, spec.size, spec.interpolation, flip), label


def train_images(items: list, spec: TrainSpec, pipeline: str = "fast",
                 max_short: Optional[int] = -1, cache_bytes: Optional[int] = None,
                 threads: Optional[int] = None) -> TrainImages:
    """The :class:`TrainImages` of ``items``: decoded once (``"fast"``) when that fits
    ``cache_bytes`` (default :func:`default_cache_bytes`), else PIL per sample.

    ``max_short``: the shorter side kept (-1: :func:`keep_short`; None: the file's size).
    """
    max_short = keep_short(spec) if max_short == -1 else max_short
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
    paths = [it.path for it in items]
    plan = DecodedImages.plan(paths, max_short, threads)
    if pipeline == "published":
        return TrainImages(items, spec, sizes=plan[0], note="published pipeline: PIL per sample")
    cap = default_cache_bytes() if cache_bytes is None else cache_bytes
    if plan[2] > cap:
        return TrainImages(items, spec, sizes=plan[0],
                           note=f"training images not decoded once: {plan[2] / 2**30:.2f} GiB "
                                f"over the cap of {cap / 2**30:.2f} GiB; PIL per sample")
    decoded = DecodedImages.decode(paths, max_short, threads, plan)
    return TrainImages(items, spec, decoded,
                       note=f"{len(items)} training images decoded once "
                            f"({decoded.nbytes / 2**20:.0f} MiB uint8)")


def normalize_on_device(images: torch.Tensor, mean, std, device=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(images / 255 - mean) / std`` of a uint8 ``[B, 3, H, W]`` batch, on ``device``.

    Moves with ``non_blocking`` (from pinned memory the copy overlaps) and runs
    ToTensor's and Normalize's float ops there, in that order.
    """
    x = images.to(device or images.device, non_blocking=True).to(dtype).div_(255)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)
