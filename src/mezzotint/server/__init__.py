"""`mezzotint serve`: HTTP server with a native job API, A1111-compatible routes and a web page."""
from .app import create_app, host_warning
from .inputs import Limits

__all__ = ["Limits", "create_app", "host_warning"]
