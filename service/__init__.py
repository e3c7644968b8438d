"""Online search service (FastAPI); torch-free."""
