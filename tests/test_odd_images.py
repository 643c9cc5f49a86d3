"""A corpus of 30+ odd inputs: each is scored correctly or skipped with a reason in errors.csv,
and the batch goes on."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from spade_faiss import images
from spade_faiss.apps import cli
from spade_faiss.apps.runs import read_rows
from spade_faiss.synthetic import texture

from .conftest import FEAT, RUN


def png_bomb(width, height) -> bytes:
    """A valid tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_odd_corpus(root):
    """Returns {name: expected} with expected 'ok' or a substring of the skip reason."""
    rng = np.random.default_rng(0)
    tex = texture(rng, (80, 100))
    bgr = cv2.cvtColor(tex, cv2.COLOR_RGB2BGR)
    exp = {}

    def w(name, data, expected):
        (root / name).write_bytes(data)
        exp[name] = expected
    ok_png = cv2.imencode(".png", bgr)[1].tobytes()
    ok_jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
    w("ok.png", ok_png, "ok")
    w("ok.jpg", ok_jpg, "ok")
    w("ok.bmp", cv2.imencode(".bmp", bgr)[1].tobytes(), "ok")
    w("ok.tiff", cv2.imencode(".tiff", bgr)[1].tobytes(), "ok")
    w("ok.webp", cv2.imencode(".webp", bgr)[1].tobytes(), "ok")
    w("UPPER.PNG", ok_png, "ok")
    w("png_named.jpg", ok_png, "ok")                      # wrong extension: content decides
    w("jpg_named.png", ok_jpg, "ok")
    w("gray.png", cv2.imencode(".png", bgr[..., 0])[1].tobytes(), "ok")
    w("gray16.png", cv2.imencode(".png", (bgr[..., 0].astype(np.uint16) * 257))[1].tobytes(), "ok")
    w("rgb16.png", cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes(), "ok")
    w("rgba.png", cv2.imencode(".png", np.dstack([bgr, bgr[..., :1]]))[1].tobytes(), "ok")
    w("one_pixel.png", cv2.imencode(".png", bgr[:1, :1])[1].tobytes(), "ok")
    w("thin.png", cv2.imencode(".png", bgr[:1, :])[1].tobytes(), "ok")
    w("tall.png", cv2.imencode(".png", np.repeat(bgr[:, :1], 5, axis=0))[1].tobytes(), "ok")
    w("large.png", cv2.imencode(".png", cv2.resize(bgr, (3000, 2400)))[1].tobytes(), "ok")
    Image.fromarray(tex).convert("CMYK").save(root / "cmyk.jpg")
    exp["cmyk.jpg"] = "ok"
    frames = [Image.fromarray(texture(rng, (40, 40))) for _ in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    exp["animated.gif"] = None  # decides below: decoded (first frame) or skipped with a reason
    Image.fromarray(tex).save(root / "palette.png", optimize=True, bits=4)
    exp["palette.png"] = "ok"
    w("empty.png", b"", "empty file")
    w("trunc.png", ok_png[: len(ok_png) // 2], "truncated PNG")
    w("trunc.jpg", ok_jpg[: len(ok_jpg) // 2], "truncated JPEG")
    scan = ok_jpg.find(b"\xff\xda") + 200
    damaged = bytes(b ^ 0x5A if scan <= i < scan + 740 and (i - scan) % 37 == 0 else b for i, b in enumerate(ok_jpg))
    w("damaged_scan.jpg", damaged, "damaged JPEG data (Corrupt JPEG data")
    w("header_only.png", ok_png[:40], "truncated PNG")
    w("text.png", b"this is not an image\n" * 10, "not a decodable image")
    w("html.jpg", b"<html><body>404</body></html>", "not a decodable image")
    w("random.bmp", rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a decodable image")
    w("zeros.tif", b"\0" * 1000, "not a decodable image")
    w("bomb.png", png_bomb(200_000, 200_000), "pixels exceed the limit")
    w("bad_crc.png", ok_png[:33] + b"\0\0\0\0" + ok_png[37:], "not a decodable image")
    os.symlink(root / "does_not_exist.png", root / "broken_link.png")
    exp["broken_link.png"] = "no such file"
    (root / "folder.png").mkdir()
    exp["folder.png"] = "not a regular file (a folder)"
    bad_name = os.fsdecode(b"latin1_\xe9.png")
    (root / bad_name).write_bytes(ok_png)
    exp[bad_name] = "not valid UTF-8"
    return exp


def test_every_odd_input_is_scored_or_skipped_with_a_reason(tmp_path, dataset, capsys):
    store = tmp_path / "c.h5"
    assert cli.main(["index", str(dataset), "--out", str(store), *FEAT]) == 0
    odd = tmp_path / "odd"
    odd.mkdir()
    expected = make_odd_corpus(odd)
    assert len(expected) >= 30
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\n".join(os.fsencode(odd / n) for n in sorted(expected)))
    code = cli.main(["score", str(store), str(listing), "--out", str(tmp_path / "run"), *RUN, "--k-gallery", "3"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_PARTIAL, err
    scored = {os.path.basename(r["image_path"]) for r in read_rows(tmp_path / "run" / "scores.csv")}
    errors = {os.path.basename(r["image_path"]): r["reason"] for r in read_rows(tmp_path / "run" / "errors.csv")}
    for name, want in expected.items():
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        assert (shown in scored) != (shown in errors), f"{name}: scored and skipped, or neither"
        if want == "ok":
            assert shown in scored, f"{name}: {errors.get(shown)}"
        elif want is not None:
            assert shown in errors and want in errors[shown], f"{name}: {errors.get(shown)}"
    for r in read_rows(tmp_path / "run" / "scores.csv"):
        assert np.isfinite(float(r["score"]))


@pytest.mark.parametrize("name", ["ok.png", "large.png"])
def test_odd_but_valid_inputs_decode_like_imread(tmp_path, name):
    expected = make_odd_corpus(tmp_path)
    assert expected[name] == "ok"
    img = images.load_image(tmp_path / name)
    ref = cv2.imread(str(tmp_path / name), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(img.rgb, ref[..., ::-1])
