"""Small helpers: atomic file writes, memory measurement."""
