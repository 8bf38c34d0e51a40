"""Append-only schema revisions: a revision is never edited once it has landed."""
