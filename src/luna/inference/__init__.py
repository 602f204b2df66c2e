"""Inference: from a loaded CT and trained networks to classified nodules.

- `luna.inference.segment`: `segment_ct`, the UNet over every axial slice -> probabilities;
- `luna.inference.grouping`: `group_detections`, probabilities -> candidate `Detection`s;
- `luna.inference.classify`: `classify_chunks`, p(class) for the chunk around each centre;
- `luna.inference.pipeline`: `diagnose` (the four steps above + `verdict`), `Diagnosis`,
  `Nodule`, `Models` / `load_models`.

The diagnosis command, the training stages' validation, the bench and the evaluation
all call these; nothing here reads files except `load_models`.
"""
