"""Training: the tiny base (generic-text pretraining) and fine-tuning on one source or a mixture.

One module per concern, so that ``import dem.training.settings`` (what the command line needs to
build its options) stays free of torch:

* :mod:`~dem.training.settings` -- the knobs, listed once (:class:`FinetuneSettings`,
  :class:`PretrainSettings`): defaults, help, checks, recorded parameters, notebook names;
* :mod:`~dem.training.schedule` -- mixture ratios, the DMix sampler, the micro-batch schedule;
* :mod:`~dem.training.runs` -- run folders: same run?, resume, the record, finishing;
* :mod:`~dem.training.checkpoints` -- what an interrupted run resumes from;
* :mod:`~dem.training.loop` -- the accelerate loop and its validation loss;
* :mod:`~dem.training.lora` -- LoRA adapters through peft, merged before saving;
* :mod:`~dem.training.pretrain` and :mod:`~dem.training.finetune` -- the two entry points:
  ``from dem.training.finetune import finetune``.
"""

__all__ = ["finetune", "pretrain", "schedule", "settings"]
