"""Leaf utilities (files, seeding, the CPU's model and flags): importable from any layer; they import nothing
of clfast."""
