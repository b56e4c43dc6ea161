"""Every method module, imported so that it registers itself; then look methods up by name."""

from s4seg.engine.method import build_method, registered_methods
from s4seg.methods import (  # noqa: F401  (registers)
    corrmatch,
    fixmatch,
    ipixmatch,
    regionmatch,
    rrn,
    supervised,
    unimatch,
    unimatch_v2,
)

__all__ = ["build_method", "registered_methods"]
