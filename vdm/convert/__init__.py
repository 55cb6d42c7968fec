"""Checkpoint converters into vdm's (diffusers-format) folders. `vdm.convert.sat` reads CogVideoX SAT files.

Modules are not imported here so that `python -m vdm.convert.sat` runs without a double import.
"""
