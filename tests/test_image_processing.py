"""InternVLChatImageProcessor: parity with transformers' CLIP image processors (PIL and torchvision flavours) plus
an independently written LLaVA canvas rule, the pad colours, PIL-vs-torchvision closeness, save/load round-trip,
input loading errors and mode conversion.

The module is loaded from its file path (not through the package) to check that it is self-contained, as it must
be when copied flat into a checkpoint as remote code."""

import base64
import importlib.util
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

_PATH = Path(__file__).resolve().parents[1] / "src/internvl_chat/modeling/image_processing_internvl_chat.py"
_spec = importlib.util.spec_from_file_location("image_processing_internvl_chat", _PATH)
ipi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ipi)

Processor = ipi.InternVLChatImageProcessor
CLIP = (ipi.OPENAI_CLIP_MEAN, ipi.OPENAI_CLIP_STD)
IMAGENET = (ipi.IMAGENET_MEAN, ipi.IMAGENET_STD)
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
TOL = 1e-6
# PIL vs torchvision bicubic (aspect-preserving resizes): at most a few uint8 levels at a few pixels.
# 0.06 in normalized units is ~4 levels at CLIP's std (1 level = 1 / 255 / 0.27 = 0.0146).
TV_MAX, TV_MEAN = 0.06, 2e-3


def random_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def smooth_image(width, height):
    """Gradient-like content (closer to photos than noise) for the PIL-vs-torchvision comparison."""
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def reference_canvas(image, background):
    """LLaVA's expand2square, written independently: floor-division offsets."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h), max(w, h)), background)
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def reference(image, mode, size, mean, std, torchvision=False):
    cls = CLIPImageProcessor if torchvision else CLIPImageProcessorPil
    kwargs = dict(crop_size={"height": size, "width": size}, image_mean=list(mean), image_std=list(std))
    if mode == "resize":
        ref = cls(size={"height": size, "width": size}, **kwargs)
    else:
        ref = cls(size={"shortest_edge": size}, **kwargs)
    if mode == "pad":
        image = reference_canvas(image, tuple(int(m * 255) for m in mean))
    return ref(image, return_tensors="pt")["pixel_values"]


SHAPES = [(60, 40), (40, 60), (37, 23), (23, 38), (32, 32)]  # landscape, portrait, odd both ways, square


@pytest.mark.parametrize("mode", ["pad", "square", "resize"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stats,size", [(CLIP, 336), (IMAGENET, 448)])
def test_pil_backend_matches_clip_pil(mode, shape, stats, size):
    image = random_image(*shape)
    proc = Processor(image_aspect_ratio=mode, size=size, image_mean=stats[0], image_std=stats[1])
    out = proc(image)["pixel_values"]
    ref = reference(image, mode, size, *stats)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("mode,shape", [("pad", (90, 50)), ("square", (50, 90))])
def test_pil_backend_matches_clip_pil_768(mode, shape):
    image = random_image(*shape, seed=1)
    out = Processor(image_aspect_ratio=mode, size=768)(image)["pixel_values"]
    assert out.shape == (1, 3, 768, 768)
    assert (out - reference(image, mode, 768, *CLIP)).abs().max().item() <= TOL


def test_crop_smaller_than_size_matches_clip():
    image = random_image(50, 30)
    proc = Processor(image_aspect_ratio="square", size=64, crop_size=56)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    assert proc.image_size == 56
    assert (proc(image)["pixel_values"] - ref(image, return_tensors="pt")["pixel_values"]).abs().max() <= TOL


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("mode", ["pad", "square", "resize"])
@pytest.mark.parametrize("shape", [(60, 40), (37, 23), (32, 32)])
@pytest.mark.parametrize("stats,size", [(CLIP, 336), (IMAGENET, 448)])
def test_torchvision_backend_matches_clip_torchvision(mode, shape, stats, size):
    image = random_image(*shape, seed=2)
    proc = Processor(
        image_aspect_ratio=mode, size=size, image_mean=stats[0], image_std=stats[1], backend="torchvision"
    )
    out = proc(image)["pixel_values"]
    ref = reference(image, mode, size, *stats, torchvision=True)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("mode", ["pad", "square"])
@pytest.mark.parametrize("shape", [(500, 333), (333, 500), (401, 257)])
def test_torchvision_close_to_pil(mode, shape):
    image = smooth_image(*shape)
    proc = Processor(image_aspect_ratio=mode)
    diff = (proc(image)["pixel_values"] - proc(image, backend="torchvision")["pixel_values"]).abs()
    assert diff.max().item() <= TV_MAX
    assert diff.mean().item() <= TV_MEAN


def test_torchvision_missing_falls_back_to_pil(monkeypatch):
    monkeypatch.setattr(ipi, "_torchvision_functional", lambda: None)
    image = random_image(30, 20)
    proc = Processor(backend="torchvision", size=56)
    assert torch.equal(proc(image)["pixel_values"], Processor(size=56)(image)["pixel_values"])


# ------------------------------------------------------------------ canvas


@pytest.mark.parametrize("stats,color", [(CLIP, (122, 116, 104)), (IMAGENET, (123, 116, 103))])
def test_pad_canvas_colour(stats, color):
    proc = Processor(image_mean=stats[0], image_std=stats[1])
    assert proc.background_color == color
    landscape = Image.new("RGB", (5, 2), (1, 2, 3))
    canvas = ipi.expand_to_square(landscape, proc.background_color)
    assert canvas.size == (5, 5)
    arr = np.asarray(canvas)
    # (5 - 2) // 2 = 1 -> rows 0, 3, 4 are background, rows 1-2 the image
    for row in (0, 3, 4):
        assert all(tuple(px) == color for px in arr[row])
    assert all(tuple(px) == (1, 2, 3) for px in arr[1:3].reshape(-1, 3))
    portrait = Image.new("RGB", (2, 5), (9, 9, 9))
    arr = np.asarray(ipi.expand_to_square(portrait, color))
    assert (arr[:, 1:3] == 9).all() and all(tuple(px) == color for px in arr[:, [0, 3, 4]].reshape(-1, 3))
    assert ipi.expand_to_square(portrait, color).tobytes() == reference_canvas(portrait, color).tobytes()
    square = Image.new("RGB", (4, 4))
    assert ipi.expand_to_square(square, color) is square


# ------------------------------------------------------------------ batching, inputs, options


def test_batching_nested_and_return_types():
    a, b, c = random_image(30, 20, 0), random_image(20, 30, 1), random_image(25, 25, 2)
    proc = Processor(size=28)
    single = [proc(x)["pixel_values"][0] for x in (a, b, c)]
    flat = proc([a, b, c])["pixel_values"]
    nested = proc([[a], [b, c]])["pixel_values"]
    assert flat.shape == (3, 3, 28, 28)
    assert torch.equal(flat, nested) and all(torch.equal(flat[i], single[i]) for i in range(3))
    as_np = proc([a, b], return_tensors="np")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32 and as_np.shape == (2, 3, 28, 28)
    as_list = proc([a, b], return_tensors=None)["pixel_values"]
    assert isinstance(as_list, list) and np.array_equal(as_list[1], as_np[1])
    assert proc.image_size == 28 and proc.model_input_names == ["pixel_values"]
    with pytest.raises(ValueError, match="no images"):
        proc([])


def test_all_input_types_give_same_tensor(tmp_path):
    image = random_image(30, 20)
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    arr = np.asarray(image)
    sources = [
        str(path),
        path,
        data,
        bytearray(data),
        f"data:image/png;base64,{b64}",
        b64,
        arr,
        torch.from_numpy(arr.copy()).permute(2, 0, 1),
        torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255,
        arr.astype(np.float32) / 255,
    ]
    proc = Processor(size=28)
    expected = proc(image)["pixel_values"]
    for source in sources:
        assert torch.equal(proc(source)["pixel_values"], expected), type(source)


def test_overrides_per_call():
    image = random_image(40, 24)
    proc = Processor(size=28)
    assert torch.equal(
        proc(image, image_aspect_ratio="square")["pixel_values"],
        Processor(size=28, image_aspect_ratio="square")(image)["pixel_values"],
    )
    assert proc(image, size=42)["pixel_values"].shape[-1] == 42  # crop follows an overridden size
    assert proc(image, size=42, crop_size=30)["pixel_values"].shape[-1] == 30
    assert proc.size == {"shortest_edge": 28}  # the instance is unchanged


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_aspect_ratio": "anyres"},
        {"backend": "tokenizers"},
        {"size": 0},
        {"size": {"height": 3, "width": 4}},
        {"image_mean": [0.5, 0.5]},
        {"max_image_pixels": 0},
    ],
)
def test_invalid_options(kwargs):
    with pytest.raises(ValueError):
        Processor(**kwargs)


def test_save_load_round_trip(tmp_path):
    proc = Processor(
        image_aspect_ratio="resize",
        size=448,
        crop_size=448,
        image_mean=ipi.IMAGENET_MEAN,
        image_std=ipi.IMAGENET_STD,
        backend="torchvision",
        max_image_pixels=None,
        do_convert_rgb=True,
    )
    proc.save_pretrained(tmp_path)
    saved = (tmp_path / "preprocessor_config.json").read_text()
    assert '"image_aspect_ratio": "resize"' in saved and '"max_image_pixels": null' in saved
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.to_dict() == proc.to_dict()
    assert loaded.image_aspect_ratio == "resize" and loaded.size == {"shortest_edge": 448}
    assert loaded.crop_size == {"height": 448, "width": 448} and loaded.max_image_pixels is None
    assert loaded.backend == "torchvision" and loaded.image_mean == list(ipi.IMAGENET_MEAN)
    image = random_image(30, 20)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])
    # defaults round-trip too, and from_pretrained kwargs override saved values
    Processor().save_pretrained(tmp_path / "d")
    default = Processor.from_pretrained(tmp_path / "d", image_aspect_ratio="square")
    assert default.image_aspect_ratio == "square" and default.max_image_pixels == ipi.DEFAULT_MAX_IMAGE_PIXELS
    assert default.size == {"shortest_edge": 336} and default.image_mean == list(ipi.OPENAI_CLIP_MEAN)


def test_fetch_images_keeps_nesting(tmp_path):
    path = tmp_path / "a.png"
    random_image(8, 6).save(path)
    proc = Processor()
    out = proc.fetch_images([[str(path)], [str(path), random_image(4, 4)]])
    assert [len(x) for x in out] == [1, 2] and all(isinstance(i, Image.Image) for row in out for i in row)


# ------------------------------------------------------------------ errors


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header_size(width, height):
    """A small PNG whose IHDR (with a valid CRC) claims `width` x `height`: decoding it would fail."""
    data = bytearray(_png_bytes(random_image(4, 4)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_error_corrupt_file_names_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"definitely not an image")
    with pytest.raises(ipi.ImageLoadError, match="broken.jpg"):
        Processor()(str(path))
    with pytest.raises(ValueError, match=r"image #1 .*broken\.jpg"):
        Processor()([random_image(4, 4), str(path)])


def test_error_truncated_file(tmp_path):
    path = tmp_path / "trunc.png"
    path.write_bytes(_png_bytes(random_image(64, 64))[:300])
    with pytest.raises(ipi.ImageLoadError, match="trunc.png"):
        ipi.load_image(str(path))


def test_error_corrupt_bytes_and_base64_name_index():
    with pytest.raises(ipi.ImageLoadError, match="image #2"):
        Processor()([random_image(4, 4), random_image(4, 4), b"\x89PNG garbage"])
    with pytest.raises(ipi.ImageLoadError, match="image #0"):
        Processor()(b"")
    with pytest.raises(ipi.ImageLoadError, match="image #0"):
        Processor()("data:image/png;base64,@@@not-base64@@@")


def test_error_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        Processor()(str(missing))
    with pytest.raises(TypeError):
        Processor()(12345)


@pytest.mark.parametrize(
    "source", [Image.new("RGB", (0, 5)), np.zeros((0, 4, 3), np.uint8), torch.zeros(3, 4, 0, dtype=torch.uint8)]
)
def test_error_zero_size(source):
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*zero size"):
        Processor()(source)


def test_error_too_large_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(9000, 9000))  # 81 MP claimed; the pixel data is 4x4
    # header check refuses it: decoding would have raised "corrupt" instead
    with pytest.raises(ipi.ImageTooLargeError, match=r"bomb\.png.*9000x9000"):
        Processor(max_image_pixels=1_000_000)(str(path))
    # without our limit it gets decoded and fails as corrupt
    with pytest.raises(ipi.ImageLoadError, match="bomb.png") as info:
        Processor(max_image_pixels=None)(str(path))
    assert not isinstance(info.value, ipi.ImageTooLargeError)
    # PIL's own decompression-bomb error (> 2 x Image.MAX_IMAGE_PIXELS) is reported as too large as well
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_with_header_size(30000, 30000))
    with pytest.raises(ipi.ImageTooLargeError, match="huge.png"):
        Processor(max_image_pixels=None)(str(huge))
    with pytest.raises(ipi.ImageTooLargeError, match="image #0"):
        Processor(max_image_pixels=100)(random_image(20, 20))
    with pytest.raises(ipi.ImageTooLargeError, match="image #1"):
        Processor(max_image_pixels=100)([random_image(5, 5), np.zeros((20, 20, 3), np.uint8)])


def test_error_unsupported_mode_shape_dtype():
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*mode 'L'"):
        Processor(do_convert_rgb=False)(Image.new("L", (4, 4)))
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*shape"):
        Processor()(np.zeros((6, 6, 5), np.uint8))
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*dtype"):
        Processor()(np.zeros((4, 4, 3), np.complex64))
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*float"):
        Processor()(np.full((4, 4, 3), -1.0, np.float32))


# ------------------------------------------------------------------ mode conversion


def rgb_of(source):
    return tuple(int(v) for v in np.asarray(ipi.load_image(source))[0, 0])


def test_mode_conversion_alpha_composited_on_white():
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 0))) == (255, 255, 255)
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 255))) == (10, 20, 30)
    half = rgb_of(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert all(abs(v - 127) <= 1 for v in half)
    assert rgb_of(Image.new("LA", (1, 1), (0, 0))) == (255, 255, 255)
    assert rgb_of(Image.new("LA", (1, 1), (40, 255))) == (40, 40, 40)
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert tuple(np.asarray(ipi.load_image(pal))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(ipi.load_image(pal))[0, 1]) == (200, 100, 50)
    # through a PNG file as well (tRNS chunk)
    assert tuple(np.asarray(ipi.load_image(_png_bytes(pal)))[0, 0]) == (255, 255, 255)
    assert rgb_of(pal.convert("PA")) == (255, 255, 255)
    # RGBA arrays / tensors too
    assert rgb_of(np.array([[[10, 20, 30, 0]]], np.uint8)) == (255, 255, 255)
    assert rgb_of(torch.tensor([10, 20, 30, 0], dtype=torch.uint8).view(4, 1, 1)) == (255, 255, 255)


def test_mode_conversion_plain_modes():
    assert rgb_of(Image.new("L", (1, 1), 77)) == (77, 77, 77)
    assert rgb_of(Image.new("1", (1, 1), 1)) == (255, 255, 255)
    pal = Image.new("P", (1, 1), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    assert rgb_of(pal) == (200, 100, 50)
    assert rgb_of(Image.new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    assert rgb_of(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == (255, 0, 0)
    ycc = Image.new("RGB", (1, 1), (10, 200, 90)).convert("YCbCr")
    assert all(abs(a - b) <= 2 for a, b in zip(rgb_of(ycc), (10, 200, 90)))
    assert rgb_of(np.full((1, 1), 77, np.uint8)) == (77, 77, 77)


def test_mode_conversion_high_bit_depth_scaled_not_clipped():
    values = np.array([[0, 32768, 65535, 300]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    assert np.asarray(img16.convert("L"))[0, 3] == 255  # what PIL alone does: clipping
    out = np.asarray(ipi.load_image(img16))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 1]
    assert np.asarray(ipi.load_image(_png_bytes(img16)))[0, :, 0].tolist() == [0, 128, 255, 1]  # 16-bit PNG
    assert np.asarray(ipi.load_image(values))[0, :, 0].tolist() == [0, 128, 255, 1]  # uint16 array
    as_i = Image.fromarray(values.astype(np.int32))
    assert np.asarray(ipi.load_image(as_i))[0, :, 0].tolist() == [0, 128, 255, 1]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(ipi.load_image(as_f))[0, :, 0].tolist() == [0, 128, 255]
    wide_f = Image.fromarray(np.array([[-1.0, 0.0, 1000.0]], np.float32))
    assert np.asarray(ipi.load_image(wide_f))[0, :, 0].tolist() == [0, 0, 255]  # min-max stretched
    assert np.asarray(ipi.load_image(np.array([[False, True]])))[0, :, 0].tolist() == [0, 255]
