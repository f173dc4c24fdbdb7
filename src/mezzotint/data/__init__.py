"""Datasets: the Shapes world (`shapes`, `phrasing`), folders of captioned images, shards."""
