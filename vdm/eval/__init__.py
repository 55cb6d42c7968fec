"""Evaluation of generated samples. `vdm.eval.synthetic` scores videos of the synthetic world.

Modules are not imported here so that `python -m vdm.eval.synthetic` runs without a double import.
"""
