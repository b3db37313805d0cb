"""Command-line tools that talk to a server or measure it; not part of the server."""
