"""Zero-cost pruning: any κ-subnet of a central model as a smaller dense Hugging Face checkpoint.

One job a module:
- `methods.py`: the registry of pruning methods; `selectors.py` which units each keeps in a κ-subnet;
  `scores.py` the scoring helpers they share; `calibration.py` what calibrated methods read from
  calibration text;
- `build.py`: the subnet as a dense model with the activation-shift correction folded in;
- `format.py`: the export on disk and `load_exported`, the one loader for every export;
- `pruner.py`: a central model and a method → exports; `cli.py`: `twist-export` and shared flags.
"""

from twist_scale.pruning.format import load_exported

__all__ = ["load_exported"]
