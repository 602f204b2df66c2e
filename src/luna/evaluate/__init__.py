"""Evaluation: how good the detections, the malignancy scores and the segmentation are.

- `luna.evaluate.froc`: LUNA16 FROC / CPM with a scan bootstrap (the challenge's rules);
- `luna.evaluate.malignancy`: ROC / AUC of per-nodule malignancy probabilities;
- `luna.evaluate.confusion`: the diagnosis's confusion table (nodule / benign / malignant);
- `luna.evaluate.segmentation`: a segmentation scored through the diagnosis's grouping;
- `luna.evaluate.outputs`: CSV, JSON and PNG files of the above;
- ``python -m luna.evaluate`` (`luna.evaluate.__main__`): the command.
"""
