"""sozud: keeps the Sozu reverse proxies of an OpenSVC cluster in sync (see README.md)."""

__version__ = "0.2.0"
