"""Files: atomic writes, safe weight loading, output writers with provenance, display orientation."""
