"""Scene sources: where the tile stage reads scenes from (`dataset.name` in params.yaml).

    source = build_source(params.dataset)     # registry lookup; unknown names list the valid ones
    for scene in source.scenes():             # one scene in memory at a time
        scene.name, scene.image, scene.mask, scene.labeled

Each source is a plain class whose class attributes hold the dataset's facts (`classes`, `palette`,
`default_test_scenes`); importing this package registers all of them.
"""

from s4seg.data.sources.base import SOURCES, Scene, Source, build_source, register_source
from s4seg.data.sources.folder import FolderSource
from s4seg.data.sources.isprs import ISPRSSource
from s4seg.data.sources.loveda import LoveDASource
from s4seg.data.sources.synthetic import SyntheticSource

__all__ = [
    "SOURCES",
    "FolderSource",
    "ISPRSSource",
    "LoveDASource",
    "Scene",
    "Source",
    "SyntheticSource",
    "build_source",
    "register_source",
]
