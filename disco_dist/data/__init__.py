"""Corpora, shards, the loader, the teacher cache pass, and the STS and NLI readers."""
