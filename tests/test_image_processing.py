"""InternVLChatImageProcessor: parity with transformers' CLIP image processors (PIL and torchvision flavours) plus
an independently written LLaVA canvas rule, the pad colours, PIL-vs-torchvision closeness, save/load round-trip,
input loading errors and mode conversion.

The module is loaded from its file path (not through the package) to check that it is self-contained, as it must
be when copied flat into a checkpoint as remote code."""

import importlib.util
import io
import struct
import sys
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


# ------------------------------------------------------------------ pad without the canvas


PAD_SHAPES = [(60, 40), (40, 60), (1000, 3), (3, 1000), (336, 100), (100, 336), (337, 20), (20, 337), (335, 334)]


@pytest.mark.parametrize("shape", PAD_SHAPES + [(2000, 50), (50, 2000)])
@pytest.mark.parametrize("resample", range(6))  # nearest, lanczos, bilinear, bicubic, box, hamming
def test_pad_resize_equals_canvas_resize(shape, resample, monkeypatch):
    """The PIL backend's two-pass pad (no max(w, h)² canvas) gives the canvas's bytes exactly, strips included."""
    monkeypatch.setattr(ipi, "_STRIP_PIXELS", 3000)  # several strips for the portrait shapes
    image = random_image(*shape, seed=sum(shape))
    for size, color in [(28, (122, 116, 104)), (336, (123, 116, 103))]:
        expected = ipi.expand_to_square(image, color).resize((size, size), resample=resample)
        assert ipi._pad_resize_pil(image, size, resample, color).tobytes() == expected.tobytes()


def test_pad_resize_equals_canvas_resize_random_shapes(monkeypatch):
    monkeypatch.setattr(ipi, "_STRIP_PIXELS", 5000)  # below this the canvas itself is built
    rng = np.random.default_rng(7)
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(1, 700, 2))
        image = random_image(w, h, seed=w * h)
        expected = ipi.expand_to_square(image, (122, 116, 104)).resize((336, 336), resample=3)
        assert ipi._pad_resize_pil(image, 336, 3, (122, 116, 104)).tobytes() == expected.tobytes(), (w, h)


def _rss_peak_delta(fn):
    """Peak resident memory (bytes) while fn runs, above the resident memory before it (Linux: VmHWM reset)."""

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    before = status("VmRSS")
    result = fn()
    return status("VmHWM") - before, result


def test_extreme_aspect_ratio_pad_bounded_memory():
    """A 32768x512 image padded to 336 (its 32768² canvas would take 3.2 GB): processed by the PIL backend with a
    small peak; refused before any allocation by the torchvision backend (which builds the canvas)."""
    width, height = 32768, 512
    image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (height, width // 256))).convert("RGB")
    proc = Processor(size=336)
    delta, out = _rss_peak_delta(lambda: proc(image)["pixel_values"])
    assert out.shape == (1, 3, 336, 336)
    assert delta < 400 * 2**20, f"peak grew by {delta / 2**20:.0f} MB"
    # rows far from the image are the pad colour; the middle rows hold the image
    colour = torch.tensor([(c / 255 - m) / s for c, m, s in zip(proc.background_color, *CLIP)]).view(3, 1)
    assert torch.allclose(out[0, :, 0, :], colour.expand(3, 336), atol=1e-6)
    assert not torch.allclose(out[0, :, 168, :], colour.expand(3, 336), atol=1e-2)
    # the check counts the buffer: a lower limit refuses it, and "square" / "resize" are counted as well
    proc.check_image_size(width, height, max_image_pixels=4096 * 4096)  # a server's decode limit: fine
    with pytest.raises(ipi.ImageTooLargeError, match=r"65536x256 in 'pad' mode"):  # 336 x 65536 > 4096²
        proc.check_image_size(65536, 256, max_image_pixels=4096 * 4096)
    assert ipi.preprocess_pixels(width, height, "pad", 336, "pil") == 336 * width
    assert ipi.preprocess_pixels(width, height, "pad", 336, "torchvision") == width * width
    assert ipi.preprocess_pixels(65536, 16, "square", 336, "pil") == 336 * 65536 // 16 * 336
    with pytest.raises(ipi.ImageTooLargeError, match="'square' mode"):
        proc(np.zeros((16, 65536, 3), np.uint8), image_aspect_ratio="square")
    if HAS_TORCHVISION:

        def refuse():
            with pytest.raises(ipi.ImageTooLargeError, match=r"32768x512 in 'pad' mode \(torchvision"):
                proc(image, backend="torchvision")

        delta, _ = _rss_peak_delta(refuse)
        assert delta < 100 * 2**20


def test_small_pixel_limit_does_not_refuse_ordinary_images():
    """The preprocessing budget never drops below PREPROCESS_FLOOR_PIXELS: a 300x200 image under a 256² decode
    limit is padded (its 336x300 intermediate is larger than the image)."""
    proc = Processor(max_image_pixels=256 * 256)
    image = random_image(300, 200)
    assert torch.equal(proc(image)["pixel_values"], Processor()(image)["pixel_values"])
    proc.check_image_size(300, 200)
    with pytest.raises(ipi.ImageTooLargeError, match="300x300"):
        proc.check_image_size(300, 300)


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
    with pytest.raises(ValueError, match="return_tensors"):
        proc([a], return_tensors="tf")


def test_all_input_types_give_same_tensor(tmp_path):
    image = random_image(30, 20)
    path = tmp_path / "x.png"
    image.save(path)
    arr = np.asarray(image)
    sources = [
        str(path),  # through transformers' load_image (fetch_images)
        path,
        Image.open(path),  # lazily opened
        arr,
        torch.from_numpy(arr.copy()).permute(2, 0, 1),
        torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255,
        arr.astype(np.float32) / 255,
    ]
    proc = Processor(size=28)
    expected = proc(image)["pixel_values"]
    for source in sources:
        assert torch.equal(proc(source)["pixel_values"], expected), type(source)


def test_no_loading_code_in_the_hub_unit():
    """Bytes, data URLs and base64 are the package loader's job (internvl_chat.data.images), not the Hub unit's."""
    import ast

    tree = ast.parse(_PATH.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not modules & {"base64", "binascii", "io", "urllib", "urllib.request", "urllib.parse", "httpx"}, modules
    with pytest.raises(TypeError, match="bytes"):
        Processor()(_png_bytes(random_image(4, 4)))


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
        {"alpha_background": [255, 255]},
        {"alpha_background": [0, 0, 256]},
        {"alpha_background": "white"},
        {"alpha_background": [True, 0, 0]},
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
        alpha_background=(255, 255, 255),
    )
    proc.save_pretrained(tmp_path)
    saved = (tmp_path / "preprocessor_config.json").read_text()
    assert '"image_aspect_ratio": "resize"' in saved and '"max_image_pixels": null' in saved
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.to_dict() == proc.to_dict()
    assert loaded.image_aspect_ratio == "resize" and loaded.size == {"shortest_edge": 448}
    assert loaded.crop_size == {"height": 448, "width": 448} and loaded.max_image_pixels is None
    assert loaded.backend == "torchvision" and loaded.image_mean == list(ipi.IMAGENET_MEAN)
    assert loaded.alpha_background == [255, 255, 255]
    image = random_image(30, 20)
    assert torch.equal(loaded(image)["pixel_values"], proc(image)["pixel_values"])
    # defaults round-trip too (alpha_background written as null), and from_pretrained kwargs override saved values
    Processor().save_pretrained(tmp_path / "d")
    assert '"alpha_background": null' in (tmp_path / "d" / "preprocessor_config.json").read_text()
    default = Processor.from_pretrained(tmp_path / "d", image_aspect_ratio="square")
    assert default.image_aspect_ratio == "square" and default.max_image_pixels == ipi.DEFAULT_MAX_IMAGE_PIXELS
    assert default.size == {"shortest_edge": 336} and default.image_mean == list(ipi.OPENAI_CLIP_MEAN)
    assert default.alpha_background is None


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
    with pytest.raises(ipi.ImageLoadError, match="nope.png"):
        Processor()(str(tmp_path / "nope.png"))
    with pytest.raises(TypeError):
        Processor()(12345)


def test_error_truncated_lazy_image(tmp_path):
    path = tmp_path / "trunc.png"
    path.write_bytes(_png_bytes(random_image(64, 64))[:300])
    with pytest.raises(ipi.ImageLoadError, match="image #0.*corrupt"):
        Processor()(Image.open(path))


@pytest.mark.parametrize(
    "source", [Image.new("RGB", (0, 5)), np.zeros((0, 4, 3), np.uint8), torch.zeros(3, 4, 0, dtype=torch.uint8)]
)
def test_error_zero_size(source):
    with pytest.raises(ipi.ImageLoadError, match=r"image #0.*zero size"):
        Processor()(source)


def test_error_too_large_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(9000, 9000))  # 81 MP claimed; the pixel data is 4x4
    # a lazily opened image is refused from its header: decoding it would have raised "corrupt" instead
    with pytest.raises(ipi.ImageTooLargeError, match=r"image #0.*9000x9000"):
        Processor(max_image_pixels=1_000_000)(Image.open(path))
    # without our limit it gets decoded and fails as corrupt
    with pytest.raises(ipi.ImageLoadError, match="image #0") as info:
        Processor(max_image_pixels=None)(Image.open(path))
    assert not isinstance(info.value, ipi.ImageTooLargeError)
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


def rgb_of(source, alpha_background=None):
    image = source if isinstance(source, Image.Image) else ipi._to_pil(source, "test")
    return tuple(int(v) for v in np.asarray(ipi.to_rgb(image, "test", alpha_background))[0, 0])


def convert_rgb(image):
    """LLaVA's ``convert("RGB")``, with the ``transparency`` entry PIL carries over removed: transformers' CLIP
    processors (5.x) would composite such an RGB image onto white, old ones (LLaVA's) ignored it."""
    return Image.fromarray(np.asarray(image.convert("RGB")))


def transparent_images():
    """RGBA with real alpha (0..255, fully transparent pixels keeping a colour), LA, P with a transparency index,
    PA, and L / RGB with a transparency entry -- each as LLaVA would see it: PIL's convert("RGB")."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (23, 37, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 0  # fully transparent rows
    rgba[5:10, :, 3] = 255
    la = rng.integers(0, 256, (31, 17, 2), dtype=np.uint8)
    la[:, :3, 1] = 0
    pal = Image.fromarray(rng.integers(0, 8, (19, 29), dtype=np.uint8), mode="L").convert("P")
    pal.putpalette([int(v) for v in rng.integers(0, 256, 768)])
    pal.info["transparency"] = 2
    grey = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    grey[4:8, 8:12] = 7  # the transparent level, in the part "square" keeps
    grey = Image.fromarray(grey, mode="L")
    grey.info["transparency"] = 7
    rgb_t = np.asarray(random_image(21, 13, seed=4)).copy()
    rgb_t[4:9, 8:13] = (1, 2, 3)
    rgb_t = Image.fromarray(rgb_t)
    rgb_t.info["transparency"] = (1, 2, 3)
    return {
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(la, mode="LA"),
        "P": pal,
        "PA": pal.convert("PA"),
        "L+t": grey,
        "RGB+t": rgb_t,
        "clear": Image.new("RGBA", (30, 20), (10, 200, 30, 0)),
    }


@pytest.mark.parametrize("kind", list(transparent_images()))
@pytest.mark.parametrize("mode", ["pad", "square"])
def test_alpha_dropped_like_convert_rgb(kind, mode):
    """Default rule: the pixels are those of PIL's convert("RGB") (alpha dropped, hidden colours kept), then the
    CLIP processing -- for a PIL image and for its PNG file opened lazily."""
    image = transparent_images()[kind]
    expected = reference(convert_rgb(image), mode, 336, *CLIP)
    proc = Processor(image_aspect_ratio=mode)
    assert (proc(image)["pixel_values"] - expected).abs().max().item() <= TOL
    if kind != "PA":  # PNG has no PA mode
        from_file = proc(Image.open(io.BytesIO(_png_bytes(image))))["pixel_values"]
        assert (from_file - expected).abs().max().item() <= TOL
    # a real difference from compositing, so the test would notice the other rule
    composited = Processor(image_aspect_ratio=mode, alpha_background=[255, 255, 255])(image)["pixel_values"]
    assert (composited - expected).abs().max().item() > 0.1


def test_alpha_background_composites():
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 0))) == (10, 20, 30)  # default: dropped
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 0)), (255, 255, 255)) == (255, 255, 255)
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 0)), (0, 128, 0)) == (0, 128, 0)
    assert rgb_of(Image.new("RGBA", (1, 1), (10, 20, 30, 255)), (255, 255, 255)) == (10, 20, 30)
    half = rgb_of(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), (255, 255, 255))
    assert all(abs(v - 127) <= 1 for v in half)
    assert rgb_of(Image.new("LA", (1, 1), (0, 0)), (255, 255, 255)) == (255, 255, 255)
    assert rgb_of(Image.new("LA", (1, 1), (40, 255)), (255, 255, 255)) == (40, 40, 40)
    pal = transparent_images()["P"]
    arr = np.asarray(ipi.to_rgb(pal, "p", (1, 2, 3)))
    assert (arr[np.asarray(pal) == 2] == (1, 2, 3)).all() and (arr[np.asarray(pal) != 2] != (1, 2, 3)).any()
    # arrays and tensors with an alpha channel follow the same rule
    assert rgb_of(np.array([[[10, 20, 30, 0]]], np.uint8)) == (10, 20, 30)
    assert rgb_of(np.array([[[10, 20, 30, 0]]], np.uint8), (255, 255, 255)) == (255, 255, 255)
    assert rgb_of(torch.tensor([10, 20, 30, 0], dtype=torch.uint8).view(4, 1, 1), (9, 9, 9)) == (9, 9, 9)
    for kind, image in transparent_images().items():
        rgba = image.convert("RGBA")
        expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 128, 255, 255)), rgba).convert("RGB")
        out = Processor(alpha_background=[0, 128, 255])(image)["pixel_values"]
        assert (out - reference(expected, "pad", 336, *CLIP)).abs().max().item() <= TOL, kind
        per_call = Processor()(image, alpha_background=[0, 128, 255])["pixel_values"]
        assert torch.equal(per_call, out), kind


def test_alpha_rule_survives_remote_code_reload(tmp_path, monkeypatch):
    """A processor saved with `auto_map` and reloaded with trust_remote_code -- in a fresh interpreter without this
    package, from the copied file -- applies the saved rule: convert("RGB") by default, compositing when saved."""
    import json
    import subprocess

    images = {k: v for k, v in transparent_images().items() if k != "PA"}  # PNG has no PA mode
    for kind, image in images.items():
        image.save(tmp_path / f"{kind}.png")
    monkeypatch.setitem(sys.modules, ipi.__name__, ipi)  # save_pretrained copies the class's module file
    for folder, background in (("drop", None), ("white", [255, 255, 255])):
        proc = Processor(alpha_background=background, size=56)
        type(proc).register_for_auto_class("AutoImageProcessor")
        proc.save_pretrained(tmp_path / folder)
        assert (tmp_path / folder / "image_processing_internvl_chat.py").exists()
    code = (
        "import json, sys, numpy as np\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor\n"
        "root, kinds = sys.argv[1], json.loads(sys.argv[2])\n"
        "for folder in ('drop', 'white'):\n"
        "    proc = AutoImageProcessor.from_pretrained(f'{root}/{folder}', trust_remote_code=True)\n"
        "    assert type(proc).__module__.startswith('transformers_modules'), type(proc).__module__\n"
        "    out = proc([Image.open(f'{root}/{k}.png') for k in kinds], return_tensors='np')['pixel_values']\n"
        "    np.save(f'{root}/{folder}.npy', out)\n"
        "assert 'internvl_chat' not in sys.modules\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), json.dumps(list(images))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    dropped, white = np.load(tmp_path / "drop.npy"), np.load(tmp_path / "white.npy")
    for i, kind in enumerate(images):
        rgba = Image.open(tmp_path / f"{kind}.png")
        expected = reference(convert_rgb(rgba), "pad", 56, *CLIP)[0].numpy()
        assert np.abs(dropped[i] - expected).max() <= TOL, kind
        on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba.convert("RGBA"))
        expected = reference(on_white.convert("RGB"), "pad", 56, *CLIP)[0].numpy()
        assert np.abs(white[i] - expected).max() <= TOL, kind


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
    def row(source):
        image = source if isinstance(source, Image.Image) else ipi._to_pil(source, "test")
        return np.asarray(ipi.to_rgb(image))[0, :, 0].tolist()

    values = np.array([[0, 32768, 65535, 300]], dtype=np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    assert np.asarray(img16.convert("L"))[0, 3] == 255  # what PIL alone does: clipping
    assert row(img16) == [0, 128, 255, 1]
    assert row(Image.open(io.BytesIO(_png_bytes(img16)))) == [0, 128, 255, 1]  # 16-bit PNG
    assert row(values) == [0, 128, 255, 1]  # uint16 array
    assert row(Image.fromarray(values.astype(np.int32))) == [0, 128, 255, 1]
    assert row(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))) == [0, 128, 255]
    assert row(Image.fromarray(np.array([[-1.0, 0.0, 1000.0]], np.float32))) == [0, 0, 255]  # min-max stretched
    assert row(np.array([[False, True]])) == [0, 255]
