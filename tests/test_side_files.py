"""Issue #34 follow-ups: what beside a subject's photos names its run (images.side_files) agrees with what
training reads as a mask, is computed once per change of the folder rather than once per caller, and the
user's own class images key their prior cache by content."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from dreambooth_ray import images
from dreambooth_ray.images import read_images, side_files
from dreambooth_ray.storage import io_counts

RES = 32


def _rgba(rng, alpha) -> Image.Image:
    return Image.fromarray(np.concatenate([rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8),
                                           np.broadcast_to(np.asarray(alpha, np.uint8), (RES, RES))[..., None]], -1),
                           "RGBA")


def _folder(root, opaque_as="RGBA"):
    """Photos whose masks training reads in every way it can, and alphas that are no mask. `opaque_as`: how
    the opaque photo a is stored (RGBA with alpha 255 everywhere, or plain RGB: the same training)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    cut = np.full((RES, RES), 255, np.uint8)
    cut[:, : RES // 2] = 0
    a = _rgba(rng, 255)
    (a if opaque_as == "RGBA" else a.convert("RGB")).save(root / "a.png")  # opaque alpha: no mask
    _rgba(rng, cut).save(root / "b.png")  # a cut-out: masked
    p = Image.fromarray(rng.integers(0, 200, (RES, RES), dtype=np.uint8), "P")
    p.info["transparency"] = 255  # a palette PNG whose transparent index no pixel uses: opaque, no mask
    p.save(root / "c.png", transparency=255)
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / "d.jpg")
    Image.fromarray(cut, "L").save(root / "masks" / "d.png", compress_level=0)  # masks/: masked (edits keep its size)
    _rgba(rng, cut).save(root / "e.png")
    Image.fromarray(255 - cut, "L").save(root / "masks" / "e.png")  # both: one mask (masks/ wins), counted once
    _rgba(rng, cut).save(root / "f.jpg", format="PNG")  # a PNG named .jpg: decoded by content, masked
    _rgba(rng, 0).save(root / "g.png")  # all transparent: no cut-out
    Image.fromarray(cut, "L").save(root / "masks" / "zz.png")  # a mask of no photo
    (root / "b.txt").write_text("a photo of {identifier} {class_noun}")
    (root / "masks" / "d.txt").write_text("not a caption: under masks/")
    return root


def test_side_files_count_the_masks_training_reads(tmp_path):
    """The masked-photo count is the photos whose SubjectImage.mask is not None (an opaque alpha, a palette
    transparency no pixel uses, an all-transparent alpha and an orphan mask are none; a photo with both a
    cut-out and a masks/ file is one); an opaque alpha names the same run as no alpha at all."""
    photos, bad = read_images(str(_folder(tmp_path / "s")), RES)
    assert bad == [] and [p.name for p in photos] == ["a.png", "b.png", "c.png", "d.jpg", "e.png", "f.jpg", "g.png"]
    masked = [p.name for p in photos if p.mask is not None]
    assert masked == ["b.png", "d.jpg", "e.png", "f.jpg"]
    got = side_files(str(tmp_path / "s"))
    # Measured before the fix: masks 8 (every .png with an alpha in its header, orphan and doubled masks/ files; not f.jpg).
    assert got["masks"][0] == len(masked) and got["captions"][0] == 1
    assert side_files(str(_folder(tmp_path / "rgb", opaque_as="RGB"))) == got  # the same masks, the same run


def _old(root, seconds=3600):
    """Photos taken an hour ago (a listing newer than images.RACY_S is never memoised)."""
    t = time.time() - seconds
    for d, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(d, n), (t, t))


def _side_bytes(root) -> int:
    """The bytes side_files reads to answer: each masked photo's mask file, or its own bytes (an alpha), and
    the captions, by hand from the folder above."""
    files = ["masks/d.png", "masks/e.png", "b.png", "f.jpg", "b.txt"]
    return sum(os.path.getsize(root / f) for f in files)


def test_side_files_once_per_job_and_never_stale(tmp_path):
    """A job asks side_files 4 times per subject (planned_runs' run name, the subject task's run and SR run
    names, job.json): the folder's files are read once, then each call lists it only. An edit in place (same
    size) is seen at once, and so is one within the listing's mtime tick (the racy guard)."""
    from conftest import tiny_spec

    from dreambooth_ray.identity import run_name
    from dreambooth_ray.spec import parse_spec

    root = _folder(tmp_path / "s")
    _old(root)
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(root), train={"resolution": RES}))
    before = io_counts()[1]
    names = {run_name(spec, spec.subjects[0], "m", None) for _ in range(3)}
    record = side_files(str(root))
    read = io_counts()[1] - before
    # Measured: 1 x the side bytes (8615); without the memo (images.RACY_S = inf) 4 x: this test fails.
    assert len(names) == 1 and read == _side_bytes(root), (read, _side_bytes(root))
    assert record["masks"][0] == 4

    edited = np.asarray(Image.open(root / "masks" / "d.png")).copy()
    edited[0, -1] = 255 - edited[0, -1]
    size = os.path.getsize(root / "masks" / "d.png")
    Image.fromarray(edited, "L").save(root / "masks" / "d.png", compress_level=0)
    assert os.path.getsize(root / "masks" / "d.png") == size  # an edit in place, same size
    second = side_files(str(root))
    assert second["masks"][1] != record["masks"][1] and second["captions"] == record["captions"]
    assert run_name(spec, spec.subjects[0], "m", None) not in names

    # Within one mtime tick of the listing: the same size and (restored here) the same mtime as the answer
    # just given; only the racy guard (that answer was not kept) sees the change.
    stat = os.stat(root / "masks" / "d.png")
    edited[1, -1] = 255 - edited[1, -1]
    Image.fromarray(edited, "L").save(root / "masks" / "d.png", compress_level=0)
    os.utime(root / "masks" / "d.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(root / "masks" / "d.png") == size
    assert side_files(str(root))["masks"][1] != second["masks"][1]  # with images.RACY_S = -inf: fails


def test_side_files_on_s3_read_once_and_see_an_edit(s3_endpoint, bucket, tmp_path):
    """The same through s3:// (ETags): the second call lists and reads nothing else; a same-size object
    overwritten is a new answer."""
    import boto3

    from dreambooth_ray.settings import S3Settings

    root = _folder(tmp_path / "s")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.put_object(Bucket=bucket, Key=f"photos/{p.relative_to(root)}", Body=p.read_bytes())
    url, s3 = f"s3://{bucket}/photos", S3Settings(endpoint_url=s3_endpoint)
    before = io_counts()[1]
    first = side_files(url, s3)
    mid = io_counts()[1]
    assert side_files(url, s3) == first and io_counts()[1] == mid
    assert mid - before == _side_bytes(root) and first == side_files(str(root))  # measured: 8615 bytes, then 0
    caption = (root / "b.txt").read_bytes()
    client.put_object(Bucket=bucket, Key="photos/b.txt", Body=caption.replace(b"photo", b"snap!"))  # same size
    assert side_files(url, s3)["captions"][1] != first["captions"][1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_own_class_images_key_their_cache_by_content(tmp_path, where, request):
    """prior.class_images: an image edited in place (same name, same size, other pixels) is another cache;
    an untouched folder keeps its key."""
    from conftest import tiny_spec

    from dreambooth_ray.priors import PriorCache
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    rng = np.random.default_rng(1)
    own = tmp_path / "reg"
    own.mkdir()
    for i in range(3):  # uncompressed: the same size whatever the pixels
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(own / f"reg_{i}.png", compress_level=0)
    url, s3 = str(own), {}
    if where == "s3":
        import boto3

        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("bucket")
        client = boto3.client("s3", endpoint_url=endpoint)
        put = lambda p: client.put_object(Bucket=bucket, Key=f"reg/{p.name}", Body=p.read_bytes())  # noqa: E731
        for p in sorted(own.iterdir()):
            put(p)
        url, s3 = f"s3://{bucket}/reg", {"s3": {"endpoint_url": endpoint}}
    base = tiny_spec(str(tmp_path / "store"), str(tmp_path / "photos"), **s3)
    spec = parse_spec({**base, "prior": {**base["prior"], "class_images": url}})
    storage, subject = Storage(spec.storage, spec.s3), spec.subjects[0]

    def key():
        return PriorCache.for_subject(spec, subject, storage, "m").key

    first = key()
    assert key() == first  # untouched
    size = os.path.getsize(own / "reg_1.png")
    px = np.asarray(Image.open(own / "reg_1.png")).copy()
    px[5, 5] = 255 - px[5, 5]
    Image.fromarray(px).save(own / "reg_1.png", compress_level=0)
    assert os.path.getsize(own / "reg_1.png") == size
    if where == "s3":
        put(own / "reg_1.png")
    # Measured before the fix (names and sizes only): the same key; this test fails.
    assert key() != first
