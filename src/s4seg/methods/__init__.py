"""Every method module, imported so that it registers itself; then look methods up by name."""

from s4seg.engine.method import build_method, registered_methods
from s4seg.methods import fixmatch, rrn, supervised, unimatch, unimatch_v2  # noqa: F401  (registers)

__all__ = ["build_method", "registered_methods"]
