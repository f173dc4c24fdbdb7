import io
import json
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mezzotint.data import open_dataset
from mezzotint.data.captioned import FolderDataset, TarShards, expand_braces, load_image
from mezzotint.data.shapes import ShapesDataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def solid(colour, size=(12, 12)) -> Image.Image:
    return Image.new("RGB", size, colour)


def write_folder(root, n: int, uncaptioned: int = 0):
    """n images img{k}.png, each of its own grey level; the first `uncaptioned` get no .txt."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        solid((10 * k,) * 3).save(root / f"img{k}.png")
        if k >= uncaptioned:
            (root / f"img{k}.txt").write_text(f"image {k}")
    return root


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder, shards=3, per=4):
    """shard-00{s}.tar holding keys {s}{k:03d}: a solid image of grey 10*(s*per+k) and caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = {}
        for k in range(per):
            g = 10 * (s * per + k)
            members[f"{s}{k:03d}.png"] = png_bytes(solid((g,) * 3))
            members[f"{s}{k:03d}.txt"] = f"  grey {g}\n".encode()
        write_tar(folder / f"shard-{s:03d}.tar", members)
    return folder


# ---------------------------------------------------------------- folders


def test_folder_caption_pairing_and_missing(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / ".cache").mkdir()
    solid(RED).save(root / "a" / "cat.png")
    (root / "a" / "cat.txt").write_text("  a red cat \n")
    solid(GREEN).save(root / "dog.JPG", "JPEG")
    (root / "dog.txt").write_text("a green dog")
    solid(BLUE).save(root / "zebra.webp")  # no caption
    solid(BLUE).save(root / ".hidden.png")
    solid(BLUE).save(root / ".cache" / "x.png")
    (root / "notes.md").write_text("not an image")
    with pytest.warns(UserWarning, match="1 of 3 images"):
        ds = FolderDataset(root, 8, shuffle=False)
    assert ds.files == ["a/cat.png", "dog.JPG", "zebra.webp"]
    assert len(ds) == 3 and ds.missing_captions == 1
    got = [ds[i] for i in range(3)]
    assert [c for _, c in got] == ["a red cat", "a green dog", ""]
    assert got[0][0][:, 4, 4].tolist() == list(RED)
    assert got[2][0][:, 4, 4].tolist() == list(BLUE)


def test_folder_all_captioned_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FolderDataset(write_folder(tmp_path / "d", 3), 8)


@pytest.mark.parametrize(
    "make, fmt, expect",
    [
        (lambda: Image.new("RGBA", (20, 12), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent: white
        (lambda: Image.new("RGBA", (20, 12), (0, 0, 255, 255)), "PNG", BLUE),
        (lambda: Image.new("LA", (12, 20), (0, 128)), "PNG", (127, 127, 127)),  # half black on white
        (lambda: Image.new("L", (12, 12), 77), "PNG", (77, 77, 77)),
        (lambda: Image.new("1", (12, 12), 1), "BMP", (255, 255, 255)),
        (lambda: Image.new("I;16", (12, 12), 32896), "PNG", (128, 128, 128)),  # 16-bit scaled, not clipped
        (lambda: Image.new("RGB", (12, 12), GREEN).convert("P"), "PNG", GREEN),
        (lambda: Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (lambda: Image.new("RGB", (12, 12), RED), "WEBP", None),
    ],
)
def test_every_mode_converts_to_rgb(tmp_path, make, fmt, expect):
    img = make()
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    x = load_image(path, 8, str(path))
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
    if expect is not None:
        assert np.abs(x.numpy().astype(int) - np.array(expect)[:, None, None]).max() <= 2


def test_palette_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 10, 5))
    img.info["transparency"] = 0  # red (the lower half) is transparent
    img.save(tmp_path / "p.png")
    x = load_image(tmp_path / "p.png", 10, "p.png")
    assert x[:, 1, 5].tolist() == list(GREEN) and x[:, 8, 5].tolist() == [255, 255, 255]


@pytest.mark.parametrize("wide", [True, False])
def test_non_square_is_centre_cropped(tmp_path, wide):
    """Red | green | blue (15 + 10 + 15 of 40) along the long side: the crop is the green
    band, and when downscaled the red and blue bleeding in at its two ends is equal."""
    a = np.zeros((10, 40, 3), np.uint8)
    a[:, :15], a[:, 15:25], a[:, 25:] = RED, GREEN, BLUE
    img = Image.fromarray(a if wide else a.transpose(1, 0, 2).copy())
    img.save(tmp_path / "x.png")
    same = load_image(tmp_path / "x.png", 10, "x.png")  # no resampling: exactly the band
    assert (same.permute(1, 2, 0).reshape(-1, 3) == torch.tensor(GREEN, dtype=torch.uint8)).all()
    x = load_image(tmp_path / "x.png", 5, "x.png").int()
    x = x if wide else x.transpose(1, 2)  # long axis last
    assert x.shape == (3, 5, 5) and (x[1] >= 230).all()
    assert torch.equal(x[0], x[2].flip(-1))  # red on the left mirrors blue on the right


def test_upscales_small_images(tmp_path):
    solid(RED, (4, 6)).save(tmp_path / "s.png")
    assert load_image(tmp_path / "s.png", 16, "s.png").shape == (3, 16, 16)


def test_epoch_shuffle_is_deterministic_permutation(tmp_path):
    root = write_folder(tmp_path / "d", 7)
    ds = FolderDataset(root, 4, seed=3)
    n = len(ds)
    orders = [[ds.sample_index(e * n + k) for k in range(n)] for e in range(4)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # epochs differ
    again = FolderDataset(root, 4, seed=3)
    assert orders == [[again.sample_index(e * n + k) for k in range(n)] for e in range(4)]
    other = FolderDataset(root, 4, seed=4)
    assert orders != [[other.sample_index(e * n + k) for k in range(n)] for e in range(4)]
    # items follow the order: each epoch's captions cover every sample once
    caps = [ds[i][1] for i in range(2 * n)]
    assert sorted(caps[:n]) == sorted(caps[n:]) == sorted(f"image {k}" for k in range(n))
    assert caps[n + 2] == f"image {orders[1][2]}"
    with pytest.raises(IndexError):
        ds[-1]


def test_iteration_is_one_epoch(tmp_path):
    ds = FolderDataset(write_folder(tmp_path / "d", 3), 4)
    assert len(list(ds)) == 3


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("caption without image")
    with pytest.raises(ValueError, match="no images.*empty"):
        FolderDataset(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="missing.*not a directory"):
        FolderDataset(tmp_path / "missing", 8)
    root = tmp_path / "bad"
    root.mkdir()
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "cut.png").write_bytes(png_bytes(Image.effect_noise((64, 64), 50))[:200])
    with pytest.warns(UserWarning, match="2 of 2"):
        ds = FolderDataset(root, 8, shuffle=False)
    for j, name in enumerate(["broken.png", "cut.png"]):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
            ds[j]


# ---------------------------------------------------------------- tar shards


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="bad brace"):
        expand_braces("s-{x}.tar")


def test_tar_shards_brace_and_glob(tmp_path):
    folder = write_shards(tmp_path / "shards")
    braced = TarShards(str(folder / "shard-{000..002}.tar"), 6, shuffle=False)
    globbed = TarShards(str(folder / "shard-*.tar"), 6, shuffle=False)
    listed = TarShards([folder / "shard-000.tar", folder / "shard-001.tar"], 6, shuffle=False)
    assert len(braced) == len(globbed) == 12 and len(listed) == 8
    for j in (0, 5, 11):
        img, cap = braced[j]
        assert img.shape == (3, 6, 6) and img.dtype == torch.uint8
        assert cap == f"grey {10 * j}" and int(img[0, 3, 3]) == 10 * j
        assert globbed[j][1] == cap
    with pytest.raises(ValueError, match="shard-003"):
        TarShards(str(folder / "shard-{000..009}.tar"), 6)
    with pytest.raises(ValueError, match="nothing-"):
        TarShards(str(folder / "nothing-*.tar"), 6)


def test_tar_grouping_captions_and_skips(tmp_path):
    img = png_bytes(solid(RED))
    path = write_tar(
        tmp_path / "s.tar",
        {
            "dir/a.jpg": png_bytes(solid(GREEN), "JPEG"),
            "dir/a.txt": b"from txt",
            "dir/a.json": json.dumps({"caption": "ignored: txt wins"}).encode(),
            "b.png": img,
            "b.json": json.dumps({"text": "from json", "width": 12}).encode(),
            "c.png": img,
            "c.caption": b"from caption\n",
            "d.seg.png": img,  # extension "seg.png": not the sample's image
            "d.txt": b"no image: skipped",
            "e.webp": png_bytes(solid(BLUE), "WEBP"),  # no caption
        },
    )
    with pytest.warns(UserWarning, match="1 of 4 images"):
        ds = TarShards(path, 8, shuffle=False)
    assert len(ds) == 4 and ds.skipped == 1
    assert [ds[j][1] for j in range(4)] == ["from txt", "from json", "from caption", ""]


def test_tar_epochs_match_folder_rule(tmp_path):
    ds = TarShards(str(write_shards(tmp_path / "s", 2, 3) / "*.tar"), 4, seed=1)
    caps = [ds[i][1] for i in range(12)]
    for e in range(2):
        assert sorted(caps[6 * e : 6 * e + 6]) == sorted(f"grey {10 * k}" for k in range(6))
    assert caps == [TarShards(str(tmp_path / "s" / "*.tar"), 4, seed=1)[i][1] for i in range(12)]


def test_tar_errors(tmp_path):
    (tmp_path / "text.tar").write_text("this is not a tar file " * 40)
    with pytest.raises(ValueError, match="text.tar.*not a valid"):
        TarShards(tmp_path / "text.tar", 8)
    write_tar(tmp_path / "noimg.tar", {"a.txt": b"caption only"})
    with pytest.raises(ValueError, match="no samples.*noimg.tar"):
        TarShards(tmp_path / "noimg.tar", 8)
    data = (write_shards(tmp_path / "ok", 1, 3) / "shard-000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 3 + 100])
    with pytest.raises(ValueError, match="cut.tar is (truncated|damaged)"):
        TarShards(tmp_path / "cut.tar", 8)
    write_tar(tmp_path / "bad.tar", {"x.png": b"garbage bytes", "x.txt": b"hi"})
    ds = TarShards(tmp_path / "bad.tar", 8)
    with pytest.raises(ValueError, match=r"cannot read image x\.png in .*bad\.tar"):
        ds[0]


def test_tar_after_fork_and_pickle(tmp_path):
    ds = TarShards(str(write_shards(tmp_path / "s", 2, 2) / "*.tar"), 4, shuffle=False)
    want = [ds[j] for j in range(4)]  # opens descriptors in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(clone[j][0], want[j][0]) for j in range(4))
    if not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: read every sample with the inherited dataset
        try:
            os.write(w, json.dumps([[int(x.sum()), c] for x, c in (ds[j] for j in range(4))]).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = json.loads(os.read(r, 1 << 16))
    os.waitpid(pid, 0)
    assert got == [[int(x.sum()), c] for x, c in want]
    assert ds[3][1] == want[3][1]  # the parent still reads after the child closed its copies


# ---------------------------------------------------------------- open_dataset


def test_open_dataset_dispatch(tmp_path):
    assert isinstance(open_dataset("shapes", 16, seed=2), ShapesDataset)
    assert open_dataset("shapes", 16, seed=2).phrasing == "train"
    assert isinstance(open_dataset(str(write_folder(tmp_path / "imgs", 2)), 8), FolderDataset)
    folder = write_shards(tmp_path / "shards", 2, 1)
    assert len(open_dataset(str(folder / "shard-{000..001}.tar"), 8)) == 2
    assert isinstance(open_dataset(str(folder / "shard-*.tar"), 8), TarShards)
    for bad in ("imagenet", str(tmp_path / "missing-dir"), str(tmp_path / "x.zip")):
        with pytest.raises(ValueError, match="allowed: \"shapes\", an existing directory.*tar"):
            open_dataset(bad, 8)
