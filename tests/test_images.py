"""internvl_chat.data.images.load_image, the one image loader of every verb: sources, decode-only (the image
processor owns the RGB / alpha rule), header-size checks before decoding, errors naming the source."""

import base64
import http.server
import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from internvl_chat import InternVLChatImageProcessor
from internvl_chat.data.dataset import load_sample_images
from internvl_chat.data.images import ImageLoadError, ImageTooLargeError, load_image

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_image(width, height, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8))


def png_bytes(image, **kwargs):
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def png_with_header_size(width, height):
    """A small PNG whose IHDR (valid CRC) claims `width` x `height`: decoding it would fail as corrupt."""
    data = bytearray(png_bytes(random_image(4, 4)))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def llava_pixels(image, size=336):
    """LLaVA's rule: Image.open(...).convert("RGB"), expand2square with the mean colour, CLIP preprocessing."""
    image = Image.fromarray(np.asarray(image.convert("RGB")))
    w, h = image.size
    if w != h:
        canvas = Image.new("RGB", (max(w, h),) * 2, tuple(int(m * 255) for m in CLIP_MEAN))
        canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        image = canvas
    ref = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ref(image, return_tensors="pt")["pixel_values"]


def transparent_images():
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (21, 34, 4), dtype=np.uint8)
    rgba[:6, :, 3] = 0  # fully transparent, hidden colours
    la = rng.integers(0, 256, (30, 18, 2), dtype=np.uint8)
    la[:, :4, 1] = 0
    pal = Image.fromarray(rng.integers(0, 8, (17, 26), dtype=np.uint8), mode="L").convert("P")
    pal.putpalette([int(v) for v in rng.integers(0, 256, 768)])
    pal.info["transparency"] = 3
    return {
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "LA": Image.fromarray(la, mode="LA"),
        "P": pal,
        "clear": Image.new("RGBA", (25, 15), (200, 10, 30, 0)),
    }


def test_every_source_decodes_the_same_pixels(tmp_path):
    image = random_image(30, 20, channels=4)  # RGBA: kept as RGBA (decode only)
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    sources = [
        str(path),
        path,
        data,
        bytearray(data),
        memoryview(data),
        f"data:image/png;base64,{b64}",
        b64,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        Image.open(path),
    ]
    for source in sources:
        out = load_image(source)
        assert out.mode == "RGBA" and out.tobytes() == image.tobytes(), type(source)
    arr = np.asarray(image)
    assert load_image(arr) is arr  # arrays / tensors go to the image processor as they are
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    assert load_image(tensor) is tensor


@pytest.mark.parametrize("kind", list(transparent_images()))
def test_file_path_alpha_rule_is_the_processors(kind, tmp_path):
    """A transparent PNG through the loader then the processor: LLaVA's convert("RGB") + CLIP by default, the
    composited image with alpha_background -- the loader itself never converts."""
    image = transparent_images()[kind]
    path = tmp_path / f"{kind}.png"
    image.save(path)
    loaded = load_image(str(path))
    assert loaded.mode == image.mode
    out = InternVLChatImageProcessor()(loaded)["pixel_values"]
    assert (out - llava_pixels(Image.open(path))).abs().max().item() <= 1e-6
    rgba = Image.open(path).convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
    out = InternVLChatImageProcessor(alpha_background=[255, 255, 255])(load_image(path))["pixel_values"]
    assert (out - llava_pixels(white)).abs().max().item() <= 1e-6
    # the training dataset goes through the same loader
    (sample_image,) = load_sample_images({"id": "s", "images": [str(path)]})
    assert sample_image.mode == image.mode and sample_image.tobytes() == loaded.tobytes()


def test_errors_name_the_source(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not an image")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        load_image(str(broken))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png_bytes(random_image(64, 64))[:300])
    with pytest.raises(ImageLoadError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(ImageLoadError, match="0 bytes"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="messages.0"):
        load_image("data:image/png;base64,@@@not-base64@@@", name="messages.0")
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(IsADirectoryError):
        load_image(str(tmp_path))
    with pytest.raises(ImageLoadError, match="neither"):
        load_image({"bytes": None, "path": None})
    with pytest.raises(TypeError):
        load_image(12345)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(str(broken), max_pixels=0)


def test_truncated_refused_even_when_another_library_allows_truncation(tmp_path, monkeypatch):
    """lmms-eval sets PIL's global LOAD_TRUNCATED_IMAGES at import; our loader still refuses truncated data (and
    leaves the other library's setting as it found it)."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = png_bytes(random_image(64, 64))[:300]
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # PIL alone, with the flag: decodes with a grey tail
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_too_large_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_size(9000, 9000))  # claims 81 MP; decoding would fail as corrupt
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png.*9000x9000"):
        load_image(str(bomb), max_pixels=1_000_000)
    with pytest.raises(ImageLoadError) as info:
        load_image(str(bomb), max_pixels=None)
    assert not isinstance(info.value, ImageTooLargeError)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_with_header_size(30000, 30000))  # above PIL's own bomb limit
    with pytest.raises(ImageTooLargeError, match="huge.png"):
        load_image(str(huge), max_pixels=None)
    with pytest.raises(ImageTooLargeError, match="image #3"):
        load_image(random_image(20, 20), max_pixels=100, name="image #3")
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


def test_extreme_aspect_ratio_refused_from_the_header_with_the_processor(tmp_path):
    """With the image processor, an image whose preprocessing would exceed the budget is refused from the header
    (the fake PNGs would fail as corrupt if they were decoded); what the processor can do cheaply is loaded."""
    wide = tmp_path / "wide.png"
    wide.write_bytes(png_with_header_size(32768, 512))
    canvas_builder = InternVLChatImageProcessor(backend="torchvision")
    if canvas_builder.backend == "torchvision":
        pytest.importorskip("torchvision")
        with pytest.raises(ImageTooLargeError, match=r"32768x512 in 'pad' mode"):
            load_image(str(wide), image_processor=canvas_builder)
    longer = tmp_path / "longer.png"
    longer.write_bytes(png_with_header_size(65536, 256))
    with pytest.raises(ImageTooLargeError, match=r"65536x256 in 'pad' mode"):  # 336 x 65536 > 4096²
        load_image(str(longer), max_pixels=4096 * 4096, image_processor=InternVLChatImageProcessor())
    real = tmp_path / "real.png"
    random_image(32768, 512).save(real)
    image = load_image(str(real), max_pixels=4096 * 4096, image_processor=InternVLChatImageProcessor())
    assert image.size == (32768, 512)
    assert InternVLChatImageProcessor()(image)["pixel_values"].shape == (1, 3, 336, 336)


def test_http_url_from_a_local_server():
    data = png_bytes(random_image(12, 7))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        image = load_image(f"http://127.0.0.1:{server.server_port}/x.png", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert image.size == (12, 7) and image.tobytes() == Image.open(io.BytesIO(data)).tobytes()
