"""Importers: turn a public data set's folder layout into a manifest.

Each importer returns validated :class:`~model_train.manifest.ManifestRow` tuples
and never copies or converts images; conversion to Hounsfield units happens once,
in :mod:`ctdx.model_train.sources`, when the cache is built.

- :func:`~model_train.importers.dicom_table.import_dicom_table`: DICOM files plus a
  per-file label table (the layout of COVID-CT-MD with ``slice_labels.csv``).
- :func:`~model_train.importers.dicom_table.import_dicom_tree`: ``<class>/<subject>/...``
  folders of DICOM series, no slice labels.
- :func:`~model_train.importers.image_folders.import_image_folders`: slice images in one
  folder per class (CC-CCII, COVID-CT).
- :func:`~model_train.importers.medseg.import_medseg`: images plus GGO/consolidation
  masks (the MedSeg / Inf-Net layout) for the manifestation task.
"""

from __future__ import annotations

from ctdx.model_train.importers.common import DEFAULT_CLASS_MAP, DataImportError, parse_class_map

__all__ = ["DEFAULT_CLASS_MAP", "DataImportError", "parse_class_map"]
