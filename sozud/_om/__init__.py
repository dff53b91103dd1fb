"""Transports of the OpenSVC client, one module per wire protocol; the public names are in
``sozud.om_api``."""
