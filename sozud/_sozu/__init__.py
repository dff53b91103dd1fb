"""The client of sozu's command channel, one concern per module; the public names are in
``sozud.socket_proto``."""
