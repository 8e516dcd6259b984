import io
import logging

import numpy as np
import pytest
from PIL import Image

from dreambooth_ray.images import ImageError, decode, load_subject_images
from dreambooth_ray.settings import S3Settings


def save(im: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def red(size=(40, 40), mode="RGB"):
    return Image.new(mode, size, {"RGB": (255, 0, 0), "RGBA": (255, 0, 0, 255), "L": 128}[mode])


def test_modes_are_converted_to_rgb(tmp_path):
    save(red(), tmp_path / "a.jpg", quality=95)
    save(Image.new("RGBA", (40, 40), (0, 0, 255, 0)), tmp_path / "transparent.png")  # -> white, not black
    save(Image.new("L", (40, 40), 128), tmp_path / "gray.png")
    save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")  # red in CMYK
    save(Image.fromarray(np.full((40, 40), 65535, np.uint16)), tmp_path / "deep.png")  # 16-bit white
    save(red(), tmp_path / "w.webp")
    imgs = {s.name: np.asarray(s.image) for s in load_subject_images(str(tmp_path), 16)}
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for a in imgs.values())
    assert imgs["transparent.png"].min() == 255
    assert abs(int(imgs["gray.png"][0, 0, 0]) - 128) <= 1
    assert imgs["cmyk.jpg"][8, 8, 0] > 200 and imgs["cmyk.jpg"][8, 8, 1] < 60
    assert imgs["deep.png"].min() == 255  # scaled, not clipped to a wrong value
    assert imgs["w.webp"][8, 8, 0] > 200


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 30), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed: the white half ends up on top
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    out = np.asarray(decode(buf.getvalue(), "rot.jpg", 30)).mean(axis=(1, 2))
    assert out[:10].mean() > 200 and out[-10:].mean() < 50


def test_non_square_images_are_center_cropped():
    im = Image.new("RGB", (90, 30), (0, 0, 0))
    im.paste((255, 255, 255), (30, 0, 60, 30))  # white center third
    assert np.asarray(decode(_png(im), "wide.png", 30)).min() > 240


def _png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_are_named(tmp_path):
    for i in range(3):
        save(red(), tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="broken.png: truncated: the file ends before the image data does"):
        load_subject_images(str(tmp_path), 16)
    (tmp_path / "broken.png").unlink()
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(jpg, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) * 2 // 3])
    with pytest.raises(ImageError, match="cut.jpg: truncated: the file ends before the image data does"):
        load_subject_images(str(tmp_path), 16)
    (tmp_path / "cut.jpg").unlink()
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg: empty file \(0 bytes\)"):
        load_subject_images(str(tmp_path), 16)
    (tmp_path / "empty.jpg").unlink()
    (tmp_path / "notes.png").write_text("this is text")
    with pytest.raises(ImageError, match=r"notes.png: not an image \(it begins with text: 'this is text'\)"):
        load_subject_images(str(tmp_path), 16)


def test_what_is_wrong_with_a_file_is_said_in_words():
    """Pillow's own messages carry object reprs ('cannot identify image file <_io.BytesIO object at
    0x7f..>') and codec jargon; each reason here is what a user can act on."""
    from dreambooth_ray.images import why_unreadable

    def reason(data):
        with pytest.raises(ImageError) as e:
            decode(data, "f", 16)
        assert str(e.value).startswith("f: ") and "0x" not in str(e.value)
        return str(e.value)[3:]

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buf, format="WEBP")
    webp = buf.getvalue()
    cut = "truncated: the file ends before the image data does"
    assert reason(webp[: len(webp) // 2]) == cut  # Pillow: 'could not create decoder object'
    assert reason(_png(red())[:40]) == cut  # Pillow: 'cannot identify image file <...>'
    assert reason(b"%PDF-1.7\n%\xe2\xe3") == "not a JPEG, PNG or WebP image: it is a PDF document"
    assert reason(b"\0\0\0\x18ftypheic\0\0\0\0") == ("a HEIC/AVIF photo, which this reader cannot decode "
                                                      "(convert it to JPEG or PNG)")
    assert reason(bytes(range(200, 216))) == "not an image (it begins with bytes c8 c9 ca cb cc cd ce cf)"
    assert reason(b"") == "empty file (0 bytes)"
    assert why_unreadable(b"x", OSError("decoder <PIL.X object at 0xdeadbeef> failed")) == \
        "damaged image data (OSError: decoder the file failed)"


def test_every_bad_file_is_listed_in_one_error(tmp_path):
    for i in range(3):
        save(red(), tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is text")
    with pytest.raises(ImageError) as e:
        load_subject_images(str(tmp_path), 16)
    head, _, files = str(e.value).partition("): ")
    assert head.startswith("3 bad image(s)") and "\n" not in str(e.value)
    assert [f.split(":")[0].rsplit("/", 1)[-1] for f in files.split("; ")] == ["broken.png", "empty.jpg", "notes.png"]


def test_skip_bad_warns_and_keeps_the_rest(tmp_path, caplog):
    for i in range(3):
        save(red(), tmp_path / f"ok{i}.png")
    (tmp_path / "notes.png").write_text("this is text")
    (tmp_path / "README.txt").write_text("not an image extension")
    with caplog.at_level(logging.WARNING, logger="dreambooth_ray"):
        imgs = load_subject_images(str(tmp_path), 16, skip_bad=True)
    assert [s.name for s in imgs] == ["ok0.png", "ok1.png", "ok2.png"]
    assert "notes.png" in caplog.text and "README.txt" in caplog.text


def test_image_count_limits(tmp_path, caplog):
    save(red(), tmp_path / "one" / "only.png")
    with pytest.raises(ImageError, match="one: 1 usable image.*at least 3"):
        load_subject_images(str(tmp_path / "one"), 16)
    (tmp_path / "one" / "only.png").unlink()
    for i in range(2):
        save(red(), tmp_path / f"ok{i}.png")
    with pytest.raises(ImageError, match="2 usable image.*at least 3"):
        load_subject_images(str(tmp_path), 16)
    for i in range(2, 51):
        save(red((8, 8)), tmp_path / "nested" / f"ünï cödé {i}.png")
    with caplog.at_level(logging.WARNING, logger="dreambooth_ray"):
        assert len(load_subject_images(str(tmp_path), 8)) == 51
    assert "51 images" in caplog.text
    with pytest.raises(ImageError, match="does not exist"):
        load_subject_images(str(tmp_path / "nope"), 8)


def test_images_from_s3(s3_endpoint, bucket):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for i in range(3):
        fs.pipe_file(f"{bucket}/subj/{i}.png", _png(red()))
    imgs = load_subject_images(f"s3://{bucket}/subj", 16, S3Settings(endpoint_url=s3_endpoint))
    assert [s.name for s in imgs] == ["0.png", "1.png", "2.png"]


def test_extreme_sizes_and_animations(tmp_path, caplog):
    save(Image.new("RGB", (12000, 12000), (0, 200, 0)), tmp_path / "huge.jpg", quality=50)
    save(Image.new("RGB", (1, 1), (0, 0, 255)), tmp_path / "tiny.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with caplog.at_level(logging.WARNING, logger="dreambooth_ray"):
        imgs = {s.name: np.asarray(s.image) for s in load_subject_images(str(tmp_path), 16)}
    assert set(imgs) == {"huge.jpg", "tiny.png", "anim.webp"}  # .gif is not a photo format we take
    assert imgs["huge.jpg"][8, 8, 1] > 150 and imgs["tiny.png"][8, 8, 2] == 255
    assert imgs["anim.webp"][8, 8, 0] > 200  # the first frame
    assert "anim.webp: animated image with 2 frames" in caplog.text and "anim.gif" in caplog.text
