"""Pascal VOC layout: reader, records and a torch Dataset.

One reader serves both real VOC 2007/2012 (from a local VOCdevkit) and the synthetic data set that
`data.synth` writes in the same layout.

Box convention
--------------
The XML holds VOC's 1-based, inclusive pixel coordinates: a box with xmin=1, xmax=10 covers the first
ten pixel columns. `VOCObject.box` keeps those numbers unchanged. `VOCDetection` converts them to
0-based *continuous* coordinates, ``(xmin - 1, ymin - 1, xmax, ymax)``, which cover exactly the same
pixels; the width is ``xmax - xmin + 1`` (VOC's "+1" width) and is never zero, so torchvision's
degenerate-box check never fires. An evaluator working on these continuous boxes must NOT add 1
again.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(VOC_CLASSES)}

# Tried in this order when the XML's <filename> does not name an existing file.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# What a data-folder error tells the user to provide.
_LAYOUT = ("expected a VOCdevkit holding VOC2007/ and/or VOC2012/, or one such folder, each with "
           "JPEGImages/, Annotations/ and ImageSets/Main/trainval.txt")


class DataError(ValueError):
    """Bad data or configuration; the message names the offending file, class or shard."""


@dataclass(frozen=True)
class VOCObject:
    """One annotated object. `box` is (xmin, ymin, xmax, ymax) exactly as in the XML (1-based)."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VOCRecord:
    """One image and its objects; `image_id` is unique within one `read_voc` call."""

    image_id: str
    image_path: Path
    width: int
    height: int
    objects: tuple[VOCObject, ...]

    @property
    def class_names(self) -> frozenset[str]:
        """Set of class names in this image (difficult objects included)."""
        return frozenset(obj.name for obj in self.objects)


def check_class_names(names: Iterable[str], where: str) -> None:
    """Raise DataError naming the first class not in VOC_CLASSES and `where` it came from."""
    for name in names:
        if name not in CLASS_INDEX:
            raise DataError(
                f"unknown class {name!r} in {where}; expected one of the 20 VOC classes "
                f"({', '.join(VOC_CLASSES)})"
            )


# ----------------------------------------------------------------------------------------------
# Reader


def _is_voc_set(folder: Path) -> bool:
    return (folder / "Annotations").is_dir()


def read_voc(
    root: str | Path, image_set: str = "trainval", year_dirs: Sequence[str] | None = None
) -> list[VOCRecord]:
    """Read a VOC-layout folder into records (no image is decoded here).

    `root` is either one data set folder (holding `Annotations/`, `JPEGImages/`, `ImageSets/Main/`)
    or a `VOCdevkit` folder holding several (`VOC2007`, `VOC2012`, ...). In the second case every
    image id is prefixed with the folder's year (``2007_000005``) so ids stay unique, and
    `year_dirs` may pick which folders to read (default: all `VOC*` folders present).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}; {_LAYOUT}")

    if _is_voc_set(root):
        if year_dirs:
            raise DataError(f"{root} is a single VOC set; year_dirs={list(year_dirs)} needs a VOCdevkit")
        return _read_one_set(root, image_set, prefix="")

    if year_dirs is None:
        sets = sorted(p for p in root.iterdir() if p.name.startswith("VOC") and _is_voc_set(p))
        if not sets:
            raise DataError(f"no VOC2007/VOC2012 (JPEGImages + Annotations) found under {root}; {_LAYOUT}")
    else:
        sets = [root / name for name in year_dirs]
        for folder in sets:
            if not _is_voc_set(folder):
                raise DataError(f"VOC set folder not found or has no Annotations/: {folder}; {_LAYOUT}")

    records: list[VOCRecord] = []
    for folder in sets:
        year = folder.name[3:] if folder.name.startswith("VOC") else folder.name
        records.extend(_read_one_set(folder, image_set, prefix=f"{year}_"))
    return records


def _read_one_set(folder: Path, image_set: str, prefix: str) -> list[VOCRecord]:
    list_file = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise DataError(f"image set file not found: {list_file}; create it with the image ids to read, "
                        f"one a line (VOC's devkit ships it)")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    return [_read_record(folder, image_id, prefix) for image_id in ids]


def _read_record(folder: Path, image_id: str, prefix: str) -> VOCRecord:
    xml_path = folder / "Annotations" / f"{image_id}.xml"
    if not xml_path.is_file():
        raise DataError(f"annotation file not found: {xml_path}; restore it or remove {image_id!r} from "
                        f"{folder / 'ImageSets' / 'Main'}")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise DataError(f"malformed XML in {xml_path}: {err}; fix or restore that file (or remove "
                        f"{image_id!r} from {folder / 'ImageSets' / 'Main'})") from None

    image_path = _find_image(folder, image_id, root.findtext("filename"), xml_path)
    width, height = _image_size(root, image_path, xml_path)

    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        check_class_names([name], str(xml_path))
        bndbox = obj.find("bndbox")
        try:
            box = tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"object {name!r} in {xml_path} has a missing or non-numeric bndbox; "
                            f"give it numeric <xmin>, <ymin>, <xmax>, <ymax>") from None
        if box[2] < box[0] or box[3] < box[1]:
            raise DataError(f"object {name!r} in {xml_path} has an inverted box {box}; "
                            f"xmax/ymax must not be below xmin/ymin")
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        objects.append(VOCObject(name=name, box=box, difficult=difficult))

    return VOCRecord(
        image_id=prefix + image_id,
        image_path=image_path,
        width=width,
        height=height,
        objects=tuple(objects),
    )


def _find_image(folder: Path, image_id: str, filename: str | None, xml_path: Path) -> Path:
    images = folder / "JPEGImages"
    candidates = [images / filename.strip()] if filename and filename.strip() else []
    candidates += [images / f"{image_id}{suffix}" for suffix in _IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"image for {xml_path} not found (looked for {candidates[0]}); put it in {images} "
                    f"or fix <filename> in the XML")


def _image_size(root: ET.Element, image_path: Path, xml_path: Path) -> tuple[int, int]:
    try:
        width = int(float(root.findtext("size/width") or 0))
        height = int(float(root.findtext("size/height") or 0))
    except ValueError:
        raise DataError(f"non-numeric <size> in {xml_path}; fix <width>/<height> or remove <size>") from None
    if width > 0 and height > 0:
        return width, height
    # Some annotation files lack <size>: read it from the image header (cheap, no decode).
    try:
        with Image.open(image_path) as img:
            return img.size
    except (OSError, UnidentifiedImageError):
        raise DataError(f"image will not open: {image_path}; replace it with a readable image") from None


# ----------------------------------------------------------------------------------------------
# Dataset


class VOCDetection(Dataset):
    """Detection dataset over VOC records.

    Item i -> ``(image, target)``:
      image:  FloatTensor[3, H, W] in [0, 1] (H = W = image_size when given, else the file's size)
      target: ``boxes`` FloatTensor[N, 4] xyxy 0-based continuous pixels (see module docstring),
              ``labels`` int64[N] index into VOC_CLASSES, ``difficult`` bool[N], ``image_id`` str.

    `classes` (names) keeps only objects of those classes; images are never dropped, so an image may
    end up with N = 0. `image_size` resizes every image to a square of that side (boxes scaled).
    Decoded images are cached as uint8 until `cache_bytes` is used up (small synthetic sets fit).
    """

    def __init__(
        self,
        records: Sequence[VOCRecord],
        classes: Sequence[str] | None = None,
        image_size: int | None = None,
        *,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.records = list(records)
        if classes is not None:
            check_class_names(classes, "VOCDetection(classes=...)")
        self.classes = tuple(VOC_CLASSES if classes is None else classes)
        self._keep = frozenset(self.classes)
        self.image_size = image_size
        self.cache_bytes = cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def _load_uint8(self, i: int) -> torch.Tensor:
        """uint8[3, H, W] after the optional resize, from cache when present."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        path = self.records[i].image_path
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.image_size is not None and img.size != (self.image_size, self.image_size):
                    img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DataError(f"image will not decode: {path} ({err}); replace it with a readable image") from None
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        if self._cached_bytes + tensor.numel() <= self.cache_bytes:
            self._cache[i] = tensor
            self._cached_bytes += tensor.numel()
        return tensor

    def target(self, i: int) -> dict:
        """The target dict of item i without decoding the image."""
        rec = self.records[i]
        kept = [obj for obj in rec.objects if obj.name in self._keep]
        boxes = torch.tensor([obj.box for obj in kept], dtype=torch.float32).reshape(-1, 4)
        # 1-based inclusive -> 0-based continuous: only the mins move.
        boxes[:, 0:2] -= 1.0
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, rec.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, rec.height)
        if self.image_size is not None:
            scale = torch.tensor(
                [self.image_size / rec.width, self.image_size / rec.height] * 2, dtype=torch.float32
            )
            boxes = boxes * scale
        return {
            "boxes": boxes,
            "labels": torch.tensor([CLASS_INDEX[obj.name] for obj in kept], dtype=torch.int64),
            "difficult": torch.tensor([obj.difficult for obj in kept], dtype=torch.bool),
            "image_id": rec.image_id,
        }

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image = self._load_uint8(i).float().div_(255.0)
        return image, self.target(i)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images and targets as lists (detectors take variable box counts per image)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
