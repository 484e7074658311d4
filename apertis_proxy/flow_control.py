"""How bytes move through a transport, for the server and the upstream connection alike."""
from __future__ import annotations

# A piece shorter than this is joined with its framing into one buffer and
# written with one call (one copy of it); a longer one goes out uncopied with
# writelines().
SMALL_WRITE = 16 * 1024
