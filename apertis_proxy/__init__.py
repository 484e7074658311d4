"""apertis-proxy: a self-hosted gateway for the Anthropic Messages API."""
__version__ = "0.1.0"
