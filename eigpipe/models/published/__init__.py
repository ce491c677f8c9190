"""Published detector checkpoints as eigpipe checkpoints: one importer per upstream family (torchvision,
detectron2, mmdetection), the presets that fix each published file's architecture, preprocessing and classes,
and the ``eigpipe import`` stage (``eigpipe.models.published.stage``)."""
