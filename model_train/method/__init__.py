"""The paper's method, defined once for training (``model_train``) and serving (``worker``).

Segmentation, preprocessing, networks, the checkpoint format, slice inference and
the study decision. Interpretation notes and reasons: ``docs/method.md``;
checkpoint fields: ``docs/checkpoint-format.md``. Import the submodules directly
(this package imports nothing, so ``classes`` stays cheap to import).
"""
