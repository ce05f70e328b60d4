"""Reporting: the cost report, verification of artifacts against the reference, and accuracy."""
