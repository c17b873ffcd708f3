"""Plumbing shared by the method scripts, a small module per concern, each saying in its first
lines what it holds and, if it is not always loaded, when it is (docs/README.md, "Project
layout"). Scripts import each name from its module, so the import line says where it lives."""
