"""Merging: distribution vectors v_i = θ_i − θ0 and the merge θ0 + Σ w_i·v_i (chapters 03-04).

* :mod:`~dem.merging.vectors` -- extract a vector from two model folders, save it, load it;
* :mod:`~dem.merging.methods` -- the merge methods (DEM, task arithmetic, TIES, DARE, ...),
  one record each, built from the block-wise steps of :mod:`~dem.merging.steps`;
* :mod:`~dem.merging.merge` -- the streaming merge of model folders, one tensor at a time;
  its inputs and record are in :mod:`~dem.merging.inputs`, LoRA adapters as inputs in
  :mod:`~dem.merging.adapters`;
* :mod:`~dem.merging.safetensors_io` -- safetensors read and written tensor by tensor, hashed
  on the way (:mod:`~dem.merging.hashing`).

This file imports nothing: ``dem merge --help`` reads :mod:`~dem.merging.methods` without torch.
"""

__all__ = ["merge", "methods", "safetensors_io", "vectors"]
