"""Images to CLIP tiles: loading an image safely (``load``), then LLaVA's padding, resizing and
anyres tiling as the reference does them (``preprocess``)."""
