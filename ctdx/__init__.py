"""ctdx: a second reader for COVID-19 on chest CT (Chen et al. 2021).

One import namespace over the repository's folders: ``ctdx.db`` (the foundation: settings,
models, migrations, queries and the admin commands), ``ctdx.scp`` (the DICOM listener),
``ctdx.worker`` (analysis and reports) and ``ctdx.model_train`` (the method and training).
Imports point one way: scp, worker and model_train use db; worker uses model_train.method;
:mod:`ctdx.cli` gathers every package's commands and sits above them all.
"""
