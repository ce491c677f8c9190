"""Layer paths of the models eigpipe builds: where the ResNet body sits, and a layer's canonical name.

Torch-free, so that the stages that only read tables and stores (spectrum, report) start without torch.
"""

from __future__ import annotations

DETECTOR_BODY, CLASSIFIER_BODY = "backbone.body", "body"
BODY_PREFIXES = (f"{DETECTOR_BODY}.", f"{CLASSIFIER_BODY}.")


def canonical(layer: str) -> str:
    """A layer path without its body prefix, so that classifier and detector layers line up."""
    for prefix in BODY_PREFIXES:
        if layer.startswith(prefix):
            return layer[len(prefix) :]
    return layer


def canonical_names(names: list[str]) -> list[str]:
    """The canonical names of one model's layers: without the body prefix where the stripped names stay unique
    (a model of its own with layers ``conv`` and ``body.conv`` keeps every full name, so no two rows merge)."""
    stripped = [canonical(name) for name in names]
    return stripped if len(set(stripped)) == len(set(names)) else list(names)
