"""Datasets: the Shapes world (`shapes`, `phrasing`), folders of captioned images, shards."""


def open_dataset(spec: str, size: int, seed: int = 0, kinds: str = ""):
    """A dataset by name: "shapes" (the Shapes world, training phrasings), an existing
    directory (`FolderDataset`), or .tar shards as a path, glob or brace range such as
    "data/shard-{000..009}.tar" (`TarShards`). Every one maps index i to (uint8 (3, size,
    size), caption). `kinds` reweights the Shapes world's caption kinds; other data refuse it."""
    import os

    from mezzotint.data.captioned import FolderDataset, TarShards
    from mezzotint.data.shapes import ShapesDataset

    spec = str(spec)
    if spec == "shapes":
        return ShapesDataset(size, seed, phrasing="train", kinds=kinds)
    if kinds:
        raise ValueError(f"--kinds weights the Shapes world's caption kinds; {spec!r} is not the Shapes world")
    if os.path.isdir(spec):
        return FolderDataset(spec, size, seed)
    if spec.endswith(".tar"):
        return TarShards(spec, size, seed)
    raise ValueError(
        f"unknown dataset {spec!r}; allowed: \"shapes\", an existing directory of captioned images, "
        "or .tar shards (a path, glob or brace range like data/shard-{000..009}.tar)"
    )
