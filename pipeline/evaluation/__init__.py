"""Accuracy evaluation of face model packs (LFW verification)."""
