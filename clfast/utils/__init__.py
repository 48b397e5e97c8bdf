"""Leaf utilities (files, seeding): importable from any layer; they import nothing of clfast."""
