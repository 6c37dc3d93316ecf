"""Llama 3.2 Vision's image preprocessing, without transformers: images -> the arrays the model takes.

The same steps and numbers as transformers' `MllamaImageProcessor` (its PIL path, `MllamaImageProcessorPil`)
and Meta's `VariableSizeImageTransform`: pick the tile arrangement (rows x cols <= max tiles) whose canvas
needs the least upscaling (or, when every canvas is smaller, the least downscaling), resize keeping the aspect
ratio with PIL's bilinear filter, pad right/bottom with black, rescale to [0, 1], normalize with the CLIP
mean/std, cut into tiles.

Legend: B prompts, I images (the most any prompt has), X max tiles, C channels (3), H = W tile size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llama_jax.errors import ImageError

# Meta's and the released preprocessor_config.json's values (OpenAI CLIP's statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"  # the Hugging Face repo's file; a converted checkpoint keeps it


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """What preprocessing needs: the tile side, the most tiles per image, and the pixel transform."""

    tile_size: int = 560
    max_image_tiles: int = 4
    resample: int = 2  # PIL.Image.BILINEAR
    rescale_factor: float = 1 / 255
    image_mean: Tuple[float, ...] = CLIP_MEAN
    image_std: Tuple[float, ...] = CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def for_model(cls, config, checkpoint: Optional[str] = None, max_image_tiles: Optional[int] = None
                  ) -> "ImageSettings":
        """From `checkpoint`/preprocessor_config.json when there is one, else from `config.vision` (a
        LlamaConfig; a VisionConfig works too). Asking for more tiles than the model has tile embeddings for
        (`max_image_tiles`, or the file's) is refused."""
        vision = getattr(config, "vision", config)
        if vision is None:
            raise ImageError("images were given, but the checkpoint is a text-only model (its config has no "
                             "vision section); use a Llama 3.2 Vision checkpoint")
        settings = cls(tile_size=vision.image_size, max_image_tiles=vision.max_num_tiles)
        path = os.path.join(checkpoint, PREPROCESSOR_FILE) if checkpoint else None
        if path and os.path.isfile(path):
            settings = settings.updated_from_file(path)
            if settings.tile_size != vision.image_size:
                raise ImageError(f"{path}: size={settings.tile_size}, but the model's vision image_size is "
                                 f"{vision.image_size}; expected them equal")
        if max_image_tiles is not None:
            settings = dataclasses.replace(settings, max_image_tiles=_positive(max_image_tiles, "max_image_tiles"))
        if settings.max_image_tiles > vision.max_num_tiles:
            raise ImageError(f"max_image_tiles={settings.max_image_tiles}: the model has tile embeddings for at "
                             f"most max_num_tiles={vision.max_num_tiles} tiles per image; expected 1.."
                             f"{vision.max_num_tiles}")
        return settings

    def updated_from_file(self, path: str) -> "ImageSettings":
        """These settings with a Hugging Face preprocessor_config.json's values over them."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise ImageError(f"{path}: expected a JSON object, got {type(d).__name__}")
        for key in ("do_resize", "do_pad"):
            if d.get(key, True) is not True:  # MllamaImageProcessor refuses these too
                raise ImageError(f"{path}: {key}={d[key]!r}; Llama 3.2 Vision needs {key}=true")
        kw: Dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, dict) or size.get("height") != size.get("width") or not size.get("height"):
                raise ImageError(f"{path}: size={size!r}; expected {{'height': N, 'width': N}} (square tiles)")
            kw["tile_size"] = _positive(size["height"], f"{path}: size.height")
        if "max_image_tiles" in d:
            kw["max_image_tiles"] = _positive(d["max_image_tiles"], f"{path}: max_image_tiles")
        if "resample" in d:
            kw["resample"] = _resample(d["resample"], path)
        if d.get("do_rescale", True) is False:
            kw["rescale_factor"] = 1.0
        elif "rescale_factor" in d:
            kw["rescale_factor"] = _number(d["rescale_factor"], f"{path}: rescale_factor")
        if d.get("do_normalize", True) is False:
            kw["image_mean"], kw["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            for key in ("image_mean", "image_std"):
                if key in d:
                    kw[key] = _triple(d[key], f"{path}: {key}")
        if "do_convert_rgb" in d:
            kw["do_convert_rgb"] = bool(d["do_convert_rgb"])
        return dataclasses.replace(self, **kw)


def preprocess(images: Sequence[Sequence[Any]], config, *, checkpoint: Optional[str] = None,
               max_image_tiles: Optional[int] = None, settings: Optional[ImageSettings] = None
               ) -> Dict[str, Any]:
    """images: per prompt, a list of PIL images or file paths (a prompt may have none) -> a dict of numpy
    arrays as `MllamaImageProcessor` returns them:

        pixel_values       float32 [B, I, X, C, H, W]   (missing images and tiles are zeros)
        aspect_ratio_ids   int64   [B, I]               (1-based index of the tile arrangement; 0 = no image)
        aspect_ratio_mask  int64   [B, I, X]            (1 for a real tile; tile 0 is always 1)
        num_tiles          list of lists of int         (tiles per image)

    `config`: the model's LlamaConfig (its vision section gives the tile size and the most tiles);
    `checkpoint`: a directory whose preprocessor_config.json, when present, gives the settings instead;
    `settings` overrides both."""
    settings = settings or ImageSettings.for_model(config, checkpoint, max_image_tiles)
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        raise ImageError(f"images={images!r:.80}: expected a list per prompt of lists of images, e.g. [[img]]")
    rows: List[List[np.ndarray]] = []
    ratios: List[List[Tuple[int, int]]] = []
    for b, row in enumerate(images):
        if isinstance(row, (str, bytes, os.PathLike)) or not isinstance(row, Sequence):
            raise ImageError(f"images[{b}]={row!r:.80}: expected a list of images (PIL images or file paths)")
        tiles, arrangement = [], []
        for i, image in enumerate(row):
            t, ratio = image_tiles(load_image(image, f"images[{b}][{i}]", settings.do_convert_rgb), settings)
            tiles.append(t)
            arrangement.append(ratio)
        rows.append(tiles)
        ratios.append(arrangement)
    return pack(rows, ratios, settings)


def load_image(image: Any, where: str = "image", convert_rgb: bool = True):
    """A PIL image or a path -> an RGB PIL image (transparency composited onto white, as transformers does)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as f:
                f.load()
                image = f.copy()
        except FileNotFoundError:
            raise ImageError(f"{where}: {path}: no such file") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{where}: {path}: not a readable image ({type(e).__name__}: {e})") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{where}: {path}: refused as a decompression bomb ({e})") from None
    if not isinstance(image, Image.Image):
        raise ImageError(f"{where}: {type(image).__name__} {image!r:.60}; expected a PIL image or a file path")
    if min(image.size) < 1:
        raise ImageError(f"{where}: the image is {image.size[0]}x{image.size[1]} pixels; expected at least 1x1")
    if not convert_rgb:
        if image.mode != "RGB":
            raise ImageError(f"{where}: mode {image.mode!r} with do_convert_rgb=false; expected an RGB image")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_tiles(image, settings: ImageSettings) -> Tuple[np.ndarray, Tuple[int, int]]:
    """An RGB PIL image -> (its tiles float32 [n, C, H, W], (rows, cols) of the arrangement)."""
    tile = settings.tile_size
    canvas_h, canvas_w = optimal_canvas(image.height, image.width, settings.max_image_tiles, tile)
    new_h, new_w = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, tile)
    resized = np.asarray(image.resize((new_w, new_h), resample=settings.resample))  # [h, w, C] uint8
    padded = np.zeros((canvas_h, canvas_w, 3), np.uint8)  # pad first, in uint8, as the oracle does
    padded[:new_h, :new_w] = resized
    # the oracle's arithmetic exactly: rescale in float64, then float32, then normalize in float32
    pixels = (padded.transpose(2, 0, 1).astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, np.float32)[:, None, None]
    std = np.asarray(settings.image_std, np.float32)[:, None, None]
    pixels = (pixels - mean) / std  # [C, rows*H, cols*W]
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = pixels.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    return np.ascontiguousarray(tiles), (rows, cols)


def pack(rows: List[List[np.ndarray]], ratios: List[List[Tuple[int, int]]], settings: ImageSettings
         ) -> Dict[str, Any]:
    """Per-prompt lists of tiles [n, C, H, W] and arrangements -> the padded batch arrays (see `preprocess`)."""
    batch, max_images, max_tiles = len(rows), max((len(r) for r in rows), default=0), settings.max_image_tiles
    tile = settings.tile_size
    pixel_values = np.zeros((batch, max_images, max_tiles, 3, tile, tile), np.float32)
    ids = np.zeros((batch, max_images), np.int64)
    mask = np.zeros((batch, max_images, max_tiles), np.int64)
    mask[:, :, 0] = 1  # as transformers: a missing image still "has" its first tile (Meta pads with 1x1)
    supported = supported_aspect_ratios(max_tiles)
    for b, (tiles, arrangement) in enumerate(zip(rows, ratios)):
        for i, (t, ratio) in enumerate(zip(tiles, arrangement)):
            pixel_values[b, i, :len(t)] = t
            ids[b, i] = supported.index(ratio) + 1
            mask[b, i, :ratio[0] * ratio[1]] = 1
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask,
            "num_tiles": [[len(t) for t in tiles] for tiles in rows]}


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> List[Tuple[int, int]]:
    """Every (a, b) with a * b <= max_image_tiles, in transformers' order (its ids are index + 1)."""
    return [(a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1)
            if a * b <= max_image_tiles]


@lru_cache(maxsize=256)
def optimal_canvas(height: int, width: int, max_image_tiles: int, tile: int) -> Tuple[int, int]:
    """The canvas (height, width), whole tiles, that the image is resized into: the smallest scale >= 1 if
    any canvas needs upscaling, else the largest (< 1); ties go to the smallest area."""
    canvases = np.array(supported_aspect_ratios(max_image_tiles)) * tile  # [n, 2]: (height, width)
    scale_h, scale_w = canvases[:, 0] / height, canvases[:, 1] / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = canvases[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> Tuple[int, int]:
    """The resized (height, width): within the canvas, at least one tile per side where the canvas allows,
    the aspect ratio kept (the smaller side rounded down, never below 1 pixel)."""
    target_w = int(np.clip(width, tile, canvas_w))
    target_h = int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _positive(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ImageError(f"{where}={value!r}: expected a positive integer")
    return value


def _number(value, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ImageError(f"{where}={value!r}: expected a positive number")
    return float(value)


def _triple(value, where: str) -> Tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ImageError(f"{where}={value!r}: expected 3 numbers (one per RGB channel)")
    return tuple(_number(v, where) if "std" in where else _finite(v, where) for v in value)


def _finite(value, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ImageError(f"{where}={value!r}: expected a number")
    return float(value)


def _resample(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1, 2, 3, 4, 5):
        raise ImageError(f"{where}: resample={value!r}; expected a PIL filter number 0..5 (2 = bilinear)")
    return value
